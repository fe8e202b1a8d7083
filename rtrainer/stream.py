"""Window planning over shards: packed / independent / random windows, a seeded shard order,
prefetch workers, and an exact cursor. The shards themselves (files, shard directories, the
manifest, memory-mapped reading) are :mod:`rtrainer.shards`.

**Rows.** Every training row is one window of ``T + 1`` consecutive tokens of ONE shard (no
window spans two shards); a batch is the next ``B`` rows of the stream.

* packed (``data.packed = true``): rows start at ``0, T, 2T, ...`` of a shard, so row r's last
  target is row r+1's first input; every token is a target exactly once, except that when
  ``(L - 1) % T != 0`` the shard's last row is aligned to its end (start ``L - T - 1``): its first
  ``T - (L - 1) % T`` targets repeat the end of the row before it. Nothing is dropped.
* independent (``packed = false``): rows start at ``0, T+1, 2(T+1), ...`` (no token shared between
  rows); a tail of ``L % (T+1)`` tokens gets one more end-aligned row, overlapping the one before.
* random (``data.random_windows = true``): every row starts at a uniformly random position over
  all windows of all shards (nanoGPT style), drawn from the seeded generator.

Rows run through the shards in ``order``; at the end of the last shard the epoch counter
increases and (with ``shuffle_shards``) the next order is drawn from the generator. A batch may
hold the last rows of one shard (or epoch) and the first of the next.

**Shuffled windows** (``shuffle_windows``, packed or independent): the rows above stay the same
(so every token is still read once per epoch), but each shard's rows are read in a permutation
drawn from ``(window_seed, epoch, shard index)`` alone: a new order every epoch, recomputed from
the cursor on resume (nothing but the seed is stored). Consecutive batches then come from all
over the shard instead of from one stretch of it. In file order (``shuffle_windows = false``)
the rows are read ``0, 1, 2, ...``. The permutation of the shard being read is held in memory
(4 bytes per window). A cursor saved before this option existed has no ``shuffle_windows``
entry: a stream restored from it reads in file order, as that run started, and keeps writing
cursors of that kind, so every later resume of the run does too.

**Cursor** (:meth:`TokenStream.state`): JSON-able; epoch, shard order, position in it, row in the
shard, the generator state, the window order (``shuffle_windows``, ``window_seed``), the batches
delivered, and a fingerprint of the shard list. With
``prefetch_workers`` N > 0, N threads read the batches ahead into a bounded queue of
``prefetch_buffer`` batches; the batches are planned in order on the consuming thread and
delivered in that order, so the stream is the same for every N, and ``state()`` is the cursor
after the last batch *returned by next_batch*, never the read-ahead. The workers hold no state
of their own: on resume the read-ahead is simply read again.

Both classes provide the interfaces of :mod:`rtrainer.datatypes` (:class:`TokenStream` a
``TrainStream``, :class:`ShardWindows` a ``ValidationSet``).
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import DataError
from .shards import Mapper, Shard, fingerprint

__all__ = ["TokenStream", "ShardWindows"]


# =========================================================================================== planning
class _Planner:
    """Which rows (shard index, start token) come next, and the cursor. Pure index arithmetic plus
    the seeded generator: cheap, runs on the consuming thread."""

    def __init__(self, lengths: Sequence[int], T: int, mode: str, shuffle: bool, seed, window_seed: int | None = None):
        self.L = [int(x) for x in lengths]
        self.T = T
        self.mode = mode            # packed | independent | random
        self.shuffle = shuffle
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.window_seed = window_seed  # None: every shard's rows in file order
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        n = len(self.L)
        self.epoch, self.pos, self.row, self.batches = 0, 0, 0, 0
        stride = T if mode == "packed" else T + 1
        span = T if mode == "packed" else T + 1
        # rows per shard: full strides plus one end-aligned row for a tail
        used = [(L - 1) if mode == "packed" else L for L in self.L]
        self.stride = stride
        self.nfull = [u // span for u in used]
        self.nrows = [f + (1 if u % span else 0) for f, u in zip(self.nfull, used)]
        if mode == "random":
            self.cum = np.cumsum([L - T for L in self.L])  # windows per shard: starts 0..L-T-1
            self.order = tuple(range(n))
        else:
            self.order = self._draw_order()

    def _draw_order(self) -> tuple:
        n = len(self.L)
        return tuple(int(i) for i in self.rng.permutation(n)) if self.shuffle else tuple(range(n))

    def start(self, si: int, r: int) -> int:
        """Start token of row r (in file order) of shard si."""
        return r * self.stride if r < self.nfull[si] else self.L[si] - self.T - 1

    def window_order(self, si: int, epoch: int) -> np.ndarray:
        """The rows of shard si in the order epoch reads them: a permutation of 0..nrows-1 drawn
        from (window_seed, epoch, si) alone, so any cursor can recompute it (nothing to store)."""
        key = (epoch, si)
        p = self._perms.get(key)
        if p is None:
            n = self.nrows[si]
            p = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)   # 4 bytes per window
            np.random.Generator(np.random.PCG64([self.window_seed, 5, epoch, si])).shuffle(p)
            while len(self._perms) >= 4:   # the shard being planned, and the one being consumed
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = p
        return p

    def set_window_seed(self, window_seed: int | None) -> None:
        self.window_seed = window_seed
        self._perms.clear()

    def row_start(self, si: int, r: int, epoch: int) -> int:
        """Start token of the r-th row read from shard si in epoch."""
        if self.window_seed is not None and self.mode != "random":
            r = int(self.window_order(si, epoch)[r])
        return self.start(si, r)

    def next_rows(self, B: int) -> list[tuple[int, int]]:
        rows = []
        if self.mode == "random":
            g = self.rng.integers(0, int(self.cum[-1]), size=B)
            si = np.searchsorted(self.cum, g, side="right")
            for gi, s in zip(g.tolist(), si.tolist()):
                rows.append((s, gi - (int(self.cum[s - 1]) if s else 0)))
            self.batches += 1
            self.epoch = self.batches * B * self.T // max(int(sum(self.L)), 1)
            return rows
        for _ in range(B):
            si = self.order[self.pos]
            rows.append((si, self.row_start(si, self.row, self.epoch)))
            self.row += 1
            if self.row == self.nrows[si]:
                self.row = 0
                self.pos += 1
                if self.pos == len(self.order):
                    self.pos = 0
                    self.epoch += 1
                    self.order = self._draw_order()
        self.batches += 1
        return rows

    def snapshot(self) -> tuple:
        return (self.epoch, self.pos, self.row, self.batches, self.order, self.rng.bit_generator.state)

    def restore(self, snap: tuple) -> None:
        self.epoch, self.pos, self.row, self.batches, self.order, st = snap
        self.rng.bit_generator.state = st


# =========================================================================================== streams
def _read_rows(mapper: Mapper, shards: list[Shard], rows: list[tuple[int, int]], T: int):
    """(ids, targets) (B, T) int64 C-contiguous from rows of T+1 tokens."""
    B = len(rows)
    w = np.empty((B, T + 1), dtype=np.int64)
    offs = np.arange(T + 1, dtype=np.int64)
    b0 = 0
    while b0 < B:  # one gather per run of rows from the same shard
        si = rows[b0][0]
        b1 = b0 + 1
        while b1 < B and rows[b1][0] == si:
            b1 += 1
        sh = shards[si]
        a = mapper.tokens(sh)
        starts = np.fromiter((r[1] for r in rows[b0:b1]), dtype=np.int64, count=b1 - b0) + sh.lo
        if b1 - b0 == 1:
            w[b0] = a[starts[0]:starts[0] + T + 1]
        else:
            w[b0:b1] = a[starts[:, None] + offs]  # (rows, T+1) gather
        mapper.account(sh, (b1 - b0) * (T + 1) * sh.dtype.itemsize)
        b0 = b1
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


class TokenStream:
    """Training batches over shards (see the module docstring): ``next_batch()``, ``state()``,
    ``set_state(d)``, ``close()``."""

    def __init__(self, shards: list[Shard], batch_size: int, seq_len: int, *, packed: bool = True,
                 random_windows: bool = False, shuffle: bool = True, shuffle_windows: bool = False, seed: int = 0,
                 prefetch_workers: int = 0, prefetch_buffer: int = 16, name: str = "train"):
        self.shards = list(shards)
        self.B, self.T = int(batch_size), int(seq_len)
        self.name = name
        self.mode = "random" if random_windows else ("packed" if packed else "independent")
        if not self.shards:
            raise DataError(f"{name}: no shards")
        for s in self.shards:
            if len(s) < self.T + 1:
                raise DataError(f"{s.name}: {len(s)} tokens (offset {s.lo}..{s.hi}) are too few for one window of "
                                f"seq_len {self.T} (needs at least {self.T + 1}); merge it with another shard or "
                                "leave it out with data.shard_glob")
        self.seed = [int(seed), 3]
        self.shuffle = bool(shuffle)
        # random windows have no order to shuffle
        self.shuffle_windows = bool(shuffle_windows) and self.mode != "random"
        self._in_order_cursor = False   # resumed from a cursor saved before window shuffling existed
        self.workers = int(prefetch_workers)
        self.buffer = max(1, int(prefetch_buffer))
        self.fingerprint = fingerprint(self.shards)
        self._plan = _Planner([len(s) for s in self.shards], self.T, self.mode, self.shuffle, self.seed,
                              int(seed) if self.shuffle_windows else None)
        self._consumed = self._plan.snapshot()
        self._mapper = Mapper()
        self._pool: ThreadPoolExecutor | None = None
        self._queue: collections.deque = collections.deque()

    @property
    def windows_shuffled(self) -> bool:
        """Whether this stream reads each shard's windows in a shuffled order (data.shuffle_windows,
        unless it continues a cursor saved before that key existed: then in file order)."""
        return self._plan.window_seed is not None

    # ------------------------------------------------------------------ batches
    def tokens_per_epoch(self) -> int:
        return sum(len(s) for s in self.shards)

    def batches_per_epoch(self) -> float:
        return sum(self._plan.nrows) / self.B

    def _read(self, rows):
        return _read_rows(self._mapper, self.shards, rows, self.T)

    def next_rows(self) -> list[tuple[int, int]]:
        """The rows of the next batch as (shard index, start offset in the shard) without reading
        them (advances the cursor; for tests and tools)."""
        rows = self._plan.next_rows(self.B)
        self._consumed = self._plan.snapshot()
        return rows

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, targets)``, each (B, T) int64 C-contiguous; advances the cursor."""
        if self.workers == 0:
            batch = self._read(self._plan.next_rows(self.B))
            self._consumed = self._plan.snapshot()
            return batch
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="rtrainer-prefetch")
        while len(self._queue) < self.buffer:
            rows = self._plan.next_rows(self.B)
            self._queue.append((self._pool.submit(self._read, rows), self._plan.snapshot()))
        fut, snap = self._queue.popleft()
        batch = fut.result()
        self._consumed = snap
        # refill at once so the workers read while the caller computes
        rows = self._plan.next_rows(self.B)
        self._queue.append((self._pool.submit(self._read, rows), self._plan.snapshot()))
        return batch

    # ------------------------------------------------------------------ cursor
    def state(self) -> dict[str, Any]:
        """JSON-able cursor after the last batch returned by :meth:`next_batch`."""
        epoch, pos, row, batches, order, rng = self._consumed
        return {
            "kind": "shards",
            "mode": self.mode,
            "epoch": epoch,
            "shard_pos": pos,
            "row": row,
            "shard_order": list(order),
            "shard": (os.path.basename(self.shards[order[pos]].name) if self.mode != "random" else None),
            "offset": (self._plan.row_start(order[pos], row, epoch) if self.mode != "random" else None),
            "batches": batches,
            "rng": rng,
            "n_shards": len(self.shards),
            "fingerprint": self.fingerprint,
            "batch_size": self.B,
            "seq_len": self.T,
            "shuffle": self.shuffle,
            **({} if self._in_order_cursor else {"shuffle_windows": self.shuffle_windows,
                                                  "window_seed": self._plan.window_seed}),
            # the workers only read what the cursor plans; their read-ahead is not state
            "prefetch": {"workers": self.workers, "buffer": self.buffer, "worker_states": []},
        }

    def set_state(self, d: dict[str, Any]) -> None:
        """Restore a cursor from :meth:`state` (discarding any read-ahead); DataError if it does
        not fit these shards and this shape."""
        if not isinstance(d, dict):
            raise DataError(f"{self.name}: stream state must be an object, got {type(d).__name__}")
        # a cursor saved before window shuffling existed read every shard in file order: so does the
        # rest of that run, whatever data.shuffle_windows says (the order a run started with is kept)
        in_order = "shuffle_windows" not in d
        if d.get("kind") is None and "pos" in d and len(self.shards) == 1 and self.mode == "packed":
            d = self._from_packed_stream_state(d)
        if d.get("kind") != "shards":
            raise DataError(f"{self.name}: the saved stream state is of another kind ({d.get('kind')!r}); it "
                            "cannot continue this data stream")
        for key, want in (("mode", self.mode), ("n_shards", len(self.shards)), ("fingerprint", self.fingerprint),
                          ("batch_size", self.B), ("seq_len", self.T), ("shuffle", self.shuffle)):
            if d.get(key) != want:
                raise DataError(f"{self.name}: the saved stream state has {key} = {d.get(key)!r} but this run has "
                                f"{want!r} (the data or the data settings changed since the checkpoint)")
        window_seed = None
        if not in_order:
            if d.get("shuffle_windows") != self.shuffle_windows:
                raise DataError(f"{self.name}: the saved stream state has shuffle_windows = "
                                f"{d.get('shuffle_windows')!r} but this run has {self.shuffle_windows!r} (a run keeps "
                                "the window order it started with; set data.shuffle_windows to match)")
            window_seed = d.get("window_seed")
            if self.shuffle_windows and (isinstance(window_seed, bool) or not isinstance(window_seed, int)
                                         or window_seed < 0):
                raise DataError(f"{self.name}: stream state 'window_seed' must be a non-negative integer, "
                                f"got {window_seed!r}")
        vals = {}
        for key in ("epoch", "shard_pos", "row", "batches"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"{self.name}: stream state {key!r} must be a non-negative integer, got {v!r}")
            vals[key] = v
        order = d.get("shard_order")
        n = len(self.shards)
        if not isinstance(order, list) or sorted(order) != list(range(n)):
            raise DataError(f"{self.name}: stream state 'shard_order' is not a permutation of {n} shards")
        if vals["shard_pos"] >= n or vals["row"] >= self._plan.nrows[order[vals["shard_pos"]]]:
            raise DataError(f"{self.name}: stream position (shard_pos {vals['shard_pos']}, row {vals['row']}) is out "
                            "of range for these shards")
        probe = np.random.PCG64()
        try:
            probe.state = d.get("rng")
        except (TypeError, ValueError, KeyError) as e:
            raise DataError(f"{self.name}: stream state 'rng' is not a PCG64 generator state ({e})") from None
        self._drop_queue()
        snap = (vals["epoch"], vals["shard_pos"], vals["row"], vals["batches"], tuple(int(i) for i in order),
                d["rng"])
        self._in_order_cursor = in_order
        self._plan.set_window_seed(window_seed if self.shuffle_windows and not in_order else None)
        self._plan.restore(snap)
        self._consumed = self._plan.snapshot()

    def _from_packed_stream_state(self, d: dict) -> dict:
        """A cursor of the single-file packed stream of earlier versions (``pos``, ``epoch``,
        ``batches``, ``n_tokens``) -> this one: the same next window (``pos`` is a multiple of
        B*T, so row ``pos // T``)."""
        pos, n = d.get("pos"), d.get("n_tokens")
        if n is not None and n != len(self.shards[0]):
            raise DataError(f"{self.name}: stream state was saved for {n} tokens but the data has "
                            f"{len(self.shards[0])} (the data file changed since the checkpoint)")
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0 or pos % self.T:
            raise DataError(f"{self.name}: stream state 'pos' must be a non-negative multiple of seq_len, got {pos!r}")
        st = self.state()
        st.update(epoch=d.get("epoch"), shard_pos=0, row=pos // self.T, batches=d.get("batches"))
        return st

    def _drop_queue(self) -> None:
        for fut, _ in self._queue:
            fut.cancel()
        for fut, _ in self._queue:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - read-ahead being thrown away
                    pass
        self._queue.clear()

    def close(self) -> None:
        """Stop the prefetch workers and unmap the shards (the stream can be used again after)."""
        self._drop_queue()
        self._plan.restore(self._consumed)  # what was planned ahead was never delivered
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._mapper.close()


class ShardWindows:
    """Fixed validation windows over shards: the same ``n_batches`` batches at every evaluation.

    ``n_batches * B`` windows of ``T + 1`` tokens, at ``np.linspace(0, W - 1, n)`` over the
    ``W = sum(len - T)`` window positions of the shards taken in name order (so no window spans
    two shards); over one shard of L tokens the window starts are ``np.linspace(0, L - T - 1, n)``
    rounded down: evenly spread over the whole shard (windows may overlap when it is short)."""

    def __init__(self, shards: list[Shard], batch_size: int, seq_len: int, n_batches: int, name: str = "val"):
        self.B, self.T, self.n_batches = int(batch_size), int(seq_len), int(n_batches)
        self.name = name
        self.shards = [s for s in shards if len(s) >= self.T + 1]
        if not self.shards:
            total = sum(len(s) for s in shards)
            raise DataError(f"{name}: no validation shard holds one window of seq_len {self.T} (needs at least "
                            f"{self.T + 1} tokens in one shard; {len(shards)} shards, {total} tokens)")
        cum = np.cumsum([len(s) - self.T for s in self.shards])
        g = np.linspace(0, int(cum[-1]) - 1, self.n_batches * self.B).astype(np.int64)
        si = np.searchsorted(cum, g, side="right")
        self.rows = [(int(s), int(x - (cum[s - 1] if s else 0))) for x, s in zip(g, si)]
        self._mapper = Mapper()

    def __len__(self) -> int:
        return self.n_batches

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(self.n_batches):
            yield _read_rows(self._mapper, self.shards, self.rows[k * self.B:(k + 1) * self.B], self.T)

    def close(self) -> None:
        self._mapper.close()
