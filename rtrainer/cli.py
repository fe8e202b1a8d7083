"""Command line: `rtrainer run CONFIG [--set section.key=value ...] [--resume PATH|auto] [--headless]`,
`rtrainer parity CONFIG [--steps N]`, `rtrainer prepare DIR` (index a shard directory),
`rtrainer info`, `rtrainer keys`; for trained models `rtrainer generate MODEL`, `rtrainer eval MODEL --data PATH`,
`rtrainer export MODEL OUT_DIR`, `rtrainer inspect PATH`.

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
  rtrainer generate runs/quickstart --prompt 'ROMEO:' --max-new-tokens 200 --top-k 20
  rtrainer eval runs/quickstart --data examples/data/shakespeare.txt
  rtrainer export runs/quickstart exports/quickstart       # weights + config + model card
  rtrainer inspect runs/quickstart                         # checkpoints, their status, tensors
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
    _model_commands(sub)
    sub.add_parser("info", help="build and machine information (OpenMP, threads, BLAS)")
    sub.add_parser("keys", help="list every run-file key with its default and meaning")
    return p


MODEL_HELP = ("a step checkpoint (RUN/checkpoints/step-N), a run directory (its best checkpoint, or the latest "
              "with --checkpoint latest) or an export directory")


def _model_args(q) -> None:
    q.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="which checkpoint of a run directory: best validation (default; the latest if the run "
                        "never validated) or the newest that verifies")
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
    x.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    x.add_argument("out_dir", metavar="OUT_DIR", help="the export directory (must be empty or absent)")
    x.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="as for generate")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    i = sub.add_parser("inspect", help="what a checkpoint, run directory or export holds, and whether it verifies")
    i.add_argument("path", metavar="PATH", help="a step checkpoint, a run directory or an export directory")
    i.add_argument("--json", action="store_true", help="print the report as JSON")


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
        elif args.command == "generate":
            from .generate import run_generate

            run_generate(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "export":
            from .export import export_model

            info = export_model(args.model, args.out_dir, which=args.checkpoint, overwrite=args.overwrite)
            print(f"exported step {info['step']} ({info['parameters']['total']:,} parameters) to {args.out_dir}")
        elif args.command == "inspect":
            _inspect(args)
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
    except BrokenPipeError:   # `rtrainer inspect RUN | head`: the reader went away
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _jsonable(r):
    from .checkpoint import _nonfinite_to_none

    return _nonfinite_to_none(r)


def _eval(args) -> None:
    import json

    from .evaluate import evaluate_model, format_report
    from .infer import load_model

    lm = load_model(args.model, which=args.checkpoint, threads=args.threads)
    r = evaluate_model(lm, args.data, fmt=args.format, seq_len=args.seq_len, batch_size=args.batch_size,
                       max_batches=args.max_batches)
    print(json.dumps(_jsonable(r), indent=2) if args.json else format_report(r))


def _inspect(args) -> None:
    import json

    from .inspect import format_report, inspect_path

    r = inspect_path(args.path)
    print(json.dumps(_jsonable(r), indent=2, default=str) if args.json else format_report(r))


def _prepare(args) -> None:
    from .stream import prepare_dir

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
    for lib in threadpool_info():
        print(f"threadpool: {lib.get('user_api')} {lib.get('internal_api')} {lib.get('version')} "
              f"threads={lib.get('num_threads')} ({lib.get('filepath')})")


if __name__ == "__main__":
    sys.exit(main())
