"""Synthetic tasks of the Mamba paper (§4.1) as data sources: fresh random batches every step.

Each task draws its batches from a seeded numpy generator (PCG64) whose state is the stream's
cursor (:meth:`TaskStream.state` / :meth:`TaskStream.set_state`, JSON-able), so a resumed run sees
exactly the batches it would have seen. The validation set (:class:`TaskEval`) is fixed: drawn once
from its own seed. The two provide the interfaces of :mod:`rtrainer.datatypes` (``TrainStream``,
``ValidationSet``).

Batches are ``(ids, targets)``, int64 C-contiguous ``(B, T)``. Only the answer positions are scored:
every other target is ``IGNORE`` (-1), which the heads skip (loss and accuracy are averaged over the
answer positions only).

Selective copying (Mamba paper §4.1.1; the S4 repository's copying data with ``variable`` spacing),
alphabet A = ``data.task_vocab`` (16 in the paper), T = ``train.seq_len`` = L_noise + 2·M with
M = ``data.task_tokens``::

    token 0 = noise, 1 … A−2 = data, A−1 = marker
    positions 0 … L_noise+M−1 : noise, except M data tokens (uniform over 1 … A−2) at M distinct
                                positions drawn uniformly among them, kept in increasing order
    positions L_noise+M … T−1 : the M markers
    targets                   : at marker position L_noise+M+k the k-th data token, -1 elsewhere

Induction heads (Mamba paper §4.1.2), vocabulary V = ``data.task_vocab``, length T::

    content tokens uniform over 0 … V−2; the special token S = V−1 at one position p drawn
    uniformly in [0, T−3] and again at T−1 (S appears nowhere else)
    target at T−1 = the token at p+1 (the answer); -1 elsewhere
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .errors import DataError
from .grammar import check_task  # noqa: F401 - the task parameter rules live with the run-file grammar

__all__ = ["IGNORE", "TASKS", "selective_copying", "induction_heads", "make_batch", "TaskStream",
           "TaskEval", "check_task"]

#: Targets equal to IGNORE are not scored by the heads.
IGNORE = -1

#: Accepted values of ``data.task`` ("" = token files).
TASKS = ("", "selective_copying", "induction_heads")


def selective_copying(rng: np.random.Generator, B: int, T: int, M: int, A: int) -> tuple[np.ndarray, np.ndarray]:
    """One selective-copying batch (layout in the module docstring)."""
    L = T - 2 * M                                  # L_noise
    ids = np.zeros((B, T), np.int64)
    targets = np.full((B, T), IGNORE, np.int64)
    data = rng.integers(1, A - 1, size=(B, M))     # (B, M) data tokens in 1 … A−2
    # M distinct positions among the first L+M, increasing: the M smallest keys of a random order
    pos = np.sort(np.argsort(rng.random((B, L + M)), axis=1)[:, :M], axis=1)
    np.put_along_axis(ids, pos, data, axis=1)
    ids[:, L + M:] = A - 1                          # markers
    targets[:, L + M:] = data                       # answers at the marker positions
    return ids, targets


def induction_heads(rng: np.random.Generator, B: int, T: int, V: int) -> tuple[np.ndarray, np.ndarray]:
    """One induction-heads batch (layout in the module docstring)."""
    S = V - 1
    ids = rng.integers(0, V - 1, size=(B, T))       # content tokens 0 … V−2
    p = rng.integers(0, T - 2, size=B)              # p in [0, T−3]
    rows = np.arange(B)
    ids[rows, p] = S
    ids[:, T - 1] = S
    targets = np.full((B, T), IGNORE, np.int64)
    targets[:, T - 1] = ids[rows, p + 1]
    return np.ascontiguousarray(ids, dtype=np.int64), targets


def make_batch(task: str, rng: np.random.Generator, B: int, T: int, M: int, A: int):
    if task == "selective_copying":
        return selective_copying(rng, B, T, M, A)
    if task == "induction_heads":
        return induction_heads(rng, B, T, A)
    raise ValueError(f"unknown data.task {task!r}")


class TaskStream:
    """Fresh training batches of a synthetic task; the generator state is the cursor."""

    def __init__(self, task: str, batch_size: int, seq_len: int, seed: int, task_tokens: int = 8,
                 task_vocab: int = 16, name: str = "train"):
        check_task(task, seq_len, task_tokens, task_vocab)
        self.task, self.batch_size, self.seq_len = task, int(batch_size), int(seq_len)
        self.M, self.A, self.name = int(task_tokens), int(task_vocab), f"{name} ({task})"
        self.rng = np.random.Generator(np.random.PCG64([int(seed), 3]))
        self.batches = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        self.batches += 1
        return make_batch(self.task, self.rng, self.batch_size, self.seq_len, self.M, self.A)

    def state(self) -> dict[str, Any]:
        """JSON-able cursor: the PCG64 state, the batch count and the task's shape."""
        st = self.rng.bit_generator.state
        return {"task": self.task, "batches": self.batches, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "task_tokens": self.M, "task_vocab": self.A,
                "rng": {"state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
                        "has_uint32": st["has_uint32"], "uinteger": st["uinteger"]}}

    def set_state(self, d: dict[str, Any]) -> None:
        """Restore a cursor from :meth:`state`; DataError if it does not fit this task."""
        if not isinstance(d, dict):
            raise DataError(f"{self.name}: stream state must be an object, got {type(d).__name__}")
        for key, mine in (("task", self.task), ("batch_size", self.batch_size), ("seq_len", self.seq_len),
                          ("task_tokens", self.M), ("task_vocab", self.A)):
            if d.get(key) != mine:
                raise DataError(f"{self.name}: stream state was saved with {key} = {d.get(key)!r}, "
                                f"this run has {mine!r}")
        b, r = d.get("batches"), d.get("rng")
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise DataError(f"{self.name}: stream state 'batches' must be a non-negative integer, got {b!r}")
        try:
            self.rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                "has_uint32": int(r["has_uint32"]), "uinteger": int(r["uinteger"])}
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"{self.name}: stream state 'rng' is not a PCG64 state ({e})") from None
        self.batches = b

    def close(self) -> None:
        """Nothing to release (the batches are generated on the calling thread)."""


class TaskEval:
    """A fixed validation set of a synthetic task: ``n_batches`` batches drawn once from its own
    seed (independent of the training stream), the same at every evaluation."""

    def __init__(self, task: str, batch_size: int, seq_len: int, n_batches: int, seed: int,
                 task_tokens: int = 8, task_vocab: int = 16):
        check_task(task, seq_len, task_tokens, task_vocab)
        rng = np.random.Generator(np.random.PCG64([int(seed), 4, int(seq_len)]))
        self.seq_len = seq_len
        self._batches = [make_batch(task, rng, batch_size, seq_len, task_tokens, task_vocab)
                         for _ in range(n_batches)]

    def __len__(self) -> int:
        return len(self._batches)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, targets in self._batches:
            yield ids.copy(), targets.copy()

    def close(self) -> None:
        """Nothing to release (the batches are held in memory)."""
