"""Layer expansion and freezing, in process: placement orders, the expanded model computes the same
function as its base model, moments are carried over, new layers get gradients, frozen layers are
not differentiated, and invalid placement/freeze strings are clear errors."""
import numpy as np
import pytest

from rtrainer.errors import ConfigError
from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack, MambaStack, init_layer
from rtrainer.net import Freeze, Net
from rtrainer.params import FlatParams
from rtrainer.staged import expand_state, expansion_layout, frozen_layers

V, D, N, K, R = 11, 8, 4, 4, 1


@pytest.mark.parametrize("placement, layout", [
    ("append", [0, 1, None, None, None, None]),
    ("prepend", [None, None, None, None, 0, 1]),
    ("insert:0", [None, None, None, None, 0, 1]),
    ("insert:1", [0, None, None, None, None, 1]),
    ("insert:2", [0, 1, None, None, None, None]),
    ("specific:1,3,4,5", [0, None, 1, None, None, None]),   # the reference's example
    ("specific:5,0,2,3", [None, 0, None, None, 1, None]),
])
def test_placement_orders(placement, layout):
    assert expansion_layout(placement, 2, 6) == layout


def test_no_new_layers():
    assert expansion_layout("append", 3, 3) == [0, 1, 2]
    assert expansion_layout("insert:3", 3, 3) == [0, 1, 2]


@pytest.mark.parametrize("placement, base, target, msg", [
    ("specific:1,3,4", 2, 6, "lists 3 new layer positions, but target_layers - base_layers = 6 - 2 = 4"),
    ("specific:1,3,4,5,0", 2, 6, "lists 5 new layer positions"),
    ("specific:1,1,4,5", 2, 6, "repeats a layer index"),
    ("specific:1,3,4,6", 2, 6, "position 6 is out of range [0, 6)"),
    ("specific:0", 2, 2, "lists 1 new layer positions, but target_layers - base_layers = 2 - 2 = 0"),
    ("insert:3", 2, 6, "the insert position must be in [0, 2]"),
    ("middle", 2, 6, "model.placement must be append | prepend | insert:N | specific:i,j,..."),
    ("specific:", 2, 6, "model.placement must be"),
    ("append", 4, 2, "model.target_layers = 2 is smaller than model.base_layers = 4"),
])
def test_bad_placement(placement, base, target, msg):
    with pytest.raises(ConfigError) as e:
        expansion_layout(placement, base, target)
    assert msg in str(e.value)


def test_freeze_parse():
    assert frozen_layers("none", 6) == ()
    assert frozen_layers("first:0", 6) == ()
    assert frozen_layers("first:2", 6) == (0, 1)
    assert frozen_layers("indices:4,0,2", 6) == (0, 2, 4)
    for bad, msg in [("first:7", "the model has only 6 layers"), ("indices:1,6", "layer 6 is out of range [0, 6)"),
                     ("indices:1,1", "repeats a layer index"), ("first2", "train.freeze must be none | first:N"),
                     ("all", "train.freeze must be"), ("indices:", "train.freeze must be"),
                     ("first:-1", "train.freeze must be")]:
        with pytest.raises(ConfigError) as e:
            frozen_layers(bad, 6)
        assert msg in str(e.value) and "train.freeze" in str(e.value), bad


def _build(L, init="mamba", seed=3):
    net = Net(MambaLiteStack(V, D, N, K, R, L, scan_chunk=3), HPNHead(V, D))
    return net.model, net.head, net.flat


def _base(init="mamba"):
    model, head, flat = _build(2)
    model.init_params(5, init)
    head.init_params(5, init)
    rng = np.random.default_rng(0)
    flat.m[:] = rng.normal(size=flat.size)    # pretend the base model was trained: moments to carry
    flat.v[:] = rng.random(size=flat.size)
    return model, head, flat


@pytest.mark.parametrize("init", ["mamba", "reference"])
@pytest.mark.parametrize("placement", ["append", "prepend", "insert:1", "specific:1,3,4,5"])
def test_expanded_model_computes_the_same_function(placement, init):
    bmodel, bhead, bflat = _base(init)
    ids = np.random.default_rng(1).integers(0, V, size=(3, 7))
    targets = np.random.default_rng(2).integers(0, V, size=(3, 7))
    z0 = bmodel.forward(ids).copy()
    loss0 = bhead.forward(z0, targets)
    layout = expansion_layout(placement, 2, 6)
    model, head, flat = _build(6)
    expand_state(flat, bflat.state_tensors(), layout, init_layer, 5, init, "test")
    z1 = model.forward(ids)
    fresh = {k: np.zeros_like(v) for k, v in flat.params.items()}
    for j in range(6):
        if layout[j] is None:
            init_layer(fresh, j, np.random.default_rng([5, 7, j]), init, 6)
    assert np.array_equal(z0, z1)                       # bitwise: new layers add exactly 0
    assert head.forward(z1, targets) == loss0
    for j, b in enumerate(layout):
        for name in ("conv_w", "x_proj_w", "A_log", "D_skip", "out_proj_w"):
            key = f"layers.{j}.{name}"
            if b is None:
                assert not np.any(flat.m[slice(*flat.offsets[key])]) and not np.any(flat.v[slice(*flat.offsets[key])])
                if name == "out_proj_w":
                    assert not np.any(flat.params[key])
                else:   # the layer kind's normal initialisation (its own seeded stream), not zero
                    assert np.array_equal(flat.params[key], fresh[key]) and np.any(fresh[key]), key
            else:
                src = f"layers.{b}.{name}"
                assert np.array_equal(flat.params[key], bflat.params[src])
                for buf, bbuf in ((flat.m, bflat.m), (flat.v, bflat.v)):
                    assert np.array_equal(buf[slice(*flat.offsets[key])], bbuf[slice(*bflat.offsets[src])])
    assert np.array_equal(flat.params["embedding"], bflat.params["embedding"])
    assert np.array_equal(flat.params["head.prototypes"], bflat.params["head.prototypes"])


def test_new_layers_get_gradients_and_move():
    """out_proj_w of a new layer gets a non-zero gradient at once; after it moved, every other
    tensor of the layer does too (the reference's all-zero layers never do)."""
    from rtrainer.optim import AdamW

    bmodel, bhead, bflat = _base()
    layout = expansion_layout("specific:1,3,4,5", 2, 6)
    model, head, flat = _build(6)
    expand_state(flat, bflat.state_tensors(), layout, init_layer, 5, "mamba", "test")
    flat.m[:] = 0.0
    flat.v[:] = 0.0
    init = flat.data.copy()
    opt = AdamW(flat)
    rng = np.random.default_rng(4)
    dz = np.empty((4 * 9, D), np.float32)
    for step in range(3):
        ids, targets = rng.integers(0, V, size=(4, 9)), rng.integers(0, V, size=(4, 9))
        flat.zero_grad()
        z = model.forward(ids)
        head.forward(z, targets)
        dz.fill(0.0)
        head.backward(dz)
        model.backward(dz)
        if step == 0:
            for j in (1, 3, 4, 5):
                assert np.any(flat.grads[f"layers.{j}.out_proj_w"]), j
        opt.step(1e-2)
    for j in (1, 3, 4, 5):
        for name in ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w"):
            a, b = flat.offsets[f"layers.{j}.{name}"]
            assert not np.array_equal(flat.data[a:b], init[a:b]), (j, name)


def test_frozen_layers_are_not_differentiated_and_the_rest_is_unchanged():
    model, head, flat = _build(4)
    model.init_params(2, "mamba")
    head.init_params(2, "mamba")
    ids = np.random.default_rng(1).integers(0, V, size=(2, 6))
    targets = np.random.default_rng(2).integers(0, V, size=(2, 6))
    dz = np.empty((12, D), np.float32)

    def grads(frozen, stop, emb):
        model.frozen_layers, model.backward_stop = frozenset(frozen), stop
        flat.grad[:] = 0.0
        head.forward(model.forward(ids), targets)
        dz.fill(0.0)
        head.backward(dz)
        model.backward(dz, embedding_grad=emb)
        return {k: v.copy() for k, v in flat.grads.items()}

    full = grads((), 0, True)
    part = grads((0, 2), 0, True)       # layer 2 in the middle: dr still flows through it
    for k in full:
        if k.startswith(("layers.0.", "layers.2.")):
            for w in ("out_proj_w", "x_proj_w", "dt_proj_w"):
                assert not np.any(part[k.rsplit(".", 1)[0] + "." + w])
        else:
            assert np.array_equal(full[k], part[k]), k
    top = grads((0, 1), 2, False)       # frozen leading layers + frozen embedding: backward stops early
    for k in full:
        if k.startswith(("layers.2.", "layers.3.", "head.")):
            assert np.array_equal(full[k], top[k]), k
        else:
            assert not np.any(top[k]), k


def test_expansion_is_generic_over_layer_kinds():
    """Layers are groups of tensors `layers.{i}.*` moved by name; a kind with other tensors (here the
    shapes of the full Mamba block: norm_w, in_proj_w, out_proj_w (E*D, D)) expands the same way."""
    from rtrainer.params import ParamSpec

    E = 2

    def specs(L):
        out = [ParamSpec("embedding", (V, D))]
        for i in range(L):
            out += [ParamSpec(f"layers.{i}.norm_w", (D,)), ParamSpec(f"layers.{i}.in_proj_w", (D, 2 * E * D)),
                    ParamSpec(f"layers.{i}.D_skip", (E * D,)), ParamSpec(f"layers.{i}.out_proj_w", (E * D, D))]
        return out

    def init(views, i, rng, init, n_layers):
        for k, v in views.items():
            if k.startswith(f"layers.{i}."):
                v[...] = rng.normal(size=v.shape)

    base = FlatParams(specs(2))
    rng = np.random.default_rng(0)
    for buf in (base.data, base.m, base.v):
        buf[:] = rng.normal(size=base.size)
    flat = FlatParams(specs(5))
    expand_state(flat, base.state_tensors(), expansion_layout("insert:1", 2, 5), init, 1, "mamba", "test")
    for j, b in enumerate([0, None, None, None, 1]):
        for n in ("norm_w", "in_proj_w", "D_skip", "out_proj_w"):
            a = flat.params[f"layers.{j}.{n}"]
            if b is None:
                assert (not np.any(a)) if n == "out_proj_w" else np.any(a)
                assert not np.any(flat.m[slice(*flat.offsets[f"layers.{j}.{n}"])])
            else:
                assert np.array_equal(a, base.params[f"layers.{b}.{n}"])
                assert np.array_equal(flat.m[slice(*flat.offsets[f"layers.{j}.{n}"])],
                                      base.m[slice(*base.offsets[f"layers.{b}.{n}"])])


@pytest.mark.parametrize("surgery", ["none", "pcgrad", "orthograd", "gradnorm", "cagrad"])
def test_bp_step_combines_ff_and_bp_gradients_of_d_skip(tmp_path, surgery):
    """On a BP step the D_skip gradient that AdamW receives is b + (ff_lr/lr)·surgery(f, b), with f
    the FF gradient (rtrainer.ff) and b the backprop gradient; frozen layers get neither."""
    from conftest import tiny_config
    from rtrainer import ff, surgery as surg
    from rtrainer.config import load_config
    from rtrainer.optim import AdamW
    from rtrainer.staged import Staged
    from rtrainer.step import train_step

    cfg = load_config(tiny_config(tmp_path), [f"train.surgery={surgery}", "train.ff=true", "train.ff_lr=3e-3",
                                              "model.target_layers=3", "train.freeze=indices:1"])
    net = Net.build(cfg, V, model=MambaLiteStack(V, 16, 4, 4, 1, 3, scan_chunk=8), head=HPNHead(V, 16))
    model, flat = net.model, net.flat
    st = Staged(cfg)
    net.init(1, "mamba")
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, V, size=(2, 10)), rng.integers(0, V, size=(2, 10))
    net.forward_backward(ids, targets)
    expect = {}
    for i in (0, 2):
        b = flat.grads[f"layers.{i}.D_skip"].astype(np.float64)
        hp, hn = ff.ff_vectors(model.r[i])
        _, f = ff.ff_loss_grad(flat.params[f"layers.{i}.D_skip"], hp, hn)
        f2, _ = surg.combine(surgery, f, b)
        expect[i] = (b + (3e-3 / cfg.optim.lr) * f2).astype(np.float32)
    opt = AdamW(flat)
    before = flat.data.copy()
    r = train_step(net, opt, ids, targets, 1e-3, st, step=0)
    assert r.finite and r.extra["bp_applied"] and opt.t == 1
    for i in (0, 2):
        assert np.array_equal(flat.grads[f"layers.{i}.D_skip"], expect[i]), i
    a, b = flat.offsets["layers.1.conv_w"][0], flat.offsets["layers.1.out_proj_w"][1]
    assert np.array_equal(flat.data[a:b], before[a:b]) and not np.any(flat.grad[a:b])


def test_calibration_keeps_the_function_and_bounds_new_layer_inputs():
    """Staged.initialise on a fresh expanded run: the new layers' conv is scaled to their input's
    max (on one training batch, read without moving the stream); the function is unchanged."""
    from rtrainer.config import Config, ModelConfig, TrainConfig
    from rtrainer.shards import Shard
    from rtrainer.staged import Staged, peek
    from rtrainer.stream import TokenStream

    cfg = Config(model=ModelConfig(d_model=D, d_state=N, base_layers=2, target_layers=4, placement="append"),
                 train=TrainConfig(steps=1))
    rng = np.random.default_rng(0)
    stream = TokenStream([Shard.from_array(rng.integers(0, V, size=500))], 3, 7)
    bmodel, bhead, bflat = _build(2)
    bmodel.init_params(cfg.run.seed, "mamba")
    bmodel.p["layers.1.out_proj_w"][...] *= 300.0        # a base model with a large residual stream
    net = Net(MambaLiteStack(V, D, N, K, R, 4, scan_chunk=3), HPNHead(V, D))
    model, flat = net.model, net.flat
    st = Staged(cfg)
    expand_state(flat, bflat.state_tensors(), st.layout, init_layer, cfg.run.seed, "mamba", "test")
    before = {k: v.copy() for k, v in flat.params.items()}
    st.calibrate_new_layers(net, peek(stream))
    assert stream.state()["batches"] == 0 and stream.state()["row"] == 0
    ids, _ = stream.next_batch()
    assert np.array_equal(model.forward(ids), bmodel.forward(ids))
    for j in (2, 3):
        scale = float(np.abs(model.r[j]).max())
        assert scale > 100
        for k in before:
            if k.startswith(f"layers.{j}.conv_"):
                np.testing.assert_allclose(flat.params[k], before[k] / scale, rtol=1e-6)
            elif k.startswith(f"layers.{j}."):
                assert np.array_equal(flat.params[k], before[k])


@pytest.mark.parametrize("placement", ["append", "specific:0,2"])
def test_full_mamba_block_expands_to_the_same_function(placement):
    """model.layer = 'mamba' (MambaStack, init_mamba_layer, norm_w / in_proj_w / out_proj_w (E*D, D))
    expands through the same code: bitwise the base model's output, new layers' out_proj_w = 0."""
    def build(L):
        net = Net(MambaStack(V, D, N, K, 1, L, expand=2, scan_chunk=3), HPNHead(V, D))
        return net.model, net.head, net.flat

    bmodel, bhead, bflat = build(2)
    bmodel.init_params(5, "mamba")
    bhead.init_params(5, "mamba")
    model, head, flat = build(4)
    layout = expansion_layout(placement, 2, 4)
    expand_state(flat, bflat.state_tensors(), layout, MambaStack.layer_init, 5, "mamba", "test")
    ids = np.random.default_rng(1).integers(0, V, size=(2, 7))
    assert np.array_equal(model.forward(ids), bmodel.forward(ids))
    for j, b in enumerate(layout):
        if b is None:
            assert not np.any(flat.params[f"layers.{j}.out_proj_w"])
            assert np.any(flat.params[f"layers.{j}.in_proj_w"]) and np.any(flat.params[f"layers.{j}.norm_w"])


@pytest.mark.parametrize("layer", ["mamba-lite", "mamba"])
def test_both_layer_kinds_honour_the_freeze_mask(layer):
    """A Net with frozen layers (and embedding): the frozen tensors are not trainable, their
    gradient ranges stay zero, and every other gradient is bitwise the one of the unfrozen net."""
    def net(freeze):
        model = (MambaLiteStack(V, D, N, K, R, 4, scan_chunk=3) if layer == "mamba-lite"
                 else MambaStack(V, D, N, K, 1, 4, expand=2, scan_chunk=3))
        n = Net(model, HPNHead(V, D, learnable=True), freeze)
        n.init(2, "mamba")
        return n

    ids = np.random.default_rng(1).integers(0, V, size=(2, 6))
    targets = np.random.default_rng(2).integers(0, V, size=(2, 6))
    full = net(Freeze())
    full.forward_backward(ids, targets)
    for freeze in (Freeze(layers=(0, 2)), Freeze(layers=(0, 1), embedding=True)):
        part = net(freeze)
        part.forward_backward(ids, targets)
        for name in part.params:
            frozen = name.startswith(tuple(f"layers.{i}." for i in freeze.layers)) or (
                name == "embedding" and freeze.embedding)
            assert part.flat.spec(name).trainable is not frozen, name
            if frozen:
                assert not np.any(part.grads[name]), name
            else:
                assert np.array_equal(part.grads[name], full.grads[name]), name
        if freeze.embedding:   # the backward pass stopped above the frozen leading layers
            assert part.model.backward_stop == 2
