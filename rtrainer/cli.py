"""Command line: `rtrainer run CONFIG [--set section.key=value ...] [--resume PATH|auto] [--headless]`,
`rtrainer parity CONFIG [--steps N]`, `rtrainer prepare DIR` (index a shard directory),
`rtrainer launch -n K CONFIG [run flags]` (K data-parallel processes via mpirun),
`rtrainer tokenize INPUT... --out DIR` (text -> tokenizer + shards), `rtrainer plot RUN_DIR...`,
`rtrainer info`, `rtrainer keys [--markdown]`; for trained models `rtrainer generate MODEL`,
`rtrainer eval MODEL --data PATH`, `rtrainer export MODEL OUT_DIR`, `rtrainer inspect PATH`.

Every error is one line on stderr starting `rtrainer: error:` and a non-zero exit code:
2 configuration or usage, 3 data or checkpoint integrity, 4 non-finite stop, 5 I/O error (disk full, permission),
6 run directory locked by another live run.

Console output is best effort (rtrainer/console.py): training never stops because stdout or stderr
went away. A command whose only job is printing (`keys`, `info`, `prepare`'s summary, `--dry-run`)
exits 141 (128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe) and quietly
when its stdout is closed early, e.g. `rtrainer keys | head`.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__

EPILOG = """\
exit codes: 0 finished, 2 configuration/usage error (also: a run that does not fit in memory),
3 data or checkpoint integrity error, 4 non-finite loss/gradient stop, 5 I/O error (disk full, permission
denied, read-only output), 6 run directory in use by another run, 130/143 interrupted by SIGINT/SIGTERM
(after a checkpoint; a second Ctrl-C stops at once, also 130), 141 stdout closed early (`keys | head`).
`rtrainer parity` exits 1 on a mismatch.

examples:
  rtrainer run examples/quickstart.toml
  rtrainer run examples/quickstart.toml --set train.steps=50 --set run.out_dir='"runs/try"'
  rtrainer run examples/quickstart.toml --resume auto      # continue from out_dir's latest checkpoint
  rtrainer run examples/quickstart.toml --dry-run          # the plan: parameters, memory, FLOPs, time
  rtrainer parity examples/quickstart.toml --steps 20       # straight == paused + resumed, bitwise?
  rtrainer keys                                            # every run-file key with its default
  rtrainer keys --markdown                                 # the same as docs/run-file.md
  rtrainer prepare data/shards                             # index (and check) a shard directory once
  rtrainer tokenize corpus/ --out data/tok --vocab-size 4096   # train a BPE, write train/val shards
  rtrainer plot runs/a runs/b -o curves.png                # loss, accuracy, lr, tokens/s of runs
  rtrainer launch -n 2 examples/quickstart.toml            # 2 data-parallel processes (mpirun)
  mpirun -n 2 rtrainer run examples/quickstart.toml        # the same, by hand (or srun on Slurm)
  rtrainer generate runs/quickstart --prompt 'ROMEO:' --max-new-tokens 200 --top-k 20
  rtrainer eval runs/quickstart --data examples/data/shakespeare.txt
  rtrainer export runs/quickstart exports/quickstart       # weights + config + tokenizer + model card
  rtrainer inspect runs/quickstart                         # checkpoints, their status, tensors
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
                   help="pause after STEP (>= 1) with a checkpoint (exit 0, stop_reason 'paused'); continue with "
                        "--resume")
    r.add_argument("--dry-run", action="store_true",
                   help="check the run file and the data, print the run plan (parameters, memory, FLOPs per step, "
                        "tokens per epoch, an estimated time from a short timed step) and exit without writing")
    q = sub.add_parser("parity", help="probe: N steps straight == N/2 + checkpoint + resume + N/2, bitwise",
                       description="Train the run file's model twice in a scratch directory: N steps straight, "
                       "and N/2 steps + checkpoint + a new trainer resuming to N. Parameters, moments, optimizer "
                       "state, data cursor, RNG and metrics must agree bitwise; then a checkpoint round trip must "
                       "too. Prints the first difference and exits 1 on a mismatch.")
    q.add_argument("config", metavar="CONFIG", help="the TOML run file (its out_dir is not touched)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a run-file key (repeatable)")
    q.add_argument("--steps", type=int, default=None, help="N >= 2 (default: min(train.steps, 20))")
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
    _add_tokenize(sub)
    pl = sub.add_parser("plot", help="plot train/validation loss, validation accuracy, lr and tokens/s of runs",
                        description="Render the metrics.jsonl of one or more run directories (overlaid) into one "
                        "image: train and validation loss, validation accuracy, learning rate and tokens/s "
                        "against the step.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    pl.add_argument("-o", "--output", default=None, metavar="FILE.png",
                    help="the image (.png, .svg or .pdf; default: RUN_DIR/plot.png for one run, plot.png for "
                         "several)")
    _model_commands(sub)
    sub.add_parser("info", help="build and machine information (OpenMP, threads, BLAS)")
    k = sub.add_parser("keys", help="list every run-file key with its default and meaning")
    k.add_argument("--markdown", action="store_true",
                   help="print the run-file reference in Markdown instead (what docs/run-file.md holds)")
    return p


MODEL_HELP = ("a step checkpoint (RUN/checkpoints/step-N), a run directory (its best checkpoint, or the newest "
              "with --checkpoint latest) or an export directory")


def _model_args(q, threads: bool = True) -> None:
    q.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="which checkpoint of a run directory: best validation (default; the newest if the run "
                        "never validated) or the newest that verifies")
    q.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a tokenizer.json to use instead of the model's own (its vocabulary must match the model)")
    if threads:
        q.add_argument("--threads", type=int, default=0, help="threads (0 = every core this process may use)")


def _model_commands(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a trained model (recurrent: constant cost per token)",
                       description="Sample text from a trained model, streamed as it is generated. The HPN head "
                       "samples from softmax(cos/tau) over its prototypes, the softmax head from its logits; then "
                       "--temperature, --top-k and --top-p as in nanoGPT/litgpt. Deterministic for a --seed.")
    _model_args(g)
    g.add_argument("--prompt", default=None, help="the prompt text (default: a newline)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 file")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (arg max); default 0.8")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set with probability >= P")
    g.add_argument("--num-samples", type=int, default=1, help="samples, decoded together as one batch")
    g.add_argument("--seed", type=int, default=1234, help="sample i draws from a generator seeded (seed, i)")
    g.add_argument("--tau", type=float, default=None,
                   help="HPN head: the cosine temperature, p ~ exp(cos/tau) (default 0.1)")
    e = sub.add_parser("eval", help="loss, accuracy (and bits per token/byte) of a trained model on any data")
    _model_args(e)
    e.add_argument("--data", required=True, metavar="PATH",
                   help="a token file (.bin/.npy), a shard directory, or UTF-8 text (through the model's tokenizer)")
    e.add_argument("--format", default="auto", choices=("auto", "text", "u8", "u16", "u32", "npy", "txt"),
                   help="how to read PATH; auto = shard directory, .bin/.npy token file, anything else text")
    e.add_argument("--seq-len", type=int, default=0, help="window length (default: the training seq_len)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--max-batches", type=int, default=0, help="score at most this many batches (0 = all the data)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    x = sub.add_parser("export", help="weights (safetensors, no optimizer state), config.json, tokenizer and a "
                       "model card, into a new directory")
    _model_args(x, threads=False)
    x.add_argument("out_dir", metavar="OUT_DIR", help="the export directory (must be empty or absent)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    i = sub.add_parser("inspect", help="what a checkpoint, run directory or export holds, and whether it verifies")
    i.add_argument("path", metavar="PATH", help="a step checkpoint, a run directory or an export directory")
    i.add_argument("--json", action="store_true", help="print the report as JSON")


def _check_flags(args) -> None:
    """Flag values that make no sense: one ConfigError line (exit 2) naming the flag."""
    from .config import MAX_STEPS
    from .errors import ConfigError

    if getattr(args, "stop_at", None) is not None and not 1 <= args.stop_at <= MAX_STEPS:
        raise ConfigError(f"--stop-at must be a step in [1, {MAX_STEPS}], got {args.stop_at} (the run pauses after "
                          "that step)")
    if getattr(args, "resume", None) == "auto" and getattr(args, "overwrite", False):
        # (--resume PATH --overwrite is meaningful: start out_dir over from another run's checkpoint)
        raise ConfigError("--resume auto and --overwrite cannot be used together: --resume auto continues the run in "
                          "out_dir, --overwrite starts it over; give one of them")
    if args.command == "parity" and args.steps is not None:   # (0 would silently mean the default)
        if args.steps < 2:
            raise ConfigError(f"--steps: the parity probe needs at least 2 steps, got {args.steps}")
        if args.steps > MAX_STEPS:
            raise ConfigError(f"--steps = {args.steps} is above its limit of {MAX_STEPS}")
    if getattr(args, "resume", None) == "":
        raise ConfigError("--resume needs a checkpoint path, a run directory or 'auto'")


def entry() -> None:
    """The `rtrainer` command (and `python -m rtrainer`). An interrupted run ends with os._exit
    after flushing the console: the interpreter's own shutdown resets the signal handlers, and a
    further Ctrl-C during it would end the process with a raw SIGINT status instead of 130."""
    import os

    rc = main()
    from .console import is_dead, silence

    if not is_dead(sys.stdout):
        try:   # what a command printed without flushing meets a closed pipe here, not at interpreter exit
            sys.stdout.flush()
        except BrokenPipeError:
            silence(sys.stdout)
            rc = rc or 141
        except (OSError, ValueError):
            silence(sys.stdout)
    if rc in (130, 143):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(rc)
    sys.exit(rc)


def main(argv=None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:   # a Ctrl-C that came while an error or an interrupt was being reported
        _exit_on_next_interrupt()
        _err("rtrainer: interrupted")
        code = 130
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
        _check_flags(args)
        if args.command == "run":
            from .trainer import Trainer

            trainer = Trainer.from_file(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                                        console=not args.headless, stop_at=args.stop_at)
            if args.dry_run:
                from .plan import dry_run

                dry_run(trainer, out=_out)
            else:
                trainer.fit()
        elif args.command == "launch":
            from .launch import launch

            return launch(args.n, args.config, args.run_args, mpi_args=args.mpi_args, dry_run=args.dry_run)
        elif args.command == "parity":
            from .probe import ParityMismatch, config_for_probe, run_parity

            try:
                run_parity(config_for_probe(args.config, args.overrides), steps=args.steps, workdir=args.workdir)
            except ParityMismatch as e:
                _err(f"parity: FAILED: {e}")
                return 1
            _out("parity: OK")
        elif args.command == "prepare":
            _prepare(args)
        elif args.command == "generate":
            from .generate import run_generate

            run_generate(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "export":
            from .export import export_model

            info = export_model(args.model, args.out_dir, which=args.checkpoint, overwrite=args.overwrite,
                                tokenizer=args.tokenizer)
            _out(f"exported step {info['step']} ({info['parameters']['total']:,} parameters) to {args.out_dir}")
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "tokenize":
            _tokenize(args)
        elif args.command == "plot":
            from .plot import plot_runs

            _out(plot_runs(args.runs, args.output))
        elif args.command == "info":
            _info()
        elif args.command == "keys" and args.markdown:
            from .docgen import runfile_markdown

            sys.stdout.write(runfile_markdown())
        elif args.command == "keys":
            from .config import describe_keys

            for section, key, default, doc in describe_keys():
                _out(f"{section}.{key} = {default!r}\n    {doc}")
    except RtrainerError as e:
        if e.exit_code in (130, 143):   # interrupted after a checkpoint: a further Ctrl-C ends at once
            _exit_on_next_interrupt()
        _print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        _exit_on_next_interrupt()
        _err("rtrainer: interrupted")
        return 130
    except BrokenPipeError:   # the reader of stdout went away (`rtrainer keys | head`)
        from .console import silence

        silence(sys.stdout)
        return 141
    return 0


def _out(msg: str) -> None:
    """A line of a command's output on stdout: a closed pipe raises BrokenPipeError (exit 141)."""
    print(msg, flush=True)


def _err(msg: str) -> None:
    from .console import say

    say(msg, sys.stderr)


def _exit_on_next_interrupt() -> None:
    """After an interrupt was handled, a further Ctrl-C (or SIGTERM) while the process winds down
    ends it at once with the same status, never with a raw signal status or a traceback."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        try:
            signal.signal(sig, lambda *_a, _c=code: os._exit(_c))
        except (ValueError, OSError):
            pass


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
        _err(f"rtrainer: error: rank {launcher.rank}: {e}")
        return
    _err(f"rtrainer: error: {e}")


def _json(r) -> str:
    """Strict JSON (a non-finite float is null)."""
    import json

    from .checkpoint import _nonfinite_to_none

    return json.dumps(_nonfinite_to_none(r), indent=2, default=str)


def _eval(args) -> None:
    from .evaluate import evaluate_model, format_report
    from .generate import open_model

    net, tok = open_model(args.model, args.checkpoint, args.threads, args.tokenizer)
    r = evaluate_model(net, tok, args.data, fmt=args.format, seq_len=args.seq_len, batch_size=args.batch_size,
                       max_batches=args.max_batches)
    _out(_json(r) if args.json else format_report(r))


def _inspect(args) -> None:
    from .inspect import format_report, inspect_path

    r = inspect_path(args.path)
    _out(_json(r) if args.json else format_report(r))


def _prepare(args) -> None:
    from .shards import prepare_dir

    m = prepare_dir(args.dir, args.format, args.glob, rebuild=args.rebuild, verify="full", say=_err)
    n = sum(e["tokens"] for e in m["shards"])
    top = max(e["max_id"] for e in m["shards"])
    _out(f"{args.dir}: {len(m['shards'])} shards, {n:,} tokens, max token id {top}; manifest verified")


def _add_tokenize(sub) -> None:
    from .tokenize import DEFAULT_SHARD_TOKENS, DEFAULT_VOCAB
    from .tokenizer import EOD_TOKEN

    t = sub.add_parser(
        "tokenize", help="text files -> a tokenizer (BPE, existing, or bytes) and train/val shard directories",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize UTF-8 text into DIR/train and DIR/val shard directories (u16 ids when V <= 65536, "
        "else u32, each with its data manifest), DIR/tokenizer.json and DIR/meta.json, and print the run-file "
        "lines that train on them. Each file is a document (or several, with --doc-separator); an "
        "end-of-document token follows every document; the validation split holds out whole documents.",
        epilog="examples:\n"
        "  rtrainer tokenize examples/data/shakespeare.txt --out data/shakespeare-bpe --vocab-size 2048 "
        "--doc-separator '\\n\\n'\n"
        "  rtrainer tokenize 'corpus/**/*.txt' --out data/tok --tokenizer data/shakespeare-bpe/tokenizer.json\n"
        "  rtrainer tokenize notes/ --out data/bytes --bytes --val-ratio 0.1")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories (recursive) or glob patterns")
    t.add_argument("--out", required=True, metavar="DIR", help="the output directory (must be new or empty)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help=f"train a byte-level BPE with N tokens, special tokens included (the default, N = "
                        f"{DEFAULT_VOCAB})")
    g.add_argument("--tokenizer", default=None, metavar="FILE", help="encode with this tokenizer.json instead")
    g.add_argument("--bytes", dest="use_bytes", action="store_true",
                   help="the identity byte tokenizer: id = byte value (0-255), special tokens from 256")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="BPE: a merge must occur at least N times (default 2)")
    t.add_argument("--special-token", dest="special_tokens", action="append", default=[], metavar="TOKEN",
                   help="an extra special token (repeatable)")
    e = t.add_mutually_exclusive_group()
    e.add_argument("--eod", default=EOD_TOKEN, metavar="TOKEN",
                   help=f"the end-of-document token put after every document (default {EOD_TOKEN})")
    e.add_argument("--no-eod", action="store_true", help="no end-of-document token")
    t.add_argument("--doc-separator", default=None, metavar="SEP",
                   help="split files into documents at SEP (backslash escapes: '\\n\\n' = a blank line); "
                        "default: each file is one document")
    t.add_argument("--val-ratio", type=float, default=0.05, metavar="R",
                   help="fraction of the documents held out for validation (default 0.05; 0 = none)")
    t.add_argument("--seed", type=int, default=0, help="seed of the choice of validation documents (default 0)")
    t.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (only once all is written)")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no summary (only the run-file lines)")


def _tokenize(args) -> None:
    from .tokenize import parse_separator, run_file_lines, tokenize

    say = (lambda m: None) if args.quiet else _err
    meta = tokenize(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                    use_bytes=args.use_bytes, min_frequency=args.min_frequency, special_tokens=args.special_tokens,
                    eod=None if args.no_eod else args.eod, doc_separator=parse_separator(args.doc_separator),
                    val_ratio=args.val_ratio, seed=args.seed, shard_tokens=args.shard_tokens,
                    overwrite=args.overwrite, progress=False if args.quiet else None, say=say)
    say(f"rtrainer: {args.out}: V={meta['vocab_size']} ({meta['format']}), {meta['documents']['train']:,} train / "
        f"{meta['documents']['val']:,} val documents, {meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens "
        f"from {len(meta['inputs'])} file(s), {meta['input_bytes']:,} bytes")
    say("rtrainer: run-file lines for this data:")
    _out(run_file_lines(meta, args.out))


def _info() -> None:
    import numpy as np
    from threadpoolctl import threadpool_info

    from . import openmp_enabled
    from ._kernels import info
    from .threads import available_cores, resolve_threads

    _out(f"rtrainer {__version__}")
    _out(f"openmp: {'yes' if openmp_enabled() else 'no'} (omp_get_max_threads = {info.openmp_max_threads()})")
    _out(f"cores available: {available_cores()}, threads used by default: {resolve_threads(0)}")
    _out(f"numpy {np.__version__}")
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
    _out(f"processes: {launcher.size} (launcher: {launcher.name}, rank {launcher.rank}); {mpi}; mpirun: {mpirun}")
    for lib in threadpool_info():
        _out(f"threadpool: {lib.get('user_api')} {lib.get('internal_api')} {lib.get('version')} "
                 f"threads={lib.get('num_threads')} ({lib.get('filepath')})")


if __name__ == "__main__":
    entry()
