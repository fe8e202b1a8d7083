"""Command line: `rtrainer run CONFIG [--set section.key=value ...] [--resume PATH|auto] [--headless]`,
`rtrainer parity CONFIG [--steps N]`, `rtrainer prepare DIR` (index a shard directory),
`rtrainer launch -n K CONFIG [run flags]` (K data-parallel processes via mpirun), `rtrainer info`,
`rtrainer keys [--markdown]`.

Every error is one line on stderr starting `rtrainer: error:` and a non-zero exit code:
2 configuration or usage, 3 data or checkpoint integrity, 4 non-finite stop, 5 I/O error (disk full, permission),
6 run directory locked by another live run.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__

EPILOG = """\
exit codes: 0 finished, 2 configuration/usage error, 3 data or checkpoint integrity error,
4 non-finite loss/gradient stop, 5 I/O error (disk full, permission denied), 6 run directory in use by another run,
130/143 interrupted by SIGINT/SIGTERM (after a checkpoint). `rtrainer parity` exits 1 on a mismatch.

examples:
  rtrainer run examples/quickstart.toml
  rtrainer run examples/quickstart.toml --set train.steps=50 --set run.out_dir='"runs/try"'
  rtrainer run examples/quickstart.toml --resume auto      # continue from out_dir's latest checkpoint
  rtrainer parity examples/quickstart.toml --steps 20       # straight == paused + resumed, bitwise?
  rtrainer keys                                            # every run-file key with its default
  rtrainer keys --markdown                                 # the same as docs/run-file.md
  rtrainer prepare data/shards                             # index (and check) a shard directory once
  rtrainer launch -n 2 examples/quickstart.toml            # 2 data-parallel processes (mpirun)
  mpirun -n 2 rtrainer run examples/quickstart.toml        # the same, by hand (or srun on Slurm)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.print_usage(sys.stderr)
        print(f"rtrainer: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rtrainer", description="Train Mamba (selective state-space) models with an HPN or softmax head "
                "on the CPU, from a TOML run file.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rtrainer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="train from a TOML run file", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", metavar="CONFIG", help="the TOML run file")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a run-file key; VALUE is a TOML literal (repeatable)")
    r.add_argument("--resume", metavar="PATH|auto", default=None,
                   help="continue from a checkpoint (a checkpoints/step-N directory) or a run directory's newest "
                        "valid one; 'auto' = out_dir's newest valid checkpoint if any (corrupt ones are skipped "
                        "with a warning)")
    r.add_argument("--overwrite", action="store_true",
                   help="start from scratch even if out_dir already holds a run (its checkpoint is replaced)")
    r.add_argument("--headless", action="store_true", help="no console progress (metrics.jsonl only)")
    r.add_argument("--stop-at", type=int, metavar="STEP", default=None,
                   help="pause after STEP with a checkpoint (exit 0, stop_reason 'paused'); continue with --resume")
    q = sub.add_parser("parity", help="probe: N steps straight == N/2 + checkpoint + resume + N/2, bitwise",
                       description="Train the run file's model twice in a scratch directory: N steps straight, "
                       "and N/2 steps + checkpoint + a new trainer resuming to N. Parameters, moments, optimizer "
                       "state, data cursor, RNG and metrics must agree bitwise; then a checkpoint round trip must "
                       "too. Prints the first difference and exits 1 on a mismatch.")
    q.add_argument("config", metavar="CONFIG", help="the TOML run file (its out_dir is not touched)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a run-file key (repeatable)")
    q.add_argument("--steps", type=int, default=None, help="N (default: min(train.steps, 20))")
    q.add_argument("--workdir", default=None, help="where the scratch directory is made (default: the system's)")
    pr = sub.add_parser("prepare", help="index a shard directory: build and verify its data manifest, convert "
                        "text shards to their binary cache")
    pr.add_argument("dir", metavar="DIR", help="the shard directory")
    pr.add_argument("--format", default="auto", choices=("auto", "txt", "u8", "u16", "u32", "npy"),
                    help="shard format (as data.format); auto = by extension")
    pr.add_argument("--glob", default="", help="file name pattern of the shards (as data.shard_glob)")
    pr.add_argument("--rebuild", action="store_true", help="rebuild the manifest from scratch")
    la = sub.add_parser("launch", help="train on K data-parallel processes of this machine (runs mpirun)",
                        description="Run `mpirun -n K rtrainer run CONFIG [run flags]` with each rank bound to "
                        "cores // K cores. train.batch_size stays the global batch of one step.")
    la.add_argument("-n", "--np", dest="n", type=int, required=True, metavar="K", help="number of processes")
    la.add_argument("--mpi-arg", dest="mpi_args", action="append", default=[], metavar="ARG",
                    help="an extra mpirun argument (repeatable), e.g. --mpi-arg=--mca --mpi-arg=btl --mpi-arg=self,tcp")
    la.add_argument("--dry-run", action="store_true", help="print the mpirun command instead of running it")
    la.add_argument("config", metavar="CONFIG", help="the TOML run file")
    la.add_argument("run_args", nargs=argparse.REMAINDER, metavar="...",
                    help="flags of `rtrainer run` (--set, --resume, --overwrite, --headless, --stop-at)")
    sub.add_parser("info", help="build and machine information (OpenMP, threads, BLAS)")
    k = sub.add_parser("keys", help="list every run-file key with its default and meaning")
    k.add_argument("--markdown", action="store_true",
                   help="print the run-file reference in Markdown instead (what docs/run-file.md holds)")
    return p


def main(argv=None) -> int:
    code = _main(argv)
    _leave_mpi(code)
    return code


def _leave_mpi(code: int) -> None:
    """A rank of a multi-process job that stops with an error leaves at once (os._exit): a normal
    exit would run MPI_Finalize, which waits for the other ranks - still inside a collective - and the
    job would hang. mpirun / srun see the non-zero exit and stop the others within seconds."""
    mpi = sys.modules.get("mpi4py.MPI")
    if code and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(argv=None) -> int:
    try:
        return _run(argv)
    except (Exception, KeyboardInterrupt):   # a bug, or an interrupt outside the training loop
        if sys.modules.get("mpi4py.MPI") is None:
            raise
        import traceback

        traceback.print_exc()
        _leave_mpi(1)
        raise


def _run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    from .errors import RtrainerError

    try:
        if args.command == "run":
            from .trainer import Trainer

            Trainer.from_file(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                              console=not args.headless, stop_at=args.stop_at).fit()
        elif args.command == "launch":
            from .launch import launch

            return launch(args.n, args.config, args.run_args, mpi_args=args.mpi_args, dry_run=args.dry_run)
        elif args.command == "parity":
            from .probe import ParityMismatch, config_for_probe, run_parity

            try:
                run_parity(config_for_probe(args.config, args.overrides), steps=args.steps, workdir=args.workdir)
            except ParityMismatch as e:
                print(f"parity: FAILED: {e}", file=sys.stderr)
                return 1
            print("parity: OK")
        elif args.command == "prepare":
            _prepare(args)
        elif args.command == "info":
            _info()
        elif args.command == "keys" and args.markdown:
            from .docgen import runfile_markdown

            sys.stdout.write(runfile_markdown())
        elif args.command == "keys":
            from .config import describe_keys

            for section, key, default, doc in describe_keys():
                print(f"{section}.{key} = {default!r}\n    {doc}")
    except RtrainerError as e:
        _print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("rtrainer: interrupted", file=sys.stderr)
        return 130
    return 0


def _print_error(e) -> None:
    """One line. Under a launcher every rank validates the same run file, so a configuration error
    is printed by rank 0 only; any other error names the rank it happened on."""
    from .distributed import detect_launcher
    from .errors import ConfigError, NonFiniteError

    launcher = detect_launcher()
    if launcher.size > 1 and launcher.rank > 0:
        # stops every rank decides together (a signal, a non-finite step): rank 0's line says it
        if isinstance(e, NonFiniteError) or getattr(e, "agreed", False):
            return
        if isinstance(e, ConfigError) and not getattr(e, "rank_local", False):
            # rank 0 reports it (and its exit makes the launcher stop this rank): wait for that, and
            # report it here only if it has not happened after a while
            import time

            time.sleep(10.0)
        print(f"rtrainer: error: rank {launcher.rank}: {e}", file=sys.stderr, flush=True)
        return
    print(f"rtrainer: error: {e}", file=sys.stderr, flush=True)


def _prepare(args) -> None:
    from .shards import prepare_dir

    m = prepare_dir(args.dir, args.format, args.glob, rebuild=args.rebuild, verify="full",
                    say=lambda msg: print(msg, file=sys.stderr))
    n = sum(e["tokens"] for e in m["shards"])
    top = max(e["max_id"] for e in m["shards"])
    print(f"{args.dir}: {len(m['shards'])} shards, {n:,} tokens, max token id {top}; manifest verified")


def _info() -> None:
    import numpy as np
    from threadpoolctl import threadpool_info

    from . import openmp_enabled
    from ._kernels import info
    from .threads import available_cores, resolve_threads

    print(f"rtrainer {__version__}")
    print(f"openmp: {'yes' if openmp_enabled() else 'no'} (omp_get_max_threads = {info.openmp_max_threads()})")
    print(f"cores available: {available_cores()}, threads used by default: {resolve_threads(0)}")
    print(f"numpy {np.__version__}")
    from .distributed import detect_launcher

    launcher = detect_launcher()
    try:
        import mpi4py

        mpi = f"mpi4py {mpi4py.__version__}"
    except ImportError:
        mpi = "mpi4py not installed (pip install 'rtrainer[mpi]')"
    import shutil
    from pathlib import Path

    mpirun = Path(sys.executable).parent / "mpirun"
    mpirun = str(mpirun) if mpirun.exists() else (shutil.which("mpirun") or "none")
    print(f"processes: {launcher.size} (launcher: {launcher.name}, rank {launcher.rank}); {mpi}; mpirun: {mpirun}")
    for lib in threadpool_info():
        print(f"threadpool: {lib.get('user_api')} {lib.get('internal_api')} {lib.get('version')} "
              f"threads={lib.get('num_threads')} ({lib.get('filepath')})")


if __name__ == "__main__":
    sys.exit(main())
