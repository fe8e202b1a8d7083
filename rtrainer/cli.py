"""Command line: `rtrainer run CONFIG [--set section.key=value ...] [--resume PATH|auto] [--headless]`,
`rtrainer parity CONFIG [--steps N]`, `rtrainer prepare DIR` (index a shard directory),
`rtrainer tokenize INPUT... --out DIR` (text -> tokenizer + shards), `rtrainer plot RUN_DIR...`,
`rtrainer info`, `rtrainer keys`.

Every error is one line on stderr starting `rtrainer: error:` and a non-zero exit code:
2 configuration or usage, 3 data or checkpoint integrity, 4 non-finite stop, 5 I/O error (disk full, permission),
6 run directory locked by another live run.
"""
from __future__ import annotations

import argparse
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
  rtrainer prepare data/shards                             # index (and check) a shard directory once
  rtrainer tokenize corpus/ --out data/tok --vocab-size 4096   # train a BPE, write train/val shards
  rtrainer plot runs/a runs/b -o curves.png                # loss, accuracy, lr, tokens/s of runs
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.print_usage(sys.stderr)
        print(f"rtrainer: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rtrainer", description="Train Mamba (selective state-space) models with an HPN head "
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
    _add_tokenize(sub)
    pl = sub.add_parser("plot", help="plot train/validation loss, validation accuracy, lr and tokens/s of runs",
                        description="Render the metrics.jsonl of one or more run directories (overlaid) into one "
                        "image: train and validation loss, validation accuracy, learning rate and tokens/s "
                        "against the step.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    pl.add_argument("-o", "--output", default=None, metavar="FILE.png",
                    help="the image (.png, .svg or .pdf; default: RUN_DIR/plot.png for one run, plot.png for several)")
    sub.add_parser("info", help="build and machine information (OpenMP, threads, BLAS)")
    sub.add_parser("keys", help="list every run-file key with its default and meaning")
    return p


def main(argv=None) -> int:
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
        elif args.command == "tokenize":
            _tokenize(args)
        elif args.command == "plot":
            from .plot import plot_runs

            print(plot_runs(args.runs, args.output))
        elif args.command == "info":
            _info()
        elif args.command == "keys":
            from .config import describe_keys

            for section, key, default, doc in describe_keys():
                print(f"{section}.{key} = {default!r}\n    {doc}")
    except RtrainerError as e:
        print(f"rtrainer: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rtrainer: interrupted", file=sys.stderr)
        return 130
    return 0


def _prepare(args) -> None:
    from .stream import prepare_dir

    m = prepare_dir(args.dir, args.format, args.glob, rebuild=args.rebuild, verify="full",
                    say=lambda msg: print(msg, file=sys.stderr))
    n = sum(e["tokens"] for e in m["shards"])
    top = max(e["max_id"] for e in m["shards"])
    print(f"{args.dir}: {len(m['shards'])} shards, {n:,} tokens, max token id {top}; manifest verified")


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
                   help=f"train a byte-level BPE with N tokens, special tokens included (the default, N = {DEFAULT_VOCAB})")
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

    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    meta = tokenize(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                    use_bytes=args.use_bytes, min_frequency=args.min_frequency, special_tokens=args.special_tokens,
                    eod=None if args.no_eod else args.eod, doc_separator=parse_separator(args.doc_separator),
                    val_ratio=args.val_ratio, seed=args.seed, shard_tokens=args.shard_tokens,
                    overwrite=args.overwrite, progress=False if args.quiet else None, say=say)
    say(f"rtrainer: {args.out}: V={meta['vocab_size']} ({meta['format']}), {meta['documents']['train']:,} train / "
        f"{meta['documents']['val']:,} val documents, {meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens "
        f"from {len(meta['inputs'])} file(s), {meta['input_bytes']:,} bytes")
    say("rtrainer: run-file lines for this data:")
    print(run_file_lines(meta, args.out))


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
    for lib in threadpool_info():
        print(f"threadpool: {lib.get('user_api')} {lib.get('internal_api')} {lib.get('version')} "
              f"threads={lib.get('num_threads')} ({lib.get('filepath')})")


if __name__ == "__main__":
    sys.exit(main())
