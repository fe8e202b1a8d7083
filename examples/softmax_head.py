"""Swap the head: train the same mamba-lite stack with a head of your own, here a softmax
cross-entropy head in plain numpy.

    python examples/softmax_head.py examples/quickstart.toml --set train.steps=200

The head owns its parameters (a (V, D) output matrix and a bias), its loss and its gradient;
the Trainer subclass only overrides the `build_head` hook. Everything else (data, optimizer,
checkpoints, metrics, resume) is unchanged. Plain numpy: the matrix products go to BLAS.

rtrainer also has this head built in (`head.kind = "softmax"`, rtrainer.heads.SoftmaxHead: the same
maths with a fused row kernel, and targets of -1 skipped); tests/test_heads_builtin.py checks that
the two agree. This file stays the template for heads that are not built in.
"""
from __future__ import annotations

import argparse
import sys

import rtrainer  # before numpy: rtrainer sets the BLAS/OpenMP threading defaults (see its __init__)
import numpy as np
from rtrainer.heads import Head
from rtrainer.params import ParamSpec


class SoftmaxHead(Head):
    """logits = z @ W^T + b; loss = mean cross-entropy over the B*T tokens; prediction = argmax."""

    def __init__(self, vocab_size: int, d_model: int):
        self.V, self.D = vocab_size, d_model

    def param_specs(self):
        return [ParamSpec("head.W", (self.V, self.D), decay=True), ParamSpec("head.b", (self.V,))]

    def init_params(self, seed, init):
        rng = np.random.default_rng([seed, 1])
        self.p["head.W"][...] = rng.normal(0.0, self.D ** -0.5, size=(self.V, self.D))
        self.p["head.b"][...] = 0.0

    def _logits(self, z):
        logits = z @ self.p["head.W"].T
        logits += self.p["head.b"]
        return logits

    def forward(self, z, targets):
        self.z, self.t = z, targets.reshape(-1)
        logits = self._logits(z).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        self.prob = np.exp(logp)
        return float(-logp[np.arange(self.t.size), self.t].mean())

    def backward(self, dz):
        n = self.t.size
        dlogits = self.prob
        dlogits[np.arange(n), self.t] -= 1.0
        dlogits = (dlogits / n).astype(np.float32)
        dz += dlogits @ self.p["head.W"]
        self.g["head.W"] += dlogits.T @ self.z
        self.g["head.b"] += dlogits.sum(axis=0)

    def predict(self, z):
        return self._logits(z).argmax(axis=1).astype(np.int64)


class SoftmaxTrainer(rtrainer.Trainer):
    def build_head(self, vocab_size):
        return SoftmaxHead(vocab_size, self.cfg.model.d_model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--resume", default=None)
    args = ap.parse_args(argv)
    try:
        summary = SoftmaxTrainer.from_file(args.config, args.overrides, resume=args.resume).fit()
    except rtrainer.RtrainerError as e:
        print(f"rtrainer: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"final validation: {summary['last_val']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
