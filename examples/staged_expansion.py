"""Staged training, end to end: train 2 layers, expand to 6 (`specific:1,3,4,5`), freeze `first:2`,
continue; and, for comparison, the same 2-layer model continued for as many steps without expansion.

    .venv/bin/python examples/staged_expansion.py [--set section.key=value ...]

(the --set overrides apply to all three runs, e.g. --set train.ff=true --set train.bp_cadence=2 for
the expanded run with Forward-Forward). Prints the validation losses of the three runs.
"""
import sys

import rtrainer  # noqa: F401  (first: thread settings before numpy)
from rtrainer.metrics import read_metrics
from rtrainer.trainer import Trainer


def val_losses(out_dir):
    return [(r["step"], r["val_loss"], r["val_acc"]) for r in read_metrics(f"{out_dir}/metrics.jsonl")
            if r["kind"] == "val"]


def main(argv):
    sets = [a for a in argv if a != "--set"]
    Trainer.from_file("examples/staged_base.toml", [], overwrite=True).fit()
    Trainer.from_file("examples/staged_expand.toml", sets, overwrite=True).fit()
    # control: the 2-layer model continued for the same steps (init_from, no expansion, no freezing)
    Trainer.from_file("examples/staged_expand.toml", sets + [
        "run.out_dir=runs/staged_control", "model.target_layers=2", "model.placement=append", "train.freeze=none",
        "train.ff=false", "train.bp_cadence=1"], overwrite=True).fit()
    base = val_losses("runs/staged_base")
    print("\nstage 1 (2 layers):             " + "  ".join(f"{s}:{v:.4f}" for s, v, _ in base))
    for name, d in (("stage 2 (6 layers, first:2 frozen)", "runs/staged_expand"),
                    ("control (2 layers continued)", "runs/staged_control")):
        r = val_losses(d)
        print(f"{name}: " + "  ".join(f"{s}:{v:.4f}/{a:.3f}" for s, v, a in r))


if __name__ == "__main__":
    main(sys.argv[1:])
