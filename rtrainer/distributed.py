"""Data-parallel communication: one small `Comm` interface over MPI (mpi4py), or over nothing.

A run is data-parallel when a launcher started it as one of several processes (``mpirun -n K``,
``srun``, ``rtrainer launch -n K``). Every process ("rank") holds the whole model, reads its slice of
every global batch, and after its backward passes the ranks sum their gradients with one in-place
Allreduce of the flat gradient buffer. The launcher is recognised from its environment variables
(:func:`detect_launcher`) before anything heavy is imported, so:

* a single process (no launcher, or a launcher with one process) uses :class:`LocalComm`: every
  operation is the identity, mpi4py is never imported, and training is bitwise what it was without
  any of this;
* several processes use :class:`MPIComm` over ``mpi4py.MPI.COMM_WORLD``; mpi4py is imported then,
  and only then (a ConfigError, exit 2, if it is not installed).

Everything the ranks must agree on goes through the communicator: the summed gradients, the loss
and token sums, the non-finite and stop flags (so that skip / clip / stop decisions are the same
on every rank), validation sums, and the parameter hash checked at each checkpoint.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .errors import ConfigError
from .launcher import Launcher, detect_launcher, world_size

__all__ = ["Launcher", "detect_launcher", "world_size", "threads_per_rank", "Comm", "LocalComm", "MPIComm",
           "get_comm", "param_hash", "DEFAULT_BUCKET_BYTES"]

#: Allreduce the gradient in buckets of this many bytes (0 = one call over the whole buffer).
#: Measured on loopback (bench/bench_distributed.py): one call is as fast as any bucketing there,
#: so buckets only bound the size of a single message.
DEFAULT_BUCKET_BYTES = 0


def threads_per_rank(requested: int, launcher: Launcher | None = None) -> int:
    """Kernel threads of this rank: run.threads > 0 wins, then OMP_NUM_THREADS; else the cores the
    launcher bound this rank to. A launcher that does not bind (every rank sees every core of the
    machine) gets cores / ranks-on-this-machine each, so ranks x threads never exceed the cores."""
    from .threads import available_cores, resolve_threads

    if requested and requested > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    launcher = launcher or detect_launcher()
    cores = available_cores()
    if launcher.size > 1 and launcher.local_size > 1 and cores >= (os.cpu_count() or cores):
        return max(1, cores // launcher.local_size)   # not bound: share the machine
    return resolve_threads(0)


def param_hash(buf: np.ndarray) -> str:
    """A short digest of a float32 buffer (the parameters): equal on every rank or the run is broken."""
    return hashlib.blake2b(np.ascontiguousarray(buf).view(np.uint8), digest_size=16).hexdigest()


# =========================================================================================== comms
class Comm:
    """What data-parallel training needs from the process group. Every call is collective: every
    rank makes the same calls in the same order."""

    rank: int = 0
    size: int = 1
    launcher: Launcher = Launcher("none", 1, 0, 1, 0)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def allreduce_(self, buf: np.ndarray, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> np.ndarray:
        """Sum a contiguous float32/float64 buffer over the ranks, in place; returns it."""
        return buf

    def sum(self, values):
        """Sum of a list of floats over the ranks (float64, in the order given)."""
        return [float(v) for v in values]

    def max(self, values):
        return [float(v) for v in values]

    def min(self, values):
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def bcast(self, obj, root: int = 0):
        return obj

    def bcast_array_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite a contiguous array with root's, in place."""
        return buf

    def gather(self, obj, root: int = 0):
        return [obj]

    def barrier(self) -> None:
        return None

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class LocalComm(Comm):
    """One process: every collective is the identity."""


class MPIComm(Comm):
    """The ranks of MPI_COMM_WORLD (mpi4py)."""

    def __init__(self, launcher: Launcher):
        try:
            from mpi4py import MPI  # noqa: WPS433 - imported only under a launcher with several ranks
        except ImportError as e:
            raise ConfigError(f"this process is rank {launcher.rank} of {launcher.size} ({launcher.name} launcher) "
                              f"but mpi4py cannot be imported ({e}); install it with pip install 'rtrainer[mpi]' "
                              "(or mpi4py built against the cluster's MPI)") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.launcher = launcher
        if self.size != launcher.size:
            raise ConfigError(f"the launcher says {launcher.size} processes but MPI_COMM_WORLD has {self.size}: "
                              "mpi4py is linked against another MPI than the one that launched this job")

    def allreduce_(self, buf, bucket_bytes=DEFAULT_BUCKET_BYTES):
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_ needs a contiguous buffer")
        flat = buf.reshape(-1)
        n = flat.size
        step = n if bucket_bytes <= 0 else max(1, bucket_bytes // flat.itemsize)
        if step >= n:
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
            return buf
        reqs = [self.comm.Iallreduce(self.MPI.IN_PLACE, flat[a:a + step], op=self.MPI.SUM)
                for a in range(0, n, step)]
        self.MPI.Request.Waitall(reqs)
        return buf

    def _scalars(self, values, op):
        a = np.asarray(list(values), dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=op)
        return [float(x) for x in a]

    def sum(self, values):
        return self._scalars(values, self.MPI.SUM)

    def max(self, values):
        return self._scalars(values, self.MPI.MAX)

    def min(self, values):
        return self._scalars(values, self.MPI.MIN)

    def any(self, flag):
        return self.max([1.0 if flag else 0.0])[0] > 0.0

    def bcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def bcast_array_(self, buf, root=0):
        self.comm.Bcast(buf.reshape(-1), root=root)
        return buf

    def gather(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        self.comm.Abort(code)


_COMM: Comm | None = None


def get_comm() -> Comm:
    """The process group of this process (created once): LocalComm unless a launcher started
    several processes."""
    global _COMM
    if _COMM is None:
        launcher = detect_launcher()
        _COMM = MPIComm(launcher) if launcher.size > 1 else LocalComm()
    return _COMM


# =========================================================================================== data
class RankSlice:
    """This rank's rows of every global batch of a training stream.

    The wrapped stream (TokenStream, TaskStream, ...) plans and reads the whole global (B, T) batch
    on every rank - the same deterministic planner everywhere - and this rank keeps rows
    [rank * B/K, (rank + 1) * B/K). So the global data order, the cursor (``state()``) and the
    checkpoint are the same for every K, and a run resumes at another K. The cost is that every
    rank reads K times the tokens it trains on: B * T * 8 bytes per step, small against the step's
    compute, and it keeps one planner instead of K that would have to agree. ``full_targets`` is
    the global batch's targets (every rank then knows the global scored-token count without
    communicating)."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, int(rank), int(world)
        self.full_targets = None

    def next_batch(self):
        ids, targets = self.stream.next_batch()
        self.full_targets = targets
        if self.world == 1:
            return ids, targets
        share = ids.shape[0] // self.world
        a, b = self.rank * share, (self.rank + 1) * share
        return np.ascontiguousarray(ids[a:b]), np.ascontiguousarray(targets[a:b])

    def state(self):
        return self.stream.state()

    def set_state(self, d):
        self.stream.set_state(d)

    def close(self):
        if hasattr(self.stream, "close"):
            self.stream.close()

    def __getattr__(self, name):   # tokens_per_epoch, next_rows, ... of the wrapped stream
        return getattr(self.stream, name)


class RankSliceEval:
    """This rank's rows of every fixed validation batch, in micro-batches of at most `micro` rows
    (validation needs no more memory than training); the sums over them are reduced by the caller,
    so the validation result covers every window once whatever K is."""

    def __init__(self, source, rank: int, world: int, micro: int = 0):
        self.source, self.rank, self.world, self.micro = source, int(rank), int(world), int(micro)

    def __len__(self):
        return len(self.source)

    def batches(self):
        for _, ids, targets in self.slotted_batches():
            yield ids, targets

    def slotted_batches(self):
        """(slot, ids, targets): slot = the micro-batch's place in this rank's share of its batch, so
        that sums can be kept per slot and added in one fixed order (then one process with M
        micro-batches adds exactly what M ranks with one each add)."""
        for ids, targets in self.source.batches():
            for j, (i, t) in enumerate(self._split(ids, targets)):
                yield j, i, t

    def _split(self, ids, targets):
        B = ids.shape[0]
        a, b = self.rank * B // self.world, (self.rank + 1) * B // self.world
        if a == b:
            return
        if self.world == 1 and (not self.micro or self.micro >= B):
            yield ids, targets
            return
        yield from micro_batches(np.ascontiguousarray(ids[a:b]), np.ascontiguousarray(targets[a:b]),
                                 self.micro or (b - a))

    def close(self):
        if hasattr(self.source, "close"):
            self.source.close()

    def __getattr__(self, name):
        return getattr(self.source, name)


def micro_batches(ids: np.ndarray, targets: np.ndarray, micro: int):
    """The (ids, targets) micro-batches of `micro` rows of a rank's share, in order."""
    n = ids.shape[0]
    if micro >= n:
        yield ids, targets
        return
    for a in range(0, n, micro):
        yield np.ascontiguousarray(ids[a:a + micro]), np.ascontiguousarray(targets[a:a + micro])


# =========================================================================================== the step
def forward_backward_accumulated(net, ids: np.ndarray, targets: np.ndarray, micro: int, n_global: int,
                                 scratch: dict) -> float:
    """Gradients of this rank's share of the global batch, accumulated over micro-batches of `micro`
    rows, each weighted by its scored-token count / the global batch's (`n_global`): after the
    Allreduce (a plain sum) flat.grad is the gradient of the exact global mean loss, and the
    returned value summed over the ranks is that loss. `net.forward_backward(ids, targets)` zeroes
    flat.grad and leaves one micro-batch's mean-loss gradient there. `scratch` keeps the two
    accumulation buffers between steps.

    The weighted sum is the same sequence of float32 operations for one rank with M micro-batches
    and for M ranks with one each (acc = w0*g0, then + w1*g1 ...; a two-rank Allreduce adds its two
    terms in either order, which is exact), so those two runs agree bitwise."""
    grad = net.flat.grad
    parts = list(micro_batches(ids, targets, micro))
    loss = 0.0
    if len(parts) == 1:
        n = int(np.count_nonzero(targets != -1))
        local = net.forward_backward(ids, targets)
        w = n / n_global if n_global else 0.0
        grad *= np.float32(w)
        return float(local) * w if n else 0.0
    if scratch.get("acc") is None or scratch["acc"].shape != grad.shape:
        scratch["acc"], scratch["tmp"] = np.empty_like(grad), np.empty_like(grad)
    acc, tmp = scratch["acc"], scratch["tmp"]
    first = True
    for ids_j, t_j in parts:
        n = int(np.count_nonzero(t_j != -1))
        if n == 0:
            continue   # nothing scored in this micro-batch: no loss, no gradient
        local = net.forward_backward(ids_j, t_j)
        w = n / n_global
        if first:
            np.multiply(grad, np.float32(w), out=acc)
            first = False
        else:
            np.multiply(grad, np.float32(w), out=tmp)
            acc += tmp
        loss += float(local) * w
    if first:
        acc.fill(0.0)
    grad[...] = acc
    return loss


class DataParallel:
    """The per-step agreements of a data-parallel (or accumulating) run, around rtrainer's train step.

    ``active`` is False for one process without micro-batches: then nothing here is used and the
    step is exactly the single-process one."""

    def __init__(self, comm: Comm, batch_size: int, micro_batch_size: int):
        from .config import batch_split

        self.comm = comm
        try:
            self.share, self.micro, self.accum = batch_split(batch_size, micro_batch_size, comm.size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.active = comm.size > 1 or self.accum > 1
        self.scratch: dict = {}
        self.n_global = 0

    def wrap_train(self, stream):
        return RankSlice(stream, self.comm.rank, self.comm.size) if self.comm.size > 1 or self.accum > 1 else stream

    def wrap_eval(self, source):
        if source is None or not self.active:
            return source
        return RankSliceEval(source, self.comm.rank, self.comm.size, self.micro)

    def begin_step(self, train_stream) -> None:
        """The global scored-token count of the batch just read (every rank read the whole batch)."""
        t = getattr(train_stream, "full_targets", None)
        self.n_global = int(np.count_nonzero(t != -1)) if t is not None else 0

    def forward_backward(self, net, ids, targets) -> float:
        return forward_backward_accumulated(net, ids, targets, self.micro, self.n_global, self.scratch)

    def loss_hook(self, loss: float, n_scored: int) -> float:
        return self.comm.sum([loss])[0] if self.comm.size > 1 else loss

    def bind(self, flat) -> None:
        """The ranges of the flat gradient that are summed: the trainable tensors (a fixed tensor's
        gradient is zero on every rank, so sending it would only cost bandwidth - with fixed HPN
        prototypes that is V x D floats per step)."""
        self.ranges = list(flat.trainable_ranges())
        self.grad_bytes = sum(b - a for a, b in self.ranges) * 4

    def grad_hook(self, buf: np.ndarray) -> None:
        """Sum the flat gradient over the ranks, in place (one Allreduce per contiguous trainable range)."""
        if self.comm.size == 1:
            return
        ranges = getattr(self, "ranges", None)
        if ranges is None:
            self.comm.allreduce_(buf)
            return
        for a, b in ranges:
            self.comm.allreduce_(buf[a:b])

    def agree_stop(self, signum) -> int | None:
        """The stop signal every rank acts on: the largest one any rank received (None: none)."""
        if self.comm.size == 1:
            return signum
        s = int(self.comm.max([signum or 0])[0])
        return s or None

    def check_same_params(self, flat_data: np.ndarray, step: int) -> None:
        """Every rank must hold rank 0's parameters (compared by hash at each checkpoint)."""
        if self.comm.size == 1:
            return
        mine = param_hash(flat_data)
        ok = self.comm.min([1.0 if self.comm.bcast(mine) == mine else 0.0])[0] > 0
        if not ok:
            from .errors import CheckpointError

            raise CheckpointError(f"step {step}: the parameters differ between the {self.comm.size} processes "
                                  "(hash check before the checkpoint); the run is stopped")
