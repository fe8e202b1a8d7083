"""`rtrainer export MODEL OUT_DIR`: a trained model as a self-contained directory to share.

    OUT_DIR/model.safetensors   the parameters only (no optimizer moments), by name, float32, with the
                                architecture and a checksum of every tensor in the header (the same
                                verified file format as checkpoints; any safetensors reader opens it)
    OUT_DIR/config.json         the architecture (model and head sections), parameter counts, the
                                source checkpoint and step, the final validation metrics
    OUT_DIR/tokenizer.json      the run's tokenizer, when it has one (byte-level runs need none)
    OUT_DIR/README.md           a model card: architecture, parameters, data and steps, validation,
                                the loss curve (loss_curve.png, when matplotlib is installed), how
                                to load and generate

The directory is written next to OUT_DIR under a temporary name and renamed into place, so OUT_DIR
is either absent, the old directory, or the complete export. A non-empty OUT_DIR is refused unless
overwrite=True. `rtrainer.infer.load_model(OUT_DIR)` and `rtrainer generate OUT_DIR` read it back;
the parameters are bitwise those of the checkpoint.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .errors import ConfigError, RunIOError
from .infer import EXPORT_CONFIG, EXPORT_FORMAT, TOKENIZER_FILE, load_model

EXPORT_SCHEMA = 1


def run_dir_of(lm) -> Path | None:
    """The run directory a checkpoint belongs to (…/RUN/checkpoints/step-N), if it is one."""
    p = Path(lm.path)
    if p.is_file():
        p = p.parent
    if p.parent.name == "checkpoints" and (p.parent.parent / "checkpoints").is_dir():
        return p.parent.parent
    return None


def read_metrics(run_dir: Path | None) -> list[dict]:
    if run_dir is None:
        return []
    out = []
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    break          # a half-written last line
    except OSError:
        return []
    return out


def param_counts(lm) -> dict:
    total = sum(s.size for s in lm.flat.specs)
    trainable = sum(s.size for s in lm.flat.specs if s.trainable)
    groups: dict[str, int] = {}
    for s in lm.flat.specs:
        g = s.name.split(".")[0] if not s.name.startswith("layers.") else ".".join(s.name.split(".")[:2])
        groups[g] = groups.get(g, 0) + s.size
    return {"total": total, "trainable": trainable, "by_group": groups}


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.5f}" if isinstance(x, float) else str(x))


def _loss_curve(metrics: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    tr = [(r["step"], r["loss"]) for r in metrics if r.get("kind") == "train" and r.get("loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in metrics if r.get("kind") == "val" and r.get("val_loss") is not None]
    if not tr and not va:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _model_card(info: dict, has_curve: bool, name: str) -> str:
    m, h, d, t = info["config"]["model"], info["config"]["head"], info["config"].get("data", {}), info["config"].get("train", {})
    arch = (f"{m['target_layers']} x `{m['layer']}` layers, d_model {m['d_model']}, d_state {m['d_state']}, "
            f"d_conv {m['d_conv']}, dt_rank {m['dt_rank']}"
            + (f", expand {m['expand']}" if m["layer"] == "mamba" else "")
            + ("" if m.get("selective", True) else ", LTI (non-selective)")
            + f"; vocabulary {m['vocab_size']}; head `{h['kind']}`")
    pc = info["parameters"]
    val = info.get("validation") or {}
    lines = [
        f"# {name}",
        "",
        "A selective state-space (Mamba) language model trained with rtrainer.",
        "",
        "| | |", "|---|---|",
        f"| architecture | {arch} |",
        f"| parameters | {pc['total']:,} ({pc['trainable']:,} trained) |",
        f"| training data | `{d.get('train') or d.get('task') or 'n/a'}` (format {d.get('format', 'n/a')}) |",
        f"| tokenizer | {info['tokenizer']} |",
        f"| steps | {info['step']} (batch {t.get('batch_size', '?')} x {t.get('seq_len', '?')} tokens) |",
        f"| validation loss | {_fmt(val.get('val_loss'))} (step {_fmt(val.get('step'))}) |",
        f"| validation accuracy | {_fmt(val.get('val_acc'))} |",
        f"| exported from | `{info['source']}` |",
        "",
    ]
    if has_curve:
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += [
        "## Use",
        "",
        "```sh",
        "rtrainer generate . --prompt 'Once upon a time' --max-new-tokens 200 --temperature 0.8 --top-k 40",
        "rtrainer eval . --data some_text.txt",
        "rtrainer inspect .",
        "```",
        "",
        "```python",
        "from rtrainer.infer import load_model, InferenceState",
        "lm = load_model('.')                 # model + head, parameters bitwise as trained",
        "st = InferenceState(lm, batch=1)     # recurrent state: constant cost per token",
        "z = st.prefill([[1, 2, 3]])          # token ids of a prompt",
        "scores = st.outputs(z)               # (1, V) logits (softmax head) or cosines (HPN head)",
        "```",
        "",
        "`model.safetensors` holds the parameters by name (float32); `config.json` the architecture.",
        "",
    ]
    return "\n".join(lines)


def export_model(model: str, out_dir: str, *, which: str = "best", overwrite: bool = False) -> dict:
    """Write the export (see the module docstring); returns what config.json says."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose another directory or pass --overwrite")
    lm = load_model(model, which=which)
    src = Path(lm.path).resolve()
    if out.exists() and (out == src or out in src.parents):
        raise ConfigError(f"{out_dir} holds the model being exported; choose another directory")
    run_dir = run_dir_of(lm)
    metrics = [r for r in read_metrics(run_dir) if lm.step is None or r.get("step", 0) <= lm.step]
    vals = [r for r in metrics if r.get("kind") == "val"]
    last_val = {k: v for k, v in vals[-1].items() if k != "kind"} if vals else None
    tok = lm.tokenizer_path if lm.tokenizer_path and os.path.isfile(lm.tokenizer_path) else None
    if lm.tokenizer_path and tok is None:
        raise ConfigError(f"the run's tokenizer {lm.tokenizer_path} is missing")
    if tok is None:
        from .generate import text_codec
        tok_desc = "bytes (one token per UTF-8 byte)" if text_codec(lm) is not None else "none (token ids)"
    else:
        tok_desc = "`tokenizer.json`"
    info = {
        "format": EXPORT_FORMAT,
        "schema": EXPORT_SCHEMA,
        "architecture": {"model": lm.config["model"], "head": lm.config["head"]},
        "parameters": param_counts(lm),
        "step": lm.step,
        "source": str(src),
        "tokenizer": tok_desc,
        "validation": last_val,
        "best_step": lm.state.get("best_step"),
        "best_val_loss": lm.state.get("best_val_loss"),
        "config": lm.config,
    }
    parent = out.parent
    tmp = parent / f".tmp-export-{out.name}-{secrets.token_hex(4)}"
    trash = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        tensors = {name: view for name, view in lm.flat.params.items()}
        ckpt.save_checkpoint(tmp / ckpt.TENSOR_FILE, tensors,
                             {"kind": "export", "schema": EXPORT_SCHEMA, "step": lm.step, "config": lm.config,
                              "best_step": lm.state.get("best_step"), "best_val_loss": lm.state.get("best_val_loss")})
        ckpt.write_json_atomic(tmp / EXPORT_CONFIG, info)
        if tok is not None:
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        has_curve = _loss_curve(metrics, str(tmp / "loss_curve.png"))
        ckpt.write_text_atomic(tmp / "README.md", _model_card(info, has_curve, out.name))
        ckpt.fsync_dir(str(tmp))
        if out.exists():
            trash = parent / f".trash-export-{out.name}-{secrets.token_hex(4)}"
            os.rename(out, trash)
        os.rename(tmp, out)
        tmp = None
        ckpt.fsync_dir(str(parent))
    except OSError as e:
        if trash is not None and not out.exists():
            os.rename(trash, out)          # put the old export back
            trash = None
        raise RunIOError(f"cannot write the export {out_dir}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return info

