"""What the trainer asks of its data: a training stream and a validation set.

Two implementations of each ship with rtrainer: token shards (:class:`rtrainer.stream.TokenStream`,
:class:`rtrainer.stream.ShardWindows`) and the synthetic tasks (:class:`rtrainer.tasks.TaskStream`,
:class:`rtrainer.tasks.TaskEval`). A subclass of the trainer may return any object with these methods
from ``build_data()``; nothing has to inherit from the classes below (structural typing).

A batch is ``(ids, targets)``: two int64 C-contiguous ``(B, T)`` arrays that the caller owns (it may
keep or modify them); a target of -1 is not scored.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, Tuple, runtime_checkable

import numpy as np

__all__ = ["Batch", "TrainStream", "ValidationSet"]

Batch = Tuple[np.ndarray, np.ndarray]


@runtime_checkable
class TrainStream(Protocol):
    """An endless, resumable sequence of training batches."""

    def next_batch(self) -> Batch:
        """The next ``(ids, targets)``; advances the cursor."""
        ...

    def state(self) -> dict[str, Any]:
        """A JSON-able cursor after the last batch returned (what a checkpoint stores)."""
        ...

    def set_state(self, d: dict[str, Any]) -> None:
        """Continue from a cursor of :meth:`state`: the following batches are the ones that came
        after it (bitwise); a :class:`~rtrainer.errors.DataError` if it does not fit this data."""
        ...

    def close(self) -> None:
        """Release workers and mappings; the stream may be used again afterwards."""
        ...


@runtime_checkable
class ValidationSet(Protocol):
    """A fixed set of batches: the same ones at every evaluation."""

    def batches(self) -> Iterable[Batch]:
        """The batches, in the same order every time."""
        ...

    def close(self) -> None:
        """Release mappings; :meth:`batches` still works afterwards."""
        ...
