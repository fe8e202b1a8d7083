"""The small languages of the run file that both config validation and the runtime need, parsed
in one place with one message style: `<section>.<key> = <value>: what is wrong`.

    expansion_layout(placement, base, target)   model.placement = append | prepend | insert:N |
                                                specific:i,j,...  -> where each layer comes from
    frozen_layers(freeze, n_layers)             train.freeze = none | first:N | indices:i,j,...
                                                -> the frozen layer indices
    check_task(task, T, M, A)                   the parameters of a synthetic data.task

This module imports nothing of the package but its errors, so rtrainer.config can use it and stay
a leaf.
"""
from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["expansion_layout", "frozen_layers", "check_task"]

_PLACEMENT_RE = re.compile(r"^(append|prepend|insert:\d+|specific:\d+(,\d+)*)$")
_FREEZE_RE = re.compile(r"^(none|first:\d+|indices:\d+(,\d+)*)$")


def _indices(arg: str) -> list[int]:
    return [int(s) for s in arg.split(",")]


def expansion_layout(placement: str, base: int, target: int) -> list:
    """Layer j of the expanded model = base layer layout[j], or a new layer where layout[j] is None.
    Every inconsistency is a ConfigError naming model.placement (never a silent fallback)."""
    if not isinstance(placement, str) or not _PLACEMENT_RE.match(placement):
        raise ConfigError(f"model.placement must be append | prepend | insert:N | specific:i,j,... "
                          f"(N, i, j non-negative integers), got {placement!r}")
    kind, _, arg = placement.partition(":")
    if kind == "specific":
        idx = _indices(arg)
        if len(set(idx)) != len(idx):
            raise ConfigError(f"model.placement = {placement!r} repeats a layer index "
                              "(repeated layer indices are not allowed)")
    if target < base:
        raise ConfigError(f"model.target_layers = {target} is smaller than model.base_layers = {base}; "
                          "layers are only ever added")
    n_new = target - base
    if kind == "append":
        return list(range(base)) + [None] * n_new
    if kind == "prepend":
        return [None] * n_new + list(range(base))
    if kind == "insert":
        n = int(arg)
        if n > base:
            raise ConfigError(f"model.placement = {placement!r}: the insert position must be in [0, {base}] "
                              f"(model.base_layers = {base})")
        return list(range(n)) + [None] * n_new + list(range(n, base))
    idx = _indices(arg)
    if len(idx) != n_new:
        raise ConfigError(f"model.placement = {placement!r} lists {len(idx)} new layer positions, but "
                          f"target_layers - base_layers = {target} - {base} = {n_new}")
    bad = [i for i in idx if i >= target]
    if bad:
        raise ConfigError(f"model.placement = {placement!r}: position {bad[0]} is out of range "
                          f"[0, {target}) (model.target_layers = {target})")
    new = set(idx)
    it = iter(range(base))
    return [None if j in new else next(it) for j in range(target)]


def frozen_layers(freeze: str, n_layers: int) -> tuple:
    """train.freeze = none | first:N | indices:i,j,... -> sorted layer indices (ConfigError otherwise)."""
    if not isinstance(freeze, str) or not _FREEZE_RE.match(freeze):
        raise ConfigError(f"train.freeze must be none | first:N | indices:i,j,... (non-negative integers), "
                          f"got {freeze!r}")
    if freeze == "none":
        return ()
    kind, _, arg = freeze.partition(":")
    if kind == "first":
        n = int(arg)
        if n > n_layers:
            raise ConfigError(f"train.freeze = {freeze!r}: the model has only {n_layers} layers")
        return tuple(range(n))
    idx = _indices(arg)
    if len(set(idx)) != len(idx):
        raise ConfigError(f"train.freeze = {freeze!r} repeats a layer index (repeated layer indices are not "
                          "allowed)")
    bad = [i for i in idx if i >= n_layers]
    if bad:
        raise ConfigError(f"train.freeze = {freeze!r}: layer {bad[0]} is out of range [0, {n_layers}) "
                          f"(model.target_layers = {n_layers})")
    return tuple(sorted(idx))


def check_task(task: str, T: int, M: int, A: int, where: str = "data") -> None:
    """Preconditions of a synthetic task's parameters; raises ValueError with a message naming the keys."""
    if task == "selective_copying":
        if A < 3:
            raise ValueError(f"data.task_vocab must be >= 3 for selective_copying (noise, data, marker), got {A}")
        if M < 1:
            raise ValueError(f"data.task_tokens must be >= 1 for selective_copying, got {M}")
        if T < 2 * M + 1:
            raise ValueError(f"selective_copying needs seq_len >= 2·data.task_tokens + 1 (at least one noise "
                             f"token), got seq_len {T} and task_tokens {M}")
    elif task == "induction_heads":
        if A < 3:
            raise ValueError(f"data.task_vocab must be >= 3 for induction_heads (2 content tokens and S), got {A}")
        if T < 3:
            raise ValueError(f"induction_heads needs seq_len >= 3 (S, its successor, S), got {T}")
    else:
        raise ValueError(f"unknown data.task {task!r}")
