"""The run-file reference (docs/run-file.md), generated from the field metadata of rtrainer/config.py.

``rtrainer keys --markdown`` prints it; ``make docs`` writes it. tests/test_docs.py checks that the
committed file equals what this module generates, so a key added (or a doc changed) without
regenerating fails the test suite.
"""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from .config import SECTIONS, _range_text

REGENERATE = "make docs   (or: .venv/bin/rtrainer keys --markdown > docs/run-file.md)"

_INTRO = """\
# Run-file reference

<!-- Generated from the field metadata in rtrainer/config.py by `rtrainer keys --markdown`.
     Do not edit by hand: change the `doc` / `details` of the field, then run `make docs`. -->

A run file is TOML with one table per component: `[run]`, `[model]`, `[head]`, `[optim]`,
`[schedule]`, `[train]`, `[data]`, `[eval]`, `[checkpoint]`, `[log]`. Every key is optional
except `data.train` (or `data.task`); a missing key takes the default below. The files in
`examples/` are complete run files to start from.

- **Errors.** An unknown table or key, a wrong type (`"512"` for an integer, `true` for a
  number), `nan`/`inf` and a value out of range or not among the allowed values are errors that
  name the key (as `section.key`) and where the value came from. The run exits with code 2 and
  writes nothing.
- **Overrides.** `rtrainer run FILE --set section.key=value` overrides one key (repeatable). The
  value is a TOML literal: `--set train.steps=100`, `--set optim.betas=[0.9,0.95]`,
  `--set run.out_dir='"runs/b"'`; for a string key a bare word works too
  (`--set data.train=data/x.bin`). Precedence: `--set` > the file > the defaults.
- **Paths** are relative to the current directory.
- **The resolved configuration** (absolute paths, the inferred `model.vocab_size` and
  `model.dt_rank`, the thread count) is written to `config.toml` in the run directory, so a run
  can be reproduced from it.
- Keys are public: they are only ever added, never renamed or removed.
- "The Rust trainer" below is the earlier implementation of this model that rtrainer replaces;
  a few options keep its behaviour for comparison (`model.init = "reference"`,
  `optim.weight_decay_scope = "all"`, `head.normalize_prototypes = false`).

`rtrainer keys` prints the same keys with their one-line meaning.
"""

_TYPES = {"str": "string", "int": "integer", "float": "float", "bool": "boolean",
          "tuple[float, float]": "list of 2 floats", "tuple": "list of integers"}


def _toml(value: Any) -> str:
    """A default as it is written in a run file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _allowed(md) -> str:
    if md["choices"] is not None:
        return ", ".join(f"`{_toml(c)}`" for c in md["choices"])
    text = _range_text(md)
    return text.replace(">=", "≥").replace("<=", "≤") if text else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def runfile_markdown() -> str:
    """The whole of docs/run-file.md."""
    out = [_INTRO]
    for section, cls in SECTIONS.items():
        title = (cls.__doc__ or "").strip().split("\n")[0]
        title = title.split(":", 1)[1].strip() if title.startswith(f"[{section}]") else title
        out.append(f"\n## [{section}]\n\n{title[:1].upper() + title[1:]}\n")
        out.append("| key | type | default | allowed | meaning |\n|---|---|---|---|---|")
        details = []
        for f in fields(cls):
            md = f.metadata
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            typ = _TYPES.get(str(f.type), str(f.type))
            out.append(f"| `{f.name}` | {typ} | `{_cell(_toml(default))}` | {_cell(_allowed(md))} "
                       f"| {_cell(md['doc'])} |")
            if md.get("details"):
                details.append(f"- **`{section}.{f.name}`**: {md['details']}")
        if details:
            out.append("\n" + "\n".join(details))
    return "\n".join(out) + "\n"
