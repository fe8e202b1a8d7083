"""One flat float32 buffer for every parameter, with named views.

`ParamSpec` rows describe each tensor; `FlatParams` lays them out contiguously once and hands
out numpy views into four buffers that share the layout: parameters, gradients and the two
AdamW moments. Naming: `param_buf`, `grad_buf`, `m`, `v` are the flat 1-D buffers; `params` and
`grads` are name -> view dicts into the first two (`data` / `grad` are older names of the buffers). The optimizer and the global-norm clip are loops over flat ranges ("segments");
fixed (non-trainable) tensors are ranges the optimizer skips. Checkpoints store tensors by name,
so the layout is an implementation detail, not a file format.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    name: str                  # e.g. "layers.0.x_proj_w"
    shape: tuple               # row-major
    decay: bool = False        # weight decay applies under weight_decay_scope = "matrices"
    trainable: bool = True     # False: no gradient, no optimizer update (fixed prototypes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class FlatParams:
    """Parameters, gradients and AdamW moments in one layout."""

    def __init__(self, specs: list[ParamSpec]):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        self.specs = list(specs)
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for s in self.specs:
            # keep every tensor 16-float (64-byte) aligned inside the buffer
            off = (off + 15) // 16 * 16
            self.offsets[s.name] = (off, off + s.size)
            off += s.size
        self.size = off
        self.param_buf = np.zeros(self.size, np.float32)
        self.grad_buf = np.zeros(self.size, np.float32)
        self.m = np.zeros(self.size, np.float32)
        self.v = np.zeros(self.size, np.float32)
        self.params = self.views(self.param_buf)
        self.grads = self.views(self.grad_buf)

    # the older names of the two buffers (kept for code written against them)
    @property
    def data(self) -> np.ndarray:
        return self.param_buf

    @property
    def grad(self) -> np.ndarray:
        return self.grad_buf

    def views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for s in self.specs:
            a, b = self.offsets[s.name]
            out[s.name] = buf[a:b].reshape(s.shape)
        return out

    def spec(self, name: str) -> ParamSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)

    def segments(self, decay_scope: str = "matrices") -> np.ndarray:
        """(S, 3) int64 rows (start, end, decay_flag) of the trainable tensors."""
        rows = []
        for s in self.specs:
            if not s.trainable:
                continue
            a, b = self.offsets[s.name]
            decay = 1 if (decay_scope == "all" or s.decay) else 0
            rows.append((a, b, decay))
        return np.array(rows, dtype=np.int64).reshape(-1, 3)

    @property
    def n_trainable(self) -> int:
        return sum(s.size for s in self.specs if s.trainable)

    def trainable_ranges(self) -> list[tuple[int, int]]:
        """The [a, b) ranges of the flat buffers that hold trainable tensors, neighbours separated
        only by alignment padding merged (computed once: which tensors train is fixed at build)."""
        if not hasattr(self, "_trainable_ranges"):
            ranges = []
            for s in self.specs:
                if s.trainable:
                    a, b = self.offsets[s.name]
                    if ranges and ranges[-1][1] >= a - 15:   # only alignment padding between them
                        ranges[-1][1] = b
                    else:
                        ranges.append([a, b])
            self._trainable_ranges = [(a, b) for a, b in ranges]
        return self._trainable_ranges

    def zero_grad(self) -> None:
        """Zero the gradients of the trainable tensors (fixed ones are never written)."""
        for a, b in self.trainable_ranges():
            self.grad_buf[a:b] = 0.0

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Everything a checkpoint needs, by name: parameters and both moments."""
        out = {}
        for prefix, buf in (("param", self.param_buf), ("adam_m", self.m), ("adam_v", self.v)):
            for name, view in self.views(buf).items():
                out[f"{prefix}/{name}"] = view
        return out

    def load_state_tensors(self, tensors: dict[str, np.ndarray], source: str = "checkpoint",
                           moments: bool = True) -> None:
        """Inverse of state_tensors; every tensor must be present with the right shape (the
        parameters only with moments=False: the moments are left as they are)."""
        from .errors import CheckpointError

        bufs = (("param", self.param_buf), ("adam_m", self.m), ("adam_v", self.v))
        for prefix, buf in bufs if moments else bufs[:1]:
            for name, view in self.views(buf).items():
                key = f"{prefix}/{name}"
                if key not in tensors:
                    raise CheckpointError(f"{source}: tensor '{key}' is missing")
                t = tensors[key]
                if tuple(t.shape) != tuple(view.shape) or t.dtype != np.float32:
                    raise CheckpointError(
                        f"{source}: tensor '{key}' has shape {tuple(t.shape)} {t.dtype}, "
                        f"the model expects {tuple(view.shape)} float32")
                view[...] = t
