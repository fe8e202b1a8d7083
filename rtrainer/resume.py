"""What a resumed run may change, and how a change is reported.

A checkpoint records the resolved configuration of the run that wrote it. On resume:

* the sections that define the function being trained (``[model]``, ``[head]``) must be equal:
  any difference is refused (ConfigError, exit 2) naming the key, its value in the checkpoint
  and in this run. When the difference is the vocabulary inferred from the data
  (``model.vocab_size = 0``), the message says that the data changed, which is the cause.
* the tokenizer (``data.tokenizer``) must be the checkpoint's, by SHA-256
  (:func:`rtrainer.tokenizer.check_resume`, which the Trainer calls before the sections are
  compared: another tokenizer usually changes the vocabulary too, and is the better message);
* every other setting may change; each change is applied from the resume step on and reported as
  a warning (``setting_changed`` event: key, old -> new). The data settings are checked by the
  data stream itself (a different batch shape or data set cannot continue the saved cursor).
* The learning-rate schedule is a function of the global step and of the CURRENT settings
  (optim.lr, schedule.warmup_steps, schedule.min_lr_scale, train.steps): a resumed run with a
  new train.steps continues with the cosine of the new total at the same global step, so the
  learning rate jumps once to where the new schedule is at that step (the warning gives both values).
"""
from __future__ import annotations

from .errors import ConfigError

__all__ = ["FROZEN_SECTIONS", "check_frozen", "changed_settings"]

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


# keys whose change on resume is not reported as a setting change: where the run writes (a
# checkpoint from another run directory), and the thread count (its own warning: results are then
# not bitwise those of an uninterrupted run)
_NOT_REPORTED = {("run", "out_dir"), ("run", "threads")}


def changed_settings(saved: dict, now: dict, defaults: dict, step: int) -> list[tuple[str, str, dict]]:
    """What this resumed run changes outside [model] and [head], each as (event, message, fields)
    with the old and the new value: applied from the resume step on, with a warning."""
    from .optim import lr_at

    out = []
    for section, table in now.items():
        if section in FROZEN_SECTIONS:
            continue
        for key, value in table.items():
            if (section, key) in _NOT_REPORTED:
                continue
            was = saved.get(section, {}).get(key, defaults.get(section, {}).get(key))
            if was == value:
                continue
            name = f"{section}.{key}"
            note = ""
            if name in ("train.steps", "optim.lr", "schedule.warmup_steps", "schedule.min_lr_scale"):
                old = _lr(saved, defaults, step)
                new = lr_at(step, now["optim"]["lr"], now["schedule"]["warmup_steps"], now["train"]["steps"],
                            now["schedule"]["min_lr_scale"])
                note = (f": the schedule is recomputed from the global step with the new values, so the learning "
                        f"rate of step {step + 1} is {new:.4g} instead of {old:.4g}")
            elif name == "run.seed":
                note = (": the data order and the generators continue from the checkpoint's state; the new seed "
                        "only seeds what the run creates anew")
            out.append(("setting_changed", f"resuming with {name} changed: {was!r} -> {value!r}{note}",
                        {"key": name, "old": was, "new": value}))
    return out


def _lr(cfg: dict, defaults: dict, step: int) -> float:
    from .optim import lr_at

    def g(section, key):
        return cfg.get(section, {}).get(key, defaults[section][key])

    return lr_at(step, g("optim", "lr"), g("schedule", "warmup_steps"), g("train", "steps"),
                 g("schedule", "min_lr_scale"))
