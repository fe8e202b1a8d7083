"""``rtrainer plot RUN_DIR... [-o FILE.png]``: the curves of one or more runs in one image.

Four panels against the step: train loss (solid) with validation loss (dashed, markers), validation
accuracy, learning rate, tokens/s. Each run has one colour, named by its directory in the legend.
Read from each run's ``metrics.jsonl`` (``kind = "train"`` and ``"val"`` records; the closing
validation of a paused or interrupted run is included). Drawn with matplotlib's Agg backend (no
display needed) and written atomically.

    plot_runs(["runs/a", "runs/b"], "curves.png") -> "curves.png"

A run directory without a ``metrics.jsonl``, or whose file holds no records or is not JSON lines, is
a :class:`~rtrainer.errors.DataError`; an output whose extension matplotlib cannot write, or whose
directory does not exist, a :class:`~rtrainer.errors.ConfigError`. Nothing is written then.
"""

from __future__ import annotations

import os
from typing import Sequence

from .errors import ConfigError, DataError, RunIOError

__all__ = ["load_run_metrics", "loss_curve", "plot_runs"]

_FORMATS = (".png", ".svg", ".pdf")


def load_run_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, val records) of a run directory's metrics.jsonl."""
    from .metrics import read_metrics

    if not os.path.isdir(run_dir):
        raise DataError(f"{run_dir}: not a run directory (it does not exist or is a file)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged a step yet)")
    try:
        recs = read_metrics(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    train = [r for r in recs if isinstance(r, dict) and r.get("kind") == "train"]
    val = [r for r in recs if isinstance(r, dict) and r.get("kind") == "val"]
    if not train and not val:
        raise DataError(f"{path}: no train or validation records to plot")
    return train, val


def _series(recs: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _labels(run_dirs: Sequence[str]) -> list[str]:
    """The shortest path tails that tell the runs apart ("run", or "a/run" and "b/run")."""
    parts = [os.path.abspath(d).strip(os.sep).split(os.sep) for d in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = [os.sep.join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [os.path.normpath(d) for d in run_dirs]


def _figure(**kw):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return matplotlib, Figure(dpi=100, layout="constrained", **kw)


def loss_curve(metrics: list[dict], path: str) -> bool:
    """One small image of a run's train and validation loss (an export's model card shows it);
    False, and nothing written, when the records hold no loss."""
    train = [r for r in metrics if isinstance(r, dict) and r.get("kind") == "train"]
    val = [r for r in metrics if isinstance(r, dict) and r.get("kind") == "val"]
    (xt, yt), (xv, yv) = _series(train, "loss"), _series(val, "val_loss")
    if not xt and not xv:
        return False
    _, fig = _figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if xt:
        ax.plot(xt, yt, lw=1.2, label="train loss")
    if xv:
        ax.plot(xv, yv, "o-", ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def plot_runs(run_dirs: Sequence[str], output: str | None = None) -> str:
    """Render the runs into ``output`` (default: RUN_DIR/plot.png for one run, ./plot.png for
    several) and return its path."""
    if not run_dirs:
        raise ConfigError("plot: give at least one run directory")
    if output is None:
        output = os.path.join(run_dirs[0], "plot.png") if len(run_dirs) == 1 else "plot.png"
    ext = os.path.splitext(output)[1].lower()
    if ext not in _FORMATS:
        raise ConfigError(f"-o {output}: the image must end in {', '.join(_FORMATS)}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ConfigError(f"-o {output}: the directory {parent} does not exist")
    runs = [(d, *load_run_metrics(d)) for d in run_dirs]   # every check before drawing anything

    matplotlib, fig = _figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True)
    ax_loss, ax_acc, ax_lr, ax_tok = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    colors = matplotlib.colormaps["tab10"].colors
    for i, ((d, train, val), label) in enumerate(zip(runs, _labels(run_dirs))):
        c = colors[i % len(colors)]
        x, y = _series(train, "loss")
        if x:
            ax_loss.plot(x, y, color=c, lw=1.2, label=f"{label} train")
        x, y = _series(val, "val_loss")
        if x:
            ax_loss.plot(x, y, color=c, lw=1.5, ls="--", marker="o", ms=3, label=f"{label} val")
        x, y = _series(val, "val_acc")
        if x:
            ax_acc.plot(x, y, color=c, lw=1.5, marker="o", ms=3, label=label)
        x, y = _series(train, "lr")
        if x:
            ax_lr.plot(x, y, color=c, lw=1.2, label=label)
        x, y = _series(train, "tokens_per_s")
        if x:
            ax_tok.plot(x, y, color=c, lw=1.0, label=label)
    for ax, title, ylabel in ((ax_loss, "loss (train solid, validation dashed)", "loss"),
                              (ax_acc, "validation accuracy", "accuracy"),
                              (ax_lr, "learning rate", "lr"), (ax_tok, "throughput", "tokens/s")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[1]:
        ax.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.suptitle("rtrainer: " + ", ".join(_labels(run_dirs)))
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp{os.getpid()}{ext}")
    try:
        fig.savefig(tmp, format=ext[1:])
        os.replace(tmp, output)
    except OSError as e:
        raise RunIOError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output
