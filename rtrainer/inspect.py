"""`rtrainer inspect PATH`: what a step checkpoint, a run directory or an export holds.

Reported: the kind of PATH, every checkpoint's verification status (its manifest and every file's
size and sha256, then the tensor checksums), and for the checkpoint shown (the one named, or a run's
newest valid one): the step, the configuration, every tensor (name, dtype, shape, L2 norm,
non-finite count), the parameter counts (total, trained, per layer), the data cursor, the best
step and validation loss. `--json` prints the same as one JSON object.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import runstate
from .errors import CheckpointError, RtrainerError
from .net import EXPORT_KIND, Net


def _tensor_rows(tensors: dict) -> list[dict]:
    rows = []
    order = {"param": 0, "adam_m": 1, "adam_v": 2}
    for name in sorted(tensors, key=lambda n: (order.get(n.split("/")[0], 0) if "/" in n else 0, n)):
        a = tensors[name]
        row = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
        if np.issubdtype(a.dtype, np.floating):
            a64 = np.asarray(a, np.float64)
            fin = np.isfinite(a64)
            row["non_finite"] = int(a64.size - np.count_nonzero(fin))
            row["norm"] = float(np.sqrt(np.sum(np.where(fin, a64, 0.0) ** 2)))
        else:
            row["non_finite"] = 0
            row["norm"] = float(np.sqrt(np.sum(np.asarray(a, np.float64) ** 2)))
        rows.append(row)
    return rows


def _counts(tensors: dict, state: dict) -> dict:
    """Parameter counts from the tensors; "trainable" from the architecture (fixed HPN prototypes)."""
    export = state.get("kind") == EXPORT_KIND
    params = {k[len("param/"):] if k.startswith("param/") else k: v for k, v in tensors.items()
              if k.startswith("param/") or export}
    out = {"total": int(sum(v.size for v in params.values())), "by_group": {}}
    for name, v in params.items():
        g = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]
        out["by_group"][g] = out["by_group"].get(g, 0) + int(v.size)
    try:
        out["trainable"] = int(Net.build(state.get("config") or {}).flat.n_trainable)
    except (RtrainerError, KeyError, TypeError, ValueError):   # a configuration this version cannot build
        out["trainable"] = None
    out["optimizer_moments"] = int(sum(v.size for k, v in tensors.items() if k.startswith(("adam_m/", "adam_v/"))))
    return out


def _checkpoint_report(path: str, kind: str) -> dict:
    tfile = os.path.join(path, ckpt.TENSOR_FILE) if os.path.isdir(path) else path
    tensors, state = ckpt.load_checkpoint(tfile)
    cfg = state.get("config") or {}
    r = {
        "path": path, "kind": "export" if state.get("kind") == EXPORT_KIND else kind,
        "step": state.get("step"),
        "optimizer_updates": state.get("optimizer_updates"),
        "skipped_steps": state.get("skipped"),
        "best_step": state.get("best_step"),
        "best_val_loss": state.get("best_val_loss"),
        "data_cursor": (state.get("data") or {}).get("train"),
        "n_threads": state.get("n_threads"),
        "elapsed_s": state.get("elapsed_s"),
        "tokenizer": state.get("tokenizer"),
        "config": cfg,
        "parameters": _counts(tensors, state),
        "tensors": _tensor_rows(tensors),
    }
    r["non_finite_tensors"] = [t["name"] for t in r["tensors"] if t["non_finite"]]
    return r


def _status(path: str) -> dict:
    try:
        ckpt.verify_step_dir(path)
        ckpt.load_checkpoint(os.path.join(path, ckpt.TENSOR_FILE))
        return {"path": path, "ok": True, "error": None}
    except CheckpointError as e:
        return {"path": path, "ok": False, "error": str(e)}


def inspect_path(path: str) -> dict:
    """The report (see the module docstring). Raises CheckpointError when PATH is none of the three,
    or is a single checkpoint that does not verify."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"not found: {path}")
    if p.is_file() or (p / ckpt.MANIFEST_FILE).exists() or p.name.startswith("step-"):
        if p.is_dir():
            ckpt.verify_step_dir(str(p))
        r = _checkpoint_report(str(p), "checkpoint")
        r["checkpoints"] = [{"path": str(p), "ok": True, "error": None}]
        return r
    if runstate.is_export_dir(p):
        r = _checkpoint_report(str(p), "export")
        r["export_config"] = ckpt.read_json(p / runstate.EXPORT_CONFIG)
        r["checkpoints"] = [{"path": str(p), "ok": True, "error": None}]
        return r
    ckpt_dir = runstate.checkpoints_dir(p)
    found = ckpt.find_checkpoints(ckpt_dir)
    if not found and not (p / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: not an rtrainer checkpoint, run directory or export")
    statuses = [dict(_status(d), step=s) for s, d in found]
    valid = [s for s in statuses if s["ok"]]
    if valid:
        r = _checkpoint_report(valid[0]["path"], "checkpoint")
    else:
        r = {"path": None, "kind": "checkpoint", "step": None, "tensors": [], "parameters": None, "config": None}
    r["run_dir"] = str(p)
    r["kind"] = "run"
    r["checkpoints"] = statuses
    best = runstate.best_step(p)
    r["best_step"] = best if best is not None else r.get("best_step")
    try:
        r["summary"] = json.loads((p / "summary.json").read_text())
    except (OSError, ValueError):
        r["summary"] = None
    return r


def _num(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.6g}" if math.isfinite(x) else str(x)
    return str(x)


def format_report(r: dict) -> str:
    L = []
    if r["kind"] == "run":
        L.append(f"run directory {r['run_dir']}")
        for c in r["checkpoints"]:
            L.append(f"  checkpoint step {c['step']:>8}  {'OK' if c['ok'] else 'INVALID: ' + str(c['error'])}")
        if not r["checkpoints"]:
            L.append("  no checkpoints")
        L.append(f"  best step {_num(r.get('best_step'))}")
        if r.get("path") is None:
            return "\n".join(L)
        L.append(f"showing {r['path']} (the newest valid checkpoint)")
    else:
        L.append(f"{r['kind']} {r['path']}: verified OK")
    L.append(f"step {_num(r['step'])}  optimizer updates {_num(r.get('optimizer_updates'))}  "
             f"skipped {_num(r.get('skipped_steps'))}  best step {_num(r.get('best_step'))}  "
             f"best val_loss {_num(r.get('best_val_loss'))}")
    if r.get("tokenizer"):
        t = r["tokenizer"]
        L.append(f"tokenizer {t.get('path')} (V = {t.get('vocab_size')}, sha256 {str(t.get('sha256'))[:12]}...)")
    if r.get("data_cursor") is not None:
        L.append(f"data cursor {json.dumps(r['data_cursor'], sort_keys=True)}")
    pc = r["parameters"]
    L.append(f"parameters {pc['total']:,} total, {_num(pc.get('trainable'))} trained; optimizer moments "
             f"{pc['optimizer_moments']:,} values")
    L.append("  " + ", ".join(f"{g} {n:,}" for g, n in pc["by_group"].items()))
    cfg = r.get("config") or {}
    for section in ("model", "head"):
        if section in cfg:
            L.append(f"[{section}] " + " ".join(f"{k}={v!r}" for k, v in cfg[section].items()))
    for section in ("train", "data"):
        if section in cfg:
            keys = {"train": ("steps", "batch_size", "seq_len"), "data": ("train", "val", "format")}[section]
            L.append(f"[{section}] " + " ".join(f"{k}={cfg[section].get(k)!r}" for k in keys if k in cfg[section]))
    L.append(f"{'tensor':<40} {'dtype':<8} {'shape':<16} {'norm':>12} non-finite")
    for t in r["tensors"]:
        L.append(f"{t['name']:<40} {t['dtype']:<8} {str(tuple(t['shape'])):<16} {t['norm']:>12.6g} {t['non_finite']}")
    if r.get("non_finite_tensors"):
        L.append("WARNING: non-finite values in " + ", ".join(r["non_finite_tensors"]))
    return "\n".join(L)
