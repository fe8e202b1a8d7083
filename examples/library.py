"""rtrainer as a library: build a Net from a config dict, train it on your own batches, evaluate,
save a checkpoint and load it back. Runs in a few seconds on one core:

    python examples/library.py [OUT_DIR]

The task: predict the next token of a repeating sequence (0, 1, ..., 15, 0, 1, ...) with a random
start, so the loss falls quickly. Any (ids, targets) int64 arrays of shape (batch, seq_len) work;
a target of -1 is not scored.
"""

import sys
import tempfile
from pathlib import Path

import rtrainer  # import rtrainer before numpy: it sets the threading defaults

import numpy as np

V, B, T = 16, 8, 32
config = {
    "run": {"seed": 0},
    "model": {"layer": "mamba-lite", "d_model": 32, "d_state": 8, "base_layers": 1, "target_layers": 1,
              "vocab_size": V},
    "head": {"kind": "softmax"},
    "optim": {"lr": 1e-2, "grad_clip": 1.0},
}


def batch(rng):
    start = rng.integers(0, V, size=(B, 1))
    seq = (start + np.arange(T + 1)) % V
    return seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)


def main(out_dir: Path) -> None:
    net = rtrainer.Net.build(config)        # a dict, validated like a run file
    net.init(seed=0, init="mamba")           # or Net.load(...) to continue from a checkpoint
    opt = net.build_optimizer()               # AdamW of the [optim] section
    rng = np.random.default_rng(0)
    val = [batch(np.random.default_rng(100 + i)) for i in range(2)]

    before = net.evaluate(val)
    for step in range(60):
        ids, targets = batch(rng)
        r = rtrainer.train_step(net, opt, ids, targets, lr=1e-2, step=step)
        if step % 20 == 0:
            print(f"step {step:3d}  loss {r.loss:.4f}  grad_norm {r.grad_norm:.3f}")
    after = net.evaluate(val)
    print(f"val loss {before['loss']:.4f} -> {after['loss']:.4f}  acc {after['acc']:.3f}")

    path = rtrainer.save(net, out_dir / "model.safetensors", opt, step=60)
    loaded = rtrainer.load(path)
    again = loaded.evaluate(val)
    assert again == after, (again, after)    # the same parameters, bit for bit
    ids, _ = val[0]
    print("predicted:", loaded.predict(ids[:1, :8])[0].tolist(), "after", ids[0, :8].tolist())

    # training continues from the checkpoint: the moments and the update count come with it
    opt2 = loaded.build_optimizer()
    r = rtrainer.train_step(loaded, opt2, *batch(rng), lr=1e-2, step=60)
    print(f"saved {path}; continued one step: loss {r.loss:.4f}, optimizer updates {opt2.state()['updates']}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
