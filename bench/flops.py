"""Exact FLOP count of one rtrainer training step (forward, HPN loss, backward, grad norm, AdamW).

    from flops import step_flops          # bench/ on sys.path (bench/compare.py does this)
    step_flops(B=8, T=64, D=512, N=16, K=4, R=1, L=2, V=8192)["total"]

Counts the MODEL math (docs/architecture.md: mamba-lite stack, final LayerNorm, HPN loss, AdamW)
with the backward pass rtrainer runs (rtrainer/model.py `backward`, the kernels' documented
backward formulas). "Model FLOPs" = `total`: what any implementation of this training step must
compute. Work that is an implementation choice is NOT in the total and is reported separately under
`not_counted` (rtrainer's in-chunk recompute of delta and h in the scan backward, the reduction of
the per-thread dBt/dCt partials); memsets, gathers and copies are 0 FLOPs.

Conventions (every count below follows them):
  * a multiply, an add/subtract, a compare-free max, a division, a square root: 1 FLOP each;
    a fused multiply-add: 2 FLOPs; a transcendental (exp, log1p): 1 FLOP;
  * sigmoid(x) = 1/(1+exp(-x)): 3 FLOPs (exp, add, divide; the negation is free);
    silu(x) = x*sigmoid(x): 4; softplus(x) = log1p(exp(x)): 2 (the "x above 20" branch is ignored);
  * matrix product (m,k)@(k,n): 2*m*k*n (k multiplies and k adds per output element);
  * a per-row scalar (one norm, one reciprocal) is counted, a per-call scalar (bias corrections of
    AdamW, 1/n of a mean) is not.
Notation: BT = B*T tokens, W = 2N+R columns of x_proj, P_train = trainable parameter elements.

Returned dict (all ints, FLOPs of ONE step):
  forward, backward, optimizer, total            (total = forward + backward + optimizer)
  matmul                                         (every 2*m*n*k product, forward and backward)
  components: {"<phase>.<component>": flops}     (sums to total; phase = fwd | bwd | opt)
  not_counted: {"scan_bwd_recompute": ..., ...}  (implementation work outside the model count)
  params_trainable, params_decay                 (elements the optimizer updates / decays)
  matmul_shapes: list of (m, k, n) of every product in one step (what tests compare against)
"""
from __future__ import annotations


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of (m,k) @ (k,n)."""
    return 2 * m * k * n


def step_flops(B: int, T: int, D: int, N: int, K: int, R: int, L: int, V: int,
               learnable_prototypes: bool = False) -> dict:
    for name, val in dict(B=B, T=T, D=D, N=N, K=K, R=R, L=L, V=V).items():
        if int(val) != val or val < (0 if name == "L" else 1):
            raise ValueError(f"step_flops: {name} must be a positive integer, got {val!r}")
    BT = B * T
    W = 2 * N + R
    c: dict[str, int] = {}
    shapes: list[tuple[int, int, int]] = []

    def add(key: str, flops: int) -> None:
        c[key] = c.get(key, 0) + int(flops)

    def mm(key: str, m: int, k: int, n: int) -> None:
        add(key, _mm(m, k, n))
        shapes.append((m, k, n))

    # ------------------------------------------------------------------ forward
    # embedding: r0 = E[ids] is a gather: 0 FLOPs.
    for _ in range(L):
        # causal depthwise conv: pre = conv_b + sum_k conv_w[d,k]*x[t+k-K+1,d]: K mul + K add per
        # element (K-1 adds between the taps, 1 for the bias) -> 2K; zero padding is free.
        add("fwd.conv", BT * D * 2 * K)
        # u = silu(pre): 4 per element.
        add("fwd.conv", BT * D * 4)
        # [Bt|Ct|draw] = u @ x_proj_w : (BT,D)@(D,W)
        mm("fwd.matmul.x_proj", BT, D, W)
        # dt = draw @ dt_proj_w : (BT,R)@(R,D)
        mm("fwd.matmul.dt_proj", BT, R, D)
        # A = -exp(A_log): 1 per (d,n) (the negation folds into the next multiply).
        add("fwd.scan", D * N)
        # per (b,t,d): delta = softplus(dt + dt_proj_b): 1 add + 2; delta*u: 1;
        #              y += D_skip*u: 2 (mul, add)                                   -> 6
        add("fwd.scan", BT * D * 6)
        # per (b,t,d,n): delta*A 1, exp 1, exp(.)*h_{t-1} + (delta*u)*Bt: mul + fma 3,
        #                y: h*Ct accumulated 2                                       -> 7
        add("fwd.scan", BT * D * N * 7)
        # out = y @ out_proj_w : (BT,D)@(D,D); residual r += out: 1 per element
        mm("fwd.matmul.out_proj", BT, D, D)
        add("fwd.residual", BT * D)
    # final LayerNorm (no affine), per row of D: mean D (sum) + 1 (divide), x-mean D, square+sum 2D,
    # var/D 1, +eps 1, sqrt 1, reciprocal 1, (x-mean)*rstd D                          -> 4D + 5
    add("fwd.layernorm", BT * (4 * D + 5))
    # HPN head, per token: |z|^2 2D, |P_y|^2 2D, z.P_y 2D; two sqrt, two max(.,1e-8),
    # cos = dot/(nz*np) 2; (1-cos)^2 2; sum into the mean 1                          -> 6D + 9
    add("fwd.hpn", BT * (6 * D + 9))

    # ------------------------------------------------------------------ backward
    # HPN: per token c = -2(1-cos)/n: 3; zhat = z/nz' D (one reciprocal 1 then D mul);
    # dzhat = c*Pt[y]: D (+ D to form Pt = P/np'); dzhat.zhat 2D; dzhat - (.)zhat 2D;
    # /nz' D; dz += D                                                                 -> 9D + 4
    add("bwd.hpn", BT * (9 * D + 4))
    if learnable_prototypes:
        # dP[y] += a*z + b*P[y] with a = c/(nz'*np'), b = -c*cos/np'^2: 6 scalar FLOPs + 4D
        # (two scaled rows and their sum into dP), per token.
        add("bwd.hpn", BT * (4 * D + 6))
    # LayerNorm backward, per row: a = sum dz D, b = sum dz*z 2D, two /D 2;
    # dx += rstd*(dz - a - z*b): 5D                                                   -> 8D + 2
    add("bwd.layernorm", BT * (8 * D + 2))
    for _ in range(L):
        # out_proj: dW = y^T dr (D,BT)@(BT,D), g += dW: D*D; dy = dr @ W^T (BT,D)@(D,D)
        mm("bwd.matmul.out_proj", D, BT, D)
        add("bwd.grad_accum", D * D)
        mm("bwd.matmul.out_proj", BT, D, D)
        # scan backward (model math; the recompute is in not_counted), per (b,t,d,n):
        #   g += dy*Ct 2, dCt += dy*h_t 2, dBt += g*delta*u 2, q = g*E*h_{t-1} 2, dA += delta*q 2,
        #   gB += g*Bt 2, gAq += A*q 2, g *= E 1                                            -> 15
        add("bwd.scan", BT * D * N * 15)
        # per (b,t,d): delta*u 1; du += dy*D_skip + delta*gB 4; ddelta = gAq + u*gB 2;
        #   ddt = ddelta*sigmoid(dt+dt_bias) 1 add + 3 + 1 mul; ddt += 1; dt_bias += 1; dD += dy*u 2 -> 17
        add("bwd.scan", BT * D * 17)
        # dA_log = dA*A: 1 per (d,n) (A recomputed: +1 exp per (d,n))
        add("bwd.scan", D * N * 2)
        # dt_proj: dW = draw^T ddt (R,BT)@(BT,D), g += dW: R*D; d draw = ddt @ dt_proj_w^T (BT,D)@(D,R)
        mm("bwd.matmul.dt_proj", R, BT, D)
        add("bwd.grad_accum", R * D)
        mm("bwd.matmul.dt_proj", BT, D, R)
        # x_proj: dW = u^T dxdbl (D,BT)@(BT,W), g += dW: D*W; du += dxdbl @ x_proj_w^T (BT,W)@(W,D)
        mm("bwd.matmul.x_proj", D, BT, W)
        add("bwd.grad_accum", D * W)
        mm("bwd.matmul.x_proj", BT, W, D)
        add("bwd.grad_accum", BT * D)                        # du += tmp
        # conv + SiLU backward, per (b,t,d): silu'(pre) = s*(1 + pre*(1-s)): sigmoid 3 + 4;
        #   dpre = du*silu' 1; dx[t-j] += conv_w*dpre 2K; dconv_w += x*dpre 2K; dconv_b += dpre 1
        #   -> 9 + 4K (the residual identity adds nothing: conv_backward accumulates into dr)
        add("bwd.conv", BT * D * (9 + 4 * K))
    # embedding backward: dE[ids] += dr, one add per element
    add("bwd.embedding", BT * D)

    # ------------------------------------------------------------------ optimizer
    layer_sizes = dict(conv_w=(D * K, True), conv_b=(D, False), x_proj_w=(D * W, True),
                       dt_proj_w=(R * D, True), dt_proj_b=(D, False), A_log=(D * N, False),
                       D_skip=(D, False), out_proj_w=(D * D, True))
    n_train = V * D                                           # embedding (decayed)
    n_decay = V * D
    for size, decay in layer_sizes.values():
        n_train += L * size
        n_decay += L * size if decay else 0
    if learnable_prototypes:                                   # head.prototypes (decayed)
        n_train += V * D
        n_decay += V * D
    # global grad norm: sum g^2: 2 per trainable element (+1 sqrt per step, not counted)
    add("opt.grad_norm", 2 * n_train)
    # AdamW per trainable element: g*scale 1; m = b1*m + (1-b1)*g 3; v = b2*v + (1-b2)*g*g 4;
    # m/bc1 1; sqrt(v/bc2) 2; + eps 1; divide 1; p -= lr*update 2                       -> 15
    # decoupled decay p *= (1 - lr*wd): +1 on decayed elements
    add("opt.adamw", 15 * n_train + n_decay)

    fwd = sum(v for k, v in c.items() if k.startswith("fwd."))
    bwd = sum(v for k, v in c.items() if k.startswith("bwd."))
    opt = sum(v for k, v in c.items() if k.startswith("opt."))
    matmul = sum(v for k, v in c.items() if ".matmul." in k)
    not_counted = {
        # rtrainer's scan backward recomputes delta (add + softplus: 3 per (b,t,d)) and h
        # (delta*A, exp, mul + fma: 5 per (b,t,d,n)) inside each chunk from the saved boundary state
        "scan_bwd_recompute": L * BT * D * (3 + 5 * N),
    }
    return dict(forward=fwd, backward=bwd, optimizer=opt, total=fwd + bwd + opt, matmul=matmul,
                components=dict(sorted(c.items())), not_counted=not_counted,
                params_trainable=n_train, params_decay=n_decay, matmul_shapes=shapes)


def mamba_step_flops(B: int, T: int, D: int, N: int, K: int, R: int, L: int, V: int, E: int = 2,
                     learnable_prototypes: bool = False) -> dict:
    """The same count for a stack of `mamba` blocks (docs/architecture.md, rtrainer/model.py MambaStack), with
    C = E*D inner channels: embedding, final LayerNorm, HPN head and the optimizer's embedding part
    come from step_flops(L=0); each block adds RMSNorm, in_proj, conv/x_proj/dt_proj/scan at C
    channels, the gate, out_proj, and its tensors to the optimizer. Same conventions as above; the
    gate backward's recompute of y*silu(z) and the scan recompute are in `not_counted`."""
    base = step_flops(B, T, D, N, K, R, 0, V, learnable_prototypes)
    c = dict(base["components"])
    shapes = list(base["matmul_shapes"])
    BT, C, W = B * T, E * D, 2 * N + R

    def add(key: str, flops: int) -> None:
        c[key] = c.get(key, 0) + int(flops)

    def mm(key: str, m: int, k: int, n: int) -> None:
        add(key, _mm(m, k, n))
        shapes.append((m, k, n))

    for _ in range(L):
        # forward. RMSNorm per row: sum x^2 2D, /D, +eps, sqrt, reciprocal 4, x*rstd*w 2D -> 4D + 4
        add("fwd.rmsnorm", BT * (4 * D + 4))
        mm("fwd.matmul.in_proj", BT, D, C)          # xin = xn @ W_in[:, :C]
        mm("fwd.matmul.in_proj", BT, D, C)          # zg  = xn @ W_in[:, C:]
        add("fwd.conv", BT * C * (2 * K + 4))
        mm("fwd.matmul.x_proj", BT, C, W)
        mm("fwd.matmul.dt_proj", BT, R, C)
        add("fwd.scan", C * N + BT * C * 6 + BT * C * N * 7)
        # gate: sigmoid 3, z*s 1, y*(.) 1 -> 5
        add("fwd.gate", BT * C * 5)
        mm("fwd.matmul.out_proj", BT, C, D)
        add("fwd.residual", BT * D)
        # backward
        mm("bwd.matmul.out_proj", C, BT, D)
        add("bwd.grad_accum", C * D)
        mm("bwd.matmul.out_proj", BT, D, C)
        # gate: s 3, z*s 1, dy += g*zs 2, dz += g*y*s*(1 + z*(1-s)) 7 -> 13
        add("bwd.gate", BT * C * 13)
        add("bwd.scan", BT * C * N * 15 + BT * C * 17 + C * N * 2)
        mm("bwd.matmul.dt_proj", R, BT, C)
        add("bwd.grad_accum", R * C)
        mm("bwd.matmul.dt_proj", BT, C, R)
        mm("bwd.matmul.x_proj", C, BT, W)
        add("bwd.grad_accum", C * W)
        mm("bwd.matmul.x_proj", BT, W, C)
        add("bwd.grad_accum", BT * C)
        add("bwd.conv", BT * C * (9 + 4 * K))
        # in_proj: dW = xn^T [dxin | dzg] (two (D,BT)@(BT,C)), g += dW; dxn = dxin Wx^T + dzg Wz^T
        mm("bwd.matmul.in_proj", D, BT, C)
        mm("bwd.matmul.in_proj", D, BT, C)
        add("bwd.grad_accum", D * 2 * C)
        mm("bwd.matmul.in_proj", BT, C, D)
        mm("bwd.matmul.in_proj", BT, C, D)
        add("bwd.grad_accum", BT * D)
        # RMSNorm backward per row: s = sum dout*w*x 3D, rstd^3*s/D 4, dx += rstd*w*dout - x*c 5D;
        # dw += dout*x*rstd 3 per element -> 11D + 4
        add("bwd.rmsnorm", BT * (11 * D + 4))
    sizes = [(D, False), (D * 2 * C, True), (C * K, True), (C, False), (C * W, True), (R * C, True),
             (C, False), (C * N, False), (C, False), (C * D, True)]
    n_layer = L * sum(s for s, _ in sizes)
    n_layer_decay = L * sum(s for s, d in sizes if d)
    add("opt.grad_norm", 2 * n_layer)
    add("opt.adamw", 15 * n_layer + n_layer_decay)
    fwd = sum(v for k, v in c.items() if k.startswith("fwd."))
    bwd = sum(v for k, v in c.items() if k.startswith("bwd."))
    opt = sum(v for k, v in c.items() if k.startswith("opt."))
    matmul = sum(v for k, v in c.items() if ".matmul." in k)
    not_counted = {"scan_bwd_recompute": L * BT * C * (3 + 5 * N), "gate_bwd_recompute": L * BT * C}
    return dict(forward=fwd, backward=bwd, optimizer=opt, total=fwd + bwd + opt, matmul=matmul,
                components=dict(sorted(c.items())), not_counted=not_counted,
                params_trainable=base["params_trainable"] + n_layer,
                params_decay=base["params_decay"] + n_layer_decay, matmul_shapes=shapes)


def model_flops(B, T, D, N, K, R, L, V, learnable_prototypes=False) -> int:
    """The total: model FLOPs of one training step."""
    return step_flops(B, T, D, N, K, R, L, V, learnable_prototypes)["total"]


if __name__ == "__main__":  # pragma: no cover - convenience
    import sys

    args = [int(a) for a in sys.argv[1:]] or [8, 64, 512, 16, 4, 1, 2, 8192]
    f = step_flops(*args)
    for k, v in f["components"].items():
        print(f"{k:<28} {v / 1e6:12.2f} MFLOP")
    print(f"{'total':<28} {f['total'] / 1e9:12.4f} GFLOP  (matmul {f['matmul'] / f['total']:.1%})")
