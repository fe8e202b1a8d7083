"""What a resumed run may change, and how a change is reported.

A checkpoint records the resolved configuration of the run that wrote it. On resume:

* the sections that define the function being trained (``[model]``, ``[head]``) must be equal:
  any difference is refused (ConfigError, exit 2) naming the key, its value in the checkpoint
  and in this run. When the difference is the vocabulary inferred from the data
  (``model.vocab_size = 0``), the message says that the data changed, which is the cause.
"""
from __future__ import annotations

from .errors import ConfigError

__all__ = ["FROZEN_SECTIONS", "check_frozen"]

# config sections that define the function being trained: a resume must not change them
FROZEN_SECTIONS = ("model", "head")


def check_frozen(path: str, saved: dict, now: dict, defaults: dict, user_vocab: int) -> None:
    """Refuse a resume whose [model] or [head] differs from the checkpoint's. ``saved`` and ``now``
    are config dicts (the checkpoint's, this run's resolved one), ``defaults`` the defaults (a key
    added after the checkpoint was written stands at its default there), ``user_vocab`` the
    model.vocab_size the user gave (0 = inferred from the data)."""
    for section in FROZEN_SECTIONS:
        for key, value in now[section].items():
            was = saved.get(section, {}).get(key, defaults[section][key])
            if was == value:
                continue
            if section == "model" and key == "vocab_size" and user_vocab == 0:
                raise ConfigError(_data_changed(path, saved, now, was, value))
            raise ConfigError(
                f"cannot resume from {path}: {section}.{key} is {was!r} in the checkpoint but {value!r} in this run")


def _data_changed(path: str, saved: dict, now: dict, was, value) -> str:
    sd, nd = saved.get("data", {}), now.get("data", {})
    what = []
    for key in ("train", "val", "task"):
        a, b = sd.get(key, ""), nd.get(key, "")
        if a != b:
            what.append(f"data.{key} is {a!r} in the checkpoint but {b!r} in this run")
    cause = ("; ".join(what) + " (a different data set)") if what else "the data file changed since the checkpoint"
    return (f"cannot resume from {path}: the data is not the data of the checkpoint: {cause}; its largest token id "
            f"gives a vocabulary of {value} ids where the checkpoint's model has {was} (model.vocab_size = 0 infers "
            "it from the data)")
