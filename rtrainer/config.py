"""The run configuration: one frozen dataclass per TOML table, load + ``--set`` overrides + dump.

A run file is TOML; its tables mirror the dataclasses below (``[model]`` -> :class:`ModelConfig`)
and each field carries a one-line doc in ``metadata["doc"]`` and optional longer Markdown in
``metadata["details"]``. :func:`describe_keys` lists the one-liners (``rtrainer keys``);
``rtrainer keys --markdown`` writes the run-file reference, docs/run-file.md, from both (a test
checks that the committed file is up to date). Key names are public API: keys are only ever added,
never renamed.

Precedence: ``--set section.key=value`` > the TOML file > the defaults below.

Every problem is a :class:`~rtrainer.errors.ConfigError` (exit code 2) whose one-line message names
the key as ``section.key`` and where the value came from (the file, or the ``--set`` item):

* unknown table or key (the message lists the known keys of the table);
* wrong type (``bool`` is not an integer; an integer is accepted for a float field and converted;
  lists are checked element by element); non-finite floats (``nan``, ``inf``);
* out of range / not one of the allowed values (the message gives the allowed range or values);
* combinations that cannot work (``head.prototype_separation > 0`` with fixed prototypes,
  ``train.bp_cadence > 1`` without ``train.ff``, a placement that does not fit the layer counts);
* TOML syntax errors (with tomllib's line and column), a missing or unreadable file.

Paths (``run.out_dir``, ``data.train``, ``data.val``, ``data.tokenizer``) are stored as given; the caller
resolves them against the current directory.

The dataclasses are frozen: derive a changed copy with :func:`dataclasses.replace`, e.g.
``replace(cfg, model=replace(cfg.model, vocab_size=V))``, then :func:`validate_config` it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

from . import grammar
from .errors import ConfigError

# Upper bounds of every size and count a run file can set: far above anything this trainer can run
# on a CPU, low enough that no product of them overflows or asks for an absurd allocation before the
# run plan (rtrainer/plan.py) checks the memory the run needs against what the machine has.
MAX_STEPS = 10**12          # train.steps, schedule.warmup_steps, every "every N steps" cadence
MAX_BATCH = 1 << 20         # train.batch_size
MAX_SEQ_LEN = 1 << 22       # train.seq_len, eval.extra_lengths, model.scan_chunk
MAX_WIDTH = 1 << 16         # model.d_model, model.dt_rank
MAX_STATE = 1 << 12         # model.d_state
MAX_CONV = 1 << 10          # model.d_conv
MAX_EXPAND = 64             # model.expand
MAX_LAYERS = 1 << 10        # model.base_layers, model.target_layers
MAX_VOCAB = 1 << 24         # model.vocab_size, data.task_vocab, and a vocabulary inferred from the data
MAX_THREADS = 1 << 10       # run.threads
MAX_EVAL_BATCHES = 1 << 16  # eval.eval_batches
MAX_WORKERS = 256           # data.prefetch_workers
MAX_BUFFER = 1 << 12        # data.prefetch_buffer

__all__ = [
    "RunConfig",
    "ModelConfig",
    "HeadConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "DataConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LogConfig",
    "Config",
    "SECTIONS",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "config_to_toml",
    "config_from_dict",
    "validate_config",
    "describe_keys",
]


def _f(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    details: str = "",
    limit: int | None = None,
) -> Any:
    """A dataclass field with its one-line doc, its validation rule (range or choices) and optional
    longer ``details`` (Markdown) for the run-file reference, docs/run-file.md; ``limit`` is the
    largest value accepted for a size or count (the MAX_* bounds above)."""
    return field(
        default=default,
        metadata={"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
                  "details": details, "limit": limit},
    )


# --------------------------------------------------------------------------------------------
# The tables. Field order = the order of describe_keys() and of the dumped config.toml.
# `doc` is the one line `rtrainer keys` prints; `details` goes into docs/run-file.md only
# (regenerate it with `make docs` after changing either).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """[run]: where the run writes and how it is seeded."""

    out_dir: str = _f("runs/default", "run directory (metrics, checkpoints, resolved config)",
                      details="A fresh run refuses a directory that already holds a checkpoint unless "
                      "`--resume auto` or `--overwrite` is given; see [checkpoints](checkpoints.md).")
    seed: int = _f(42, "seed of every random stream (init, data order)", ge=0)
    threads: int = _f(0, "kernel threads; 0 = all available cores", ge=0,
                      details="0 = `OMP_NUM_THREADS` if it is set, else every core this process may use. "
                      "The same number caps numpy's BLAS (threadpoolctl); the resolved number is written "
                      "to `config.toml`. Results are bitwise reproducible for a fixed seed and thread count.",
                      limit=MAX_THREADS)


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the layer stack."""

    layer: str = _f(
        "mamba-lite", "layer kind: 'mamba-lite' (conv, scan, out_proj; no norm, no gate) or 'mamba' "
        "(full Mamba-1 block)",
        choices=("mamba-lite", "mamba"),
        details="`mamba-lite`: causal conv + SiLU, selective scan, out_proj on D channels (the layer of the "
        "Rust trainer rtrainer replaces). `mamba`: the full Mamba-1 block: RMSNorm, in_proj with expansion "
        "and gate, conv, selective scan, y·silu(z), out_proj. Formulas: "
        "[architecture](architecture.md#the-model).",
    )
    d_model: int = _f(512, "model width D", ge=1, limit=MAX_WIDTH)
    d_state: int = _f(16, "SSM state size N", ge=1, limit=MAX_STATE)
    d_conv: int = _f(4, "causal depthwise conv width K", ge=1, limit=MAX_CONV)
    dt_rank: int = _f(
        0, "rank R of the delta projection; 0 = auto: 1 for mamba-lite, ceil(d_model/16) for mamba",
        ge=0,
        details="Auto gives `mamba-lite` its historical rank 1, so older run files resolve to exactly what "
        "they had. The resolved value is written to `config.toml`.",
        limit=MAX_WIDTH,
    )
    expand: int = _f(2, "inner expansion E (only used by layer = 'mamba')", ge=1,
                     details="The block works on E·D channels.", limit=MAX_EXPAND)
    base_layers: int = _f(2, "layers at the start of the run (fresh or from a checkpoint)", ge=1, limit=MAX_LAYERS)
    target_layers: int = _f(2, "layers after expansion (new layers placed by model.placement)", ge=1,
                            details="Must be `>= base_layers`. The `target_layers - base_layers` new layers "
                            "start as identity blocks that learn; see [staged training](staged-training.md).",
                            limit=MAX_LAYERS)
    placement: str = _f(
        "append",
        "where new layers go when expanding: append | prepend | insert:N | specific:i,j,...",
        details="`append`: after the base layers; `prepend`: before them; `insert:N`: all new layers before "
        "base layer N (0 ≤ N ≤ `base_layers`); `specific:i,j,...`: exactly `target_layers - base_layers` "
        "distinct positions < `target_layers` in the expanded model, the base layers fill the other "
        "positions in order. Anything else, a wrong count, a repeated or out-of-range position is an error.",
    )
    init: str = _f(
        "mamba", "'mamba' (S4D-real A, log-uniform dt) or 'reference' (all N(0, 0.02^2))",
        choices=("mamba", "reference"),
        details="`mamba`: `A_log = log(n+1)` (S4D-real), softplus(`dt_proj_b`) log-uniform in [1e-3, 1e-1], "
        "`D_skip = 1`, fan-in-scaled normal weights, N(0, 1) embedding, prototypes by "
        "`head.prototype_init`. `reference`: every tensor N(0, 0.02²), as the Rust trainer "
        "rtrainer replaces. Per tensor: [architecture](architecture.md#initialisation).",
    )
    vocab_size: int = _f(0, "vocabulary size V; 0 = max token id in the data + 1", ge=0,
                         details="With a synthetic task, 0 = `data.task_vocab`.", limit=MAX_VOCAB)
    scan_chunk: int = _f(64, "scan checkpoint interval in steps (memory/speed knob only)", ge=1,
                         details="The scan keeps its state every `scan_chunk` steps and recomputes in "
                         "between; results do not depend on it.", limit=MAX_SEQ_LEN)
    selective: bool = _f(
        True, "false = ablation: delta, B, C input-independent learned values (an LTI SSM)",
        details="For both layer kinds: `x_proj_w` and `dt_proj_w` are replaced by learned vectors `B_lti`, "
        "`C_lti` (N) and Δ = softplus(`dt_proj_b`), so each layer is a linear time-invariant SSM.",
    )
    init_from: str = _f("", "checkpoint of a base_layers model to start from (then expanded to "
                        "target_layers); empty = fresh initialisation",
                        details="A step directory, a checkpoint file or a run directory (its newest valid "
                        "checkpoint), holding exactly `base_layers` layers of the same widths and vocabulary. "
                        "Parameters and AdamW moments of its layers, embedding and prototypes are carried "
                        "over. Checked on a fresh start only: a resumed run does not need it any more.")


@dataclass(frozen=True)
class HeadConfig:
    """[head]: the output head (HPN built in; other heads come from a Trainer subclass)."""

    kind: str = _f("hpn", "head kind: 'hpn' or 'softmax' (cross-entropy); custom heads: subclass Trainer",
                   details="`hpn`: hyperspherical prototypes, loss (1 − cos)². `softmax`: cross-entropy "
                   "over logits z Wᵀ + b, W (V, D) learned with weight decay. Other heads: "
                   "[extending](extending.md).")
    normalize_prototypes: bool = _f(True, "use unit-norm prototypes (a true cosine); false = raw P",
                                    details="`false` compares against raw prototypes, as the Rust trainer "
                                    "rtrainer replaces.")
    learnable_prototypes: bool = _f(
        False, "train the prototypes (false: fixed, spread over the hypersphere)",
        details="`false`: prototypes are fixed before training (as in the HPN paper); `true`: they are "
        "trained with the model.",
    )
    prototype_separation: float = _f(
        0.0, "weight of a penalty on the largest cosine between prototypes, added to the loss "
        "(learnable prototypes only)",
        ge=0.0,
        details="λ·max_{k≠l} cos(P_k, P_l), added to the training and validation loss; needs "
        "`learnable_prototypes = true`. Costs 2·V²·D flops a step (a blocked BLAS search of the closest "
        "pair).",
    )
    prototype_init: str = _f(
        "spread", "HPN prototypes before training: 'spread' (regular simplex if D >= V-1, else optimised "
        "separation) or 'random' unit vectors (model.init = 'reference' keeps N(0, 0.02^2))",
        choices=("spread", "random"),
        details="`spread` with D ≥ V−1 is a regular simplex: every pairwise cosine is exactly −1/(V−1). "
        "Otherwise seeded random unit vectors are optimised for separation.",
    )
    bias: bool = _f(True, "softmax head: learn a bias of the logits")


@dataclass(frozen=True)
class OptimConfig:
    """[optim]: AdamW and gradient clipping."""

    lr: float = _f(1e-4, "peak learning rate", gt=0.0)
    betas: tuple[float, float] = _f(
        (0.9, 0.999), "AdamW (beta1, beta2), each in [0, 1)", ge=0.0, lt=1.0
    )
    eps: float = _f(1e-8, "AdamW epsilon", gt=0.0)
    weight_decay: float = _f(0.01, "decoupled weight decay", ge=0.0)
    grad_clip: float = _f(0.0, "global gradient-norm clip; 0 = off", ge=0.0)
    weight_decay_scope: str = _f(
        "matrices", "tensors that get weight decay: 'matrices' or 'all'",
        choices=("matrices", "all"),
        details="`matrices`: the embedding, the prototypes and the conv/in_proj/x_proj/dt_proj/out_proj "
        "weights (not norm weights, biases, `A_log`, `D_skip`, `B_lti`/`C_lti`). `all`: every tensor, as "
        "the Rust trainer rtrainer replaces.",
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """[schedule]: linear warmup then cosine decay, from the global step."""

    warmup_steps: int = _f(0, "linear warmup steps", ge=0, limit=MAX_STEPS)
    min_lr_scale: float = _f(0.1, "final learning rate as a fraction of optim.lr", ge=0.0, le=1.0,
                             details="The cosine decay runs from the end of the warmup to `train.steps` and "
                             "ends at `min_lr_scale * optim.lr`. It is keyed to the global step, so a "
                             "resumed run continues it.")


@dataclass(frozen=True)
class TrainConfig:
    """[train]: length and shape of the run."""

    steps: int = _f(5000, "TOTAL optimizer steps of the run (a resumed run continues to it)", ge=1,
                    details="The schedule is keyed to this number.", limit=MAX_STEPS)
    batch_size: int = _f(8, "sequences per batch B", ge=1, limit=MAX_BATCH)
    seq_len: int = _f(64, "tokens per sequence T", ge=1, limit=MAX_SEQ_LEN)
    micro_batch_size: int = _f(0, "sequences one process runs per forward/backward; batch_size stays the global "
                               "batch of one optimizer step, split over the processes and accumulated over "
                               "batch_size / (processes x micro_batch_size) micro-batches; 0 = the whole share "
                               "of a process (no accumulation)", ge=0, limit=MAX_BATCH)
    fail_on_non_finite: bool = _f(False, "stop (exit 4, diagnostic checkpoint) at the first non-finite "
                                  "loss or gradient instead of skipping the update",
                                  details="`false`: such a step changes no parameter or moment and is counted "
                                  "in the `skipped` metric. `true`: the run stops at once with exit 4 and "
                                  "keeps the parameters, moments and gradients of that step in "
                                  "`checkpoints/non-finite-step-N.safetensors`.")
    max_consecutive_skips: int = _f(10, "abort (exit 4) after this many consecutive skipped updates", ge=1,
                                    details="The run aborts after *more than* this many skipped steps in a row.",
                                    limit=MAX_STEPS)
    freeze: str = _f("none", "layers that are not trained: none | first:N | indices:i,j,... "
                     "(indices of the expanded model)",
                     details="Frozen tensors get no update, no weight decay, no moment change and no FF "
                     "update, are not part of the clipping norm, and their weight gradients are not computed.")
    freeze_embedding: bool = _f(False, "do not train the embedding",
                                details="With the leading layers frozen too, backprop stops above them.")
    ff: bool = _f(False, "Forward-Forward local objective on each unfrozen layer's D_skip, every step",
                  details="`mamba-lite` layers only. Off, a run is exactly (bitwise) what it was without the "
                  "key. See [staged training](staged-training.md#forward-forward-on-d_skip).")
    ff_margin: float = _f(1.0, "FF hinge margin: ff_loss = max(0, margin - goodness gap)", gt=0.0,
                          details="The Rust trainer rtrainer replaces uses 1.")
    ff_lr: float = _f(1e-4, "learning rate of the plain-SGD FF update of D_skip on FF-only steps; on BP "
                      "steps the FF gradient is added to the backprop one with weight ff_lr / optim.lr", ge=0.0)
    bp_cadence: int = _f(1, "global backprop + AdamW every N steps (steps N, 2N, ...); the other steps "
                         "apply only the FF update (needs train.ff = true when > 1)", ge=1, limit=MAX_STEPS)
    surgery: str = _f("pcgrad", "how the FF gradient of D_skip is combined with its backprop gradient on BP "
                      "steps", choices=("none", "pcgrad", "orthograd", "gradnorm", "cagrad"),
                      details="Formulas: [staged training](staged-training.md#gradient-surgery).")
    surgery_epsilon: float = _f(1e-8, "epsilon of the surgery projections and normalisations", ge=0.0)
    gradnorm_alpha: float = _f(0.2, "gradnorm: FF scale exp(alpha * |f/|f| - b/|b||)", ge=0.0,
                               details="The scale lies in [1, e^(2·alpha)].")
    cagrad_lambda: float = _f(1.0, "cagrad: fraction of the conflicting component removed (1 = pcgrad)", ge=0.0)


@dataclass(frozen=True)
class DataConfig:
    """[data]: token sources."""

    train: str = _f("", "training token file or shard directory (required)",
                    details="See [data](data.md). Not used (leave it empty) with `data.task`.")
    val: str = _f("", "validation token file or shard directory; empty = split off the end of data.train "
                  "(of each shard)")
    val_ratio: float = _f(
        0.05, "fraction of data.train held out for validation when data.val is empty",
        ge=0.0, lt=1.0,
        details="Taken from the end of every shard. 0 = no validation.",
    )
    format: str = _f(
        "auto", "token file format: auto (by extension) | txt | u8 | u16 | u32 | npy",
        choices=("auto", "txt", "u8", "u16", "u32", "npy"),
        details="`txt`: whitespace-separated integers (the Rust trainer's format); `u8`: raw bytes "
        "(byte-level text); `u16`/`u32`: raw little-endian (nanoGPT `.bin` files are u16); `npy`: a NumPy "
        "array file. `auto` decides per file by extension: `.txt`, `.npy`, `.bin` = u16.",
    )
    packed: bool = _f(True, "packed windows (row b's last target = row b+1's first input); false = "
                      "independent windows of seq_len+1 tokens that share no token",
                      details="How the windows tile a shard: [data](data.md#windows).")
    shuffle_shards: bool = _f(True, "shard directory: reshuffle the shard order every epoch (seeded by run.seed)",
                              details="The generator's state is part of the data cursor, so a resumed run "
                              "continues the same order. `false`: name order.")
    shuffle_windows: bool = _f(True, "read the windows of each shard in a new seeded order every epoch (every "
                               "window still once per epoch); false = in file order. A run resumed from a "
                               "checkpoint made before this key existed keeps reading in order",
                               details="The permutation is recomputed from the cursor on resume, so a resumed "
                               "run continues the same order: [data](data.md#order).")
    prefetch_workers: int = _f(0, "background threads reading batches ahead; 0 = read on the training thread "
                               "(the batches are the same for every value)", ge=0, limit=MAX_WORKERS)
    prefetch_buffer: int = _f(16, "batches read ahead at most (with prefetch_workers > 0)", ge=1, limit=MAX_BUFFER)
    random_windows: bool = _f(False, "every row a window at a uniformly random position of a random shard "
                              "(nanoGPT style) instead of streaming the shards in order",
                              details="Positions are uniform over all windows of all shards, drawn from the "
                              "seeded generator; `packed` and `shuffle_shards` do not apply.")
    shard_glob: str = _f("", "shard directory: file name pattern of the shards; empty = by format "
                         "(*.bin, *.npy, *.txt)",
                         details="An `fnmatch` pattern, e.g. `\"train-*.u16\"`. Empty: `auto` = `*.bin`, "
                         "`*.npy`, `*.txt`; `txt` = `*.txt`; `npy` = `*.npy`; `u8`/`u16`/`u32` = `*.bin`.")
    verify: str = _f("quick", "shard directory: 'quick' = check sizes, and block checksums of shards whose "
                     "mtime changed; 'full' = every checksum at every start", choices=("quick", "full"))
    tokenizer: str = _f("", "tokenizer.json of the token data (written by `rtrainer tokenize`); empty = none "
                        "(byte or id data)",
                        details="`model.vocab_size = 0` takes V from it (any other value must equal it), and "
                        "every checkpoint records its SHA-256: a resume with a different file is refused. "
                        "See [tokenize](tokenize.md).")
    task: str = _f(
        "", "synthetic task instead of token files: '' (none) | selective_copying | induction_heads",
        choices=("", "selective_copying", "induction_heads"),
        details="Then `data.train` and `data.val` stay empty. See [data](data.md#synthetic-tasks).",
    )
    task_tokens: int = _f(8, "selective_copying: data tokens to copy M (L_noise = train.seq_len - 2M)", ge=1,
                          limit=MAX_SEQ_LEN)
    task_vocab: int = _f(16, "task alphabet: selective_copying A (0 noise, 1..A-2 data, A-1 marker); "
                         "induction_heads V (0..V-2 content, V-1 the special token)", ge=3,
                         details="`model.vocab_size = 0` takes this value.", limit=MAX_VOCAB)


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: validation on a fixed set of windows."""

    val_every: int = _f(200, "validate every N steps; 0 = never", ge=0,
                        details="A run also validates at its last step.", limit=MAX_STEPS)
    eval_batches: int = _f(8, "validation batches (the same windows at every evaluation)", ge=1,
                           details="`eval_batches × train.batch_size` windows spread evenly over the "
                           "validation tokens.", limit=MAX_EVAL_BATCHES)
    patience: int = _f(0, "stop after this many evaluations without an improvement of more than "
                       "min_delta; 0 = never stop early", ge=0,
                       details="The run then ends with `stop_reason = \"early_stopping\"` and exit 0.", limit=MAX_STEPS)
    min_delta: float = _f(0.0, "smallest decrease of val_loss that counts as an improvement", ge=0,
                          details="An evaluation improves when `val_loss < best_val_loss - min_delta`; only "
                          "then are `best_val_loss` and the `best` checkpoint updated.")
    extra_lengths: tuple = _f((), "also validate at these sequence lengths (metrics val_loss@L, "
                              "val_acc@L): length extrapolation", ge=1,
                              details="Each length has its own fixed set of `eval_batches × batch_size` "
                              "sequences (tasks) or windows (token files). These metrics do not affect "
                              "`best_val_loss` or early stopping.", limit=MAX_SEQ_LEN)


@dataclass(frozen=True)
class CheckpointConfig:
    """[checkpoint]: how often to save and what to keep."""

    save_every: int = _f(200, "checkpoint every N steps; 0 = only at the end", ge=0,
                         details="A checkpoint is also written at the end, on SIGINT/SIGTERM, at `--stop-at` "
                         "and at each improving validation (the `best` one).", limit=MAX_STEPS)
    keep_last: int = _f(3, "step checkpoints to keep (the newest N, plus the best one); 0 = keep all", ge=0,
                        details="Older ones are deleted after each commit. The newest and the best "
                        "checkpoint are never deleted.", limit=MAX_STEPS)


@dataclass(frozen=True)
class LogConfig:
    """[log]: metrics.jsonl cadence."""

    log_every: int = _f(20, "write a train line to metrics.jsonl every N steps", ge=1,
                        details="And at the last step; the console prints the same lines. Keys: "
                        "[metrics](metrics.md).", limit=MAX_STEPS)


@dataclass(frozen=True)
class Config:
    """The whole run configuration: one attribute per TOML table."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


#: TOML table name -> dataclass, in file order.
SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in fields(Config)  # type: ignore[misc]
}


# --------------------------------------------------------------------------------------------
# Validation of single values
# --------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _got(value: Any) -> str:
    return f"got {_type_name(value)} {value!r}"


def _fmt_num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _range_text(md: Mapping[str, Any]) -> str | None:
    lo, lo_incl = (md["ge"], True) if md["ge"] is not None else (md["gt"], False)
    hi, hi_incl = (md["le"], True) if md["le"] is not None else (md["lt"], False)
    if lo is None and hi is None:
        return None
    if hi is None:
        return f"{'>=' if lo_incl else '>'} {_fmt_num(lo)}"
    if lo is None:
        return f"{'<=' if hi_incl else '<'} {_fmt_num(hi)}"
    return f"in {'[' if lo_incl else '('}{_fmt_num(lo)}, {_fmt_num(hi)}{']' if hi_incl else ')'}"


def _in_range(x: float, md: Mapping[str, Any]) -> bool:
    if md["ge"] is not None and not x >= md["ge"]:
        return False
    if md["gt"] is not None and not x > md["gt"]:
        return False
    if md["le"] is not None and not x <= md["le"]:
        return False
    if md["lt"] is not None and not x < md["lt"]:
        return False
    return True


def _check_scalar(name: str, default: Any, value: Any, where: str) -> Any:
    """Type-check (and convert int -> float) one scalar against the type of its default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be a boolean (true/false), {_got(value)}{where}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, {_got(value)}{where}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, {_got(value)}{where}")
        if isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{name} is too large, got {value!r}{where}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}{where}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, {_got(value)}{where}")
        return value
    raise AssertionError(f"unsupported default type for {name}")  # pragma: no cover


def _check_limit(name: str, value: int, md: Mapping[str, Any], where: str) -> None:
    lim = md.get("limit")
    if lim is not None and value > lim:
        raise ConfigError(f"{name} = {value} is above its limit of {lim}{where}")


def _check_value(section: str, f: Any, value: Any, where: str) -> Any:
    """Validate one field's value: type, finiteness, range, choices. Returns the stored value."""
    name = f"{section}.{f.name}"
    md = f.metadata
    if isinstance(f.default, tuple) and not f.default:   # a list of any length of integers
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of integers, {_got(value)}{where}")
        out = []
        for i, v in enumerate(value):
            v = _check_scalar(f"{name}[{i}]", 0, v, where)
            if not _in_range(v, md):
                raise ConfigError(f"{name}[{i}] must be {_range_text(md)}, got {v!r}{where}")
            _check_limit(f"{name}[{i}]", v, md, where)
            out.append(v)
        return tuple(out)
    if isinstance(f.default, tuple):
        n = len(f.default)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of {n} numbers, {_got(value)}{where}")
        if len(value) != n:
            raise ConfigError(
                f"{name} must be a list of {n} numbers, got a list of {len(value)}{where}"
            )
        out = []
        for i, v in enumerate(value):
            v = _check_scalar(f"{name}[{i}]", f.default[i], v, where)
            if not _in_range(v, md):
                raise ConfigError(f"{name}[{i}] must be {_range_text(md)}, got {v!r}{where}")
            out.append(v)
        return tuple(out)
    value = _check_scalar(name, f.default, value, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, md):
        raise ConfigError(f"{name} must be {_range_text(md)}, got {value!r}{where}")
    if isinstance(value, int) and not isinstance(value, bool):
        _check_limit(name, value, md, where)
    if md["choices"] is not None and value not in md["choices"]:
        allowed = ", ".join(repr(c) for c in md["choices"])
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}{where}")
    return value


def _where(origins: Mapping[tuple[str, str], str], section: str, key: str) -> str:
    src = origins.get((section, key))
    return f" (in {src})" if src else ""


def _cross_checks(
    cfg: Config, origins: Mapping[tuple[str, str], str], require_data: bool
) -> None:
    """Checks that involve more than one value, and options not implemented yet."""
    m = cfg.model
    try:  # placement against the layer counts, freeze against the expanded model (rtrainer/grammar.py)
        grammar.expansion_layout(m.placement, m.base_layers, m.target_layers)
    except ConfigError as e:
        raise ConfigError(f"{e}{_where(origins, 'model', 'placement')}") from None
    try:
        grammar.frozen_layers(cfg.train.freeze, m.target_layers)
    except ConfigError as e:
        raise ConfigError(f"{e}{_where(origins, 'train', 'freeze')}") from None
    if cfg.train.bp_cadence > 1 and not cfg.train.ff:
        raise ConfigError(
            f"train.bp_cadence = {cfg.train.bp_cadence} needs train.ff = true (without Forward-Forward the "
            "steps between backprop steps would do nothing)" + _where(origins, "train", "bp_cadence")
        )
    if cfg.train.ff and m.layer != "mamba-lite":
        raise ConfigError(
            f"train.ff = true works on the mamba-lite layer's D_skip (D,); model.layer = {m.layer!r}"
            + _where(origins, "train", "ff")
        )
    if cfg.head.kind not in ("hpn", "softmax"):
        raise ConfigError(
            f"head.kind = {cfg.head.kind!r} is not built in ('hpn', 'softmax'); custom heads come from "
            "a Trainer subclass that overrides build_head" + _where(origins, "head", "kind")
        )
    if cfg.head.prototype_separation > 0 and (cfg.head.kind != "hpn" or not cfg.head.learnable_prototypes):
        raise ConfigError(
            f"head.prototype_separation = {cfg.head.prototype_separation!r} > 0 needs head.kind = 'hpn' and "
            "head.learnable_prototypes = true (fixed prototypes get no update)"
            + _where(origins, "head", "prototype_separation")
        )
    _check_batch_split(cfg, origins)
    d = cfg.data
    if d.task:
        if d.train or d.val:
            raise ConfigError(f"data.task = {d.task!r} generates its own data: leave data.train and data.val empty"
                              + _where(origins, "data", "task"))
        if d.tokenizer:
            raise ConfigError(f"data.task = {d.task!r} generates token ids, not text: leave data.tokenizer empty"
                              + _where(origins, "data", "tokenizer"))
        try:
            grammar.check_task(d.task, cfg.train.seq_len, d.task_tokens, d.task_vocab)
        except ValueError as e:
            raise ConfigError(f"{e}{_where(origins, 'data', 'task')}") from None
        if m.vocab_size and m.vocab_size < d.task_vocab:
            raise ConfigError(f"model.vocab_size = {m.vocab_size} is smaller than data.task_vocab = {d.task_vocab}"
                              + _where(origins, "model", "vocab_size"))
    elif require_data and not cfg.data.train:
        raise ConfigError("data.train is required (the training token file)")


def batch_split(batch_size: int, micro_batch_size: int, world: int) -> tuple[int, int, int]:
    """(share, micro, accumulation): sequences per process per step, per forward/backward, and
    micro-batches per step, for a global batch over `world` processes; ValueError naming the keys
    when they do not divide."""
    if batch_size % world:
        raise ValueError(f"train.batch_size = {batch_size} (the global batch of one step) is not divisible by the "
                         f"{world} processes of this run")
    share = batch_size // world
    micro = micro_batch_size or share
    if micro > share:
        raise ValueError(f"train.micro_batch_size = {micro} is larger than the share of one process: "
                         f"train.batch_size {batch_size} / {world} processes = {share}")
    if share % micro:
        raise ValueError(f"train.micro_batch_size = {micro} does not divide the share of one process: "
                         f"train.batch_size {batch_size} / {world} processes = {share}")
    return share, micro, share // micro


def _check_batch_split(cfg: Config, origins: Mapping[tuple[str, str], str]) -> None:
    """The global batch against the processes of this run (known from the launcher's environment)."""
    from .launcher import world_size

    t = cfg.train
    world = world_size()
    try:
        _, _, accum = batch_split(t.batch_size, t.micro_batch_size, world)
    except ValueError as e:
        key = "micro_batch_size" if "micro_batch_size =" in str(e) else "batch_size"
        raise ConfigError(f"{e}{_where(origins, 'train', key)}") from None
    if (world > 1 or accum > 1) and (t.ff or t.bp_cadence > 1):
        key = "ff" if t.ff else "bp_cadence"
        raise ConfigError(f"train.{key} (Forward-Forward / backprop cadence) works on one process without "
                          f"micro-batches; this run has {world} process(es) and {accum} micro-batches per step "
                          "(train.micro_batch_size)" + _where(origins, "train", key))


# --------------------------------------------------------------------------------------------
# Building a Config from nested dicts
# --------------------------------------------------------------------------------------------


def _known_keys(section: str) -> str:
    return ", ".join(f.name for f in fields(SECTIONS[section]))


def _check_structure(d: Mapping[str, Any], source: str) -> None:
    """Unknown tables and keys, and tables that are not tables."""
    for section, table in d.items():
        if section not in SECTIONS:
            if isinstance(table, Mapping):
                raise ConfigError(
                    f"unknown table [{section}] in {source}; known tables: {', '.join(SECTIONS)}"
                )
            raise ConfigError(
                f"unknown top-level key {section!r} in {source} (every key belongs to a table, "
                f"e.g. [run] seed = 1); known tables: {', '.join(SECTIONS)}"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}] in {source} must be a table, {_got(table)}")
        known = {f.name for f in fields(SECTIONS[section])}
        for key in table:
            if key not in known:
                raise ConfigError(
                    f"unknown key {section}.{key} in {source}; "
                    f"known keys of [{section}]: {_known_keys(section)}"
                )


def _build(
    layers: list[tuple[Mapping[str, Any], str]], require_data: bool
) -> Config:
    """Merge (dict, source) layers, later ones win; validate every value; run the cross checks."""
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    for d, source in layers:
        _check_structure(d, source)
        for section, table in d.items():
            for key, value in table.items():
                merged.setdefault(section, {})[key] = value
                origins[(section, key)] = source
    sections = {}
    for section, cls in SECTIONS.items():
        given = merged.get(section, {})
        values = {}
        for f in fields(cls):
            if f.name in given:
                values[f.name] = _check_value(
                    section, f, given[f.name], _where(origins, section, f.name)
                )
        sections[section] = cls(**values)
    cfg = Config(**sections)
    _cross_checks(cfg, origins, require_data)
    return cfg


def config_from_dict(
    d: Mapping[str, Any], *, source: str = "<dict>", require_data: bool = True
) -> Config:
    """Build and validate a Config from ``{table: {key: value}}`` (e.g. a checkpoint's config).

    Missing keys take their defaults; every rule of :func:`load_config` applies.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"configuration in {source} must be a table, {_got(d)}")
    return _build([(d, source)], require_data)


def validate_config(cfg: Config, *, require_data: bool = True) -> Config:
    """Re-validate a Config (e.g. one changed with dataclasses.replace); returns it unchanged."""
    return config_from_dict(config_to_dict(cfg), source="<Config>", require_data=require_data)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _field_of(section: str, key: str) -> Any:
    for f in fields(SECTIONS[section]):
        if f.name == key:
            return f
    raise KeyError(key)  # pragma: no cover


def parse_overrides(overrides: Iterable[str]) -> list[tuple[dict[str, dict[str, Any]], str]]:
    """Parse ``section.key=value`` items into one ``({section: {key: value}}, source)`` per item.

    The value is a TOML literal (``5``, ``1e-3``, ``true``, ``"text"``, ``[0.9, 0.95]``). For a
    string key the raw text is used when it is not a TOML string (``data.train=data/x.txt``).
    The source string (``--set section.key=value``) is what error messages quote.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = []
    for item in overrides:
        src = f"--set {item}"
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"malformed override {item!r}: expected section.key=value")
        lhs, raw = item.split("=", 1)
        lhs, raw = lhs.strip(), raw.strip()
        parts = lhs.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"malformed override {item!r}: the key must be section.key (e.g. model.d_model=256)"
            )
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown table [{section}] in {src}; known tables: {', '.join(SECTIONS)}"
            )
        known = {f.name for f in fields(SECTIONS[section])}
        if key not in known:
            raise ConfigError(
                f"unknown key {section}.{key} in {src}; "
                f"known keys of [{section}]: {_known_keys(section)}"
            )
        is_str = isinstance(_field_of(section, key).default, str)
        try:
            value = tomllib.loads("v = " + raw)["v"]
        except tomllib.TOMLDecodeError:
            if not is_str:
                raise ConfigError(
                    f"malformed override {item!r}: {raw!r} is not a TOML value "
                    f"(e.g. 5, 1e-3, true, \"text\", [0.9, 0.95])"
                ) from None
            value = raw
        if is_str and not isinstance(value, str):
            value = raw  # e.g. --set run.out_dir=2024-01-01 (a TOML date) means the text
        out.append(({section: {key: value}}, src))
    return out


# --------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(
    path: str, overrides: Iterable[str] = (), *, require_data: bool = True
) -> Config:
    """Read a TOML run file, apply ``--set section.key=value`` overrides, validate everything.

    ``require_data=False`` skips the "data.train is required" check (for a Trainer subclass that
    brings its own data).
    """
    layers = [(_read_toml(str(path)), str(path))]
    layers += parse_overrides(overrides or ())
    return _build(layers, require_data)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{table: {key: value}}`` with plain TOML/JSON types (tuples become lists)."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        out[section] = {
            f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v
            for f in fields(obj)
        }
    return out


def config_to_toml(cfg: Config) -> str:
    """The resolved configuration as a TOML document that :func:`load_config` reads back equal."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(cfg))


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """``(section, key, default, doc)`` for every key, in file order (``rtrainer keys``)."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            rows.append((section, f.name, default, f.metadata["doc"]))
    return rows
