"""`rtrainer export MODEL OUT_DIR`: a trained model as a self-contained directory to share.

    OUT_DIR/model.safetensors   the parameters only (no optimizer moments), by name, float32, with the
                                configuration and a checksum of every tensor in the header (the same
                                verified file format as checkpoints; any safetensors reader opens it)
    OUT_DIR/config.json         the architecture (model and head sections), parameter counts, the
                                source checkpoint and step, the last validation metrics
    OUT_DIR/tokenizer.json      the model's tokenizer (the byte tokenizer for byte-level runs; none
                                for runs on token ids without one)
    OUT_DIR/README.md           a model card: architecture, parameters, data and steps, validation,
                                the loss curve (loss_curve.png), how
                                to load and generate

The directory is written next to OUT_DIR under a temporary name and renamed into place, so OUT_DIR
is either absent, the old directory, or the complete export. A non-empty OUT_DIR is refused unless
overwrite=True. `rtrainer.load(OUT_DIR)` and `rtrainer generate OUT_DIR` read it back; the
parameters are bitwise those of the checkpoint.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .errors import ConfigError, RunIOError
from .generate import TOKENIZER_FILE, open_model
from .net import EXPORT_KIND
from .plot import loss_curve
from .runstate import EXPORT_CONFIG

EXPORT_FORMAT = "rtrainer-export"
EXPORT_SCHEMA = 1


def run_dir_of(source: str) -> Path | None:
    """The run directory a checkpoint belongs to (RUN/checkpoints/step-N), if it is one."""
    p = Path(source)
    if p.is_file():
        p = p.parent
    if p.parent.name == "checkpoints" and (p.parent.parent / "checkpoints").is_dir():
        return p.parent.parent
    return None


def run_metrics(source: str, state: dict) -> list[dict]:
    """The metrics records of the checkpoint's run up to the checkpoint (its metrics_offset bytes)."""
    import orjson

    run_dir = run_dir_of(source)
    if run_dir is None:
        return []
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            data = f.read(int(state.get("metrics_offset") or 0) or -1)
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            break          # a half-written last line
    return out


def param_counts(net) -> dict:
    specs = net.flat.specs
    groups: dict[str, int] = {}
    for s in specs:
        g = ".".join(s.name.split(".")[:2]) if s.name.startswith("layers.") else s.name.split(".")[0]
        groups[g] = groups.get(g, 0) + s.size
    return {"total": sum(s.size for s in specs), "trainable": net.flat.n_trainable, "by_group": groups}


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.5f}" if isinstance(x, float) else str(x))


def _model_card(info: dict, has_curve: bool, name: str) -> str:
    cfg = info["config"]
    m, h, d, t = cfg["model"], cfg["head"], cfg.get("data", {}), cfg.get("train", {})
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
        "rtrainer generate . --prompt 'ROMEO:' --max-new-tokens 200 --temperature 0.8 --top-k 40",
        "rtrainer eval . --data some_text.txt",
        "rtrainer inspect .",
        "```",
        "",
        "```python",
        "import rtrainer",
        "from rtrainer.infer import InferenceState",
        "net = rtrainer.load('.')               # model + head, the parameters bitwise as trained",
        "st = InferenceState(net, batch=1)      # recurrent state: constant cost per token",
        "z = st.prefill([[1, 2, 3]])            # token ids of a prompt",
        "scores = st.outputs(z)                 # (1, V) logits (softmax head) or cosines (HPN head)",
        "```",
        "",
        "`model.safetensors` holds the parameters by name (float32); `config.json` the architecture.",
        "",
    ]
    return "\n".join(lines)


def _write_tokenizer(tok, path: Path) -> dict:
    """Copy the tokenizer's file byte for byte (so its SHA-256 stays the one the run recorded), or
    save an in-memory one (bytes); returns its record."""
    from .tokenizer import file_sha256

    if tok.path and os.path.isfile(tok.path):
        shutil.copyfile(tok.path, path)
        sha = file_sha256(path)
    else:
        sha = tok.save(path)
    return {"path": TOKENIZER_FILE, "sha256": sha, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}


def export_model(model: str, out_dir: str, *, which: str = "best", overwrite: bool = False,
                 tokenizer: str | None = None) -> dict:
    """Write the export (see the module docstring); returns what config.json says."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose another directory or pass --overwrite")
    net, tok = open_model(model, which, 1, tokenizer)
    src = Path(net.source).resolve()
    if out == src or out in src.parents:
        raise ConfigError(f"{out_dir} holds the model being exported; choose another directory")
    state = net.state
    step = state.get("step") if isinstance(state.get("step"), int) else None
    metrics = run_metrics(net.source, state)
    vals = [r for r in metrics if r.get("kind") == "val"]
    config = dict(state["config"])
    config["model"] = dict(config["model"], vocab_size=int(net.model.V))
    info = {
        "format": EXPORT_FORMAT,
        "schema": EXPORT_SCHEMA,
        "architecture": {"model": config["model"], "head": config["head"]},
        "parameters": param_counts(net),
        "step": step,
        "source": str(src),
        "tokenizer": ("none (token ids)" if tok is None else
                      f"`{TOKENIZER_FILE}`: " + ("bytes (one token per UTF-8 byte)" if tok.is_bytes
                                                 else f"{tok.vocab_size:,} tokens")),
        "validation": {k: v for k, v in vals[-1].items() if k != "kind"} if vals else None,
        "best_step": state.get("best_step"),
        "best_val_loss": state.get("best_val_loss"),
        "config": config,
    }
    parent = out.parent
    tmp = parent / f".tmp-export-{out.name}-{secrets.token_hex(4)}"
    trash = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        record = _write_tokenizer(tok, tmp / TOKENIZER_FILE) if tok is not None else None
        ckpt.save_checkpoint(tmp / ckpt.TENSOR_FILE, dict(net.params),
                             {"kind": EXPORT_KIND, "schema": EXPORT_SCHEMA, "step": step, "config": config,
                              "best_step": info["best_step"], "best_val_loss": info["best_val_loss"],
                              "tokenizer": record})
        ckpt.write_json_atomic(tmp / EXPORT_CONFIG, info)
        has_curve = loss_curve(metrics, str(tmp / "loss_curve.png"))
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
