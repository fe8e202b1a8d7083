"""rtrainer.config: defaults, every error class with its message, overrides, round trip."""

import dataclasses
from pathlib import Path

import pytest

from rtrainer.config import (
    Config,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    describe_keys,
    load_config,
    parse_overrides,
    validate_config,
)
from rtrainer.errors import ConfigError, RtrainerError

MIN = '[data]\ntrain = "tokens.txt"\n'


def write(tmp_path, text, name="run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def err(tmp_path, text, overrides=()):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg, path


# ---------------------------------------------------------------------------------- defaults


def test_defaults_load(tmp_path):
    cfg = load_config(write(tmp_path, MIN))
    assert cfg.data.train == "tokens.txt"
    assert cfg.run.out_dir == "runs/default" and cfg.run.seed == 42 and cfg.run.threads == 0
    m = cfg.model
    assert (m.layer, m.d_model, m.d_state, m.d_conv, m.dt_rank, m.expand) == (
        "mamba-lite", 512, 16, 4, 0, 2)        # dt_rank 0 = auto (resolved to 1 for mamba-lite)
    assert m.selective is True
    assert (m.base_layers, m.target_layers, m.placement, m.init, m.vocab_size, m.scan_chunk) == (
        2, 2, "append", "mamba", 0, 64)
    h = cfg.head
    assert (h.kind, h.normalize_prototypes, h.learnable_prototypes, h.prototype_separation) == (
        "hpn", True, False, 0.0)
    o = cfg.optim
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip, o.weight_decay_scope) == (
        1e-4, (0.9, 0.999), 1e-8, 0.01, 0.0, "matrices")
    assert (cfg.schedule.warmup_steps, cfg.schedule.min_lr_scale) == (0, 0.1)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len) == (5000, 8, 64)
    assert (cfg.data.val, cfg.data.val_ratio, cfg.data.format) == ("", 0.05, "auto")
    assert (cfg.eval.val_every, cfg.eval.eval_batches) == (200, 8)
    assert cfg.checkpoint.save_every == 200
    assert cfg.log.log_every == 20
    d = Config()
    expected = dataclasses.replace(d, data=dataclasses.replace(d.data, train="tokens.txt"))
    assert cfg == expected


def test_values_and_int_to_float(tmp_path):
    text = MIN + "[optim]\nlr = 1\nbetas = [0, 0.95]\n[model]\nd_model = 32\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.0, 0.95) and isinstance(cfg.optim.betas[0], float)
    assert cfg.model.d_model == 32


def test_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MIN))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3


def test_describe_keys_covers_every_field():
    rows = describe_keys()
    d = config_to_dict(Config())
    assert [(s, k) for s, k, _, _ in rows] == [(s, k) for s in d for k in d[s]]
    for s, k, default, doc in rows:
        assert default == d[s][k]
        assert isinstance(doc, str) and doc.strip()
    assert ("optim", "betas", [0.9, 0.999]) in [(s, k, v) for s, k, v, _ in rows]


# ---------------------------------------------------------------------------------- errors


def test_exit_code():
    assert ConfigError.exit_code == 2 and issubclass(ConfigError, RtrainerError)


def test_unknown_key(tmp_path):
    msg, path = err(tmp_path, MIN + "[model]\nd_modle = 3\n")
    assert "model.d_modle" in msg and path in msg
    assert "d_model" in msg and "scan_chunk" in msg  # the known keys of [model]


def test_unknown_table(tmp_path):
    msg, path = err(tmp_path, MIN + "[modle]\nd_model = 3\n")
    assert "[modle]" in msg and path in msg and "model" in msg


def test_top_level_key(tmp_path):
    msg, path = err(tmp_path, "seed = 3\n" + MIN)
    assert "'seed'" in msg and path in msg


def test_wrong_type(tmp_path):
    msg, path = err(tmp_path, MIN + '[model]\nd_model = "512"\n')
    assert "model.d_model must be an integer, got str '512'" in msg and path in msg


def test_bool_is_not_int(tmp_path):
    msg, _ = err(tmp_path, MIN + "[train]\nsteps = true\n")
    assert "train.steps must be an integer" in msg and "bool" in msg


def test_float_for_int_rejected(tmp_path):
    msg, _ = err(tmp_path, MIN + "[train]\nbatch_size = 8.0\n")
    assert "train.batch_size must be an integer, got float 8.0" in msg


def test_string_for_float_and_bool(tmp_path):
    msg, _ = err(tmp_path, MIN + '[optim]\nlr = "1e-3"\n')
    assert "optim.lr must be a number, got str '1e-3'" in msg
    msg, _ = err(tmp_path, MIN + "[head]\nnormalize_prototypes = 1\n")
    assert "head.normalize_prototypes must be a boolean" in msg and "int 1" in msg


def test_list_checked_elementwise(tmp_path):
    msg, _ = err(tmp_path, MIN + '[optim]\nbetas = [0.9, "x"]\n')
    assert "optim.betas[1] must be a number, got str 'x'" in msg
    msg, _ = err(tmp_path, MIN + "[optim]\nbetas = [0.9, 0.99, 0.9]\n")
    assert "optim.betas must be a list of 2 numbers" in msg
    msg, _ = err(tmp_path, MIN + "[optim]\nbetas = 0.9\n")
    assert "optim.betas must be a list of 2 numbers, got float 0.9" in msg
    msg, _ = err(tmp_path, MIN + "[optim]\nbetas = [0.9, 1.0]\n")
    assert "optim.betas[1] must be in [0, 1), got 1.0" in msg


@pytest.mark.parametrize("lit", ["nan", "inf", "-inf", "+nan"])
def test_non_finite_rejected(tmp_path, lit):
    msg, _ = err(tmp_path, MIN + f"[optim]\nweight_decay = {lit}\n")
    assert "optim.weight_decay must be a finite number" in msg


def test_non_finite_in_list(tmp_path):
    msg, _ = err(tmp_path, MIN + "[optim]\nbetas = [0.9, nan]\n")
    assert "optim.betas[1] must be a finite number" in msg


@pytest.mark.parametrize(
    "text, expect",
    [
        ("[model]\nd_model = 0", "model.d_model must be >= 1, got 0"),
        ("[run]\nthreads = -1", "run.threads must be >= 0, got -1"),
        ("[optim]\nlr = 0.0", "optim.lr must be > 0, got 0.0"),
        ("[optim]\neps = -1e-8", "optim.eps must be > 0"),
        ("[optim]\ngrad_clip = -1", "optim.grad_clip must be >= 0, got -1.0"),
        ("[schedule]\nmin_lr_scale = 1.5", "schedule.min_lr_scale must be in [0, 1], got 1.5"),
        ("val_ratio = 1.0", "data.val_ratio must be in [0, 1), got 1.0"),
        ("[eval]\neval_batches = 0", "eval.eval_batches must be >= 1"),
        ("[checkpoint]\nsave_every = -1", "checkpoint.save_every must be >= 0"),
        ("[log]\nlog_every = 0", "log.log_every must be >= 1"),
        ("[model]\nvocab_size = -2", "model.vocab_size must be >= 0"),
    ],
)
def test_out_of_range(tmp_path, text, expect):
    msg, path = err(tmp_path, MIN + text + "\n")  # a bare key lands in [data]
    assert expect in msg and path in msg


@pytest.mark.parametrize(
    "text, expect",
    [
        ('[model]\ninit = "xavier"',
         "model.init must be one of 'mamba', 'reference', got 'xavier'"),
        ('format = "csv"', "data.format must be one of"),
        ('[optim]\nweight_decay_scope = "some"', "optim.weight_decay_scope must be one of"),
        ('[model]\nlayer = "rnn"', "model.layer must be one of 'mamba-lite', 'mamba', got 'rnn'"),
        ('[model]\nplacement = "middle"', "model.placement must be append | prepend"),
        ('[model]\nplacement = "insert:-1"', "model.placement must be"),
        ('[model]\nplacement = "specific:1,1"', "repeated layer indices"),
    ],
)
def test_bad_enum(tmp_path, text, expect):
    msg, _ = err(tmp_path, MIN + text + "\n")
    assert expect in msg


def test_placement_valid(tmp_path):
    for p in ("append", "prepend", "insert:0", "insert:2", "specific:0,2,4"):
        cfg = load_config(write(tmp_path, MIN + f'[model]\ntarget_layers = 5\nplacement = "{p}"\n'))
        assert cfg.model.placement == p


def test_not_implemented_options(tmp_path):
    cfg = load_config(write(tmp_path, MIN + '[model]\nlayer = "mamba"\nselective = false\n'))
    assert cfg.model.layer == "mamba" and cfg.model.selective is False      # implemented now
    msg, _ = err(tmp_path, MIN + "[model]\ndt_rank = -1\n")
    assert "model.dt_rank" in msg
    msg, _ = err(tmp_path, MIN + '[head]\nkind = "arcface"\n')
    assert "head.kind" in msg and "'arcface'" in msg and "Trainer subclass" in msg
    msg, _ = err(tmp_path, MIN + "[head]\nprototype_separation = 0.5\n")
    assert "head.prototype_separation" in msg and "needs" in msg and "learnable_prototypes = true" in msg
    msg, _ = err(tmp_path, MIN + "[head]\nprototype_separation = -0.5\n")
    assert "head.prototype_separation must be >= 0" in msg


def test_data_train_required(tmp_path):
    msg, _ = err(tmp_path, "[model]\nd_model = 8\n")
    assert "data.train is required" in msg
    cfg = load_config(write(tmp_path, "[model]\nd_model = 8\n"), require_data=False)
    assert cfg.data.train == ""


def test_toml_syntax_error(tmp_path):
    msg, path = err(tmp_path, MIN + "[model]\nd_model = = 3\n")
    assert path in msg and "line 4" in msg and "column" in msg


def test_table_is_not_a_table(tmp_path):
    msg, path = err(tmp_path, "model = 3\n" + MIN)
    assert "model" in msg and path in msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(path)


def test_directory_as_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_paths_stored_as_given(tmp_path):
    text = '[data]\ntrain = "../d/t.bin"\nval = "v.txt"\n[run]\nout_dir = "r/x"\n'
    cfg = load_config(write(tmp_path, text))
    assert (cfg.data.train, cfg.data.val, cfg.run.out_dir) == ("../d/t.bin", "v.txt", "r/x")


# ---------------------------------------------------------------------------------- overrides


def test_override_precedence(tmp_path):
    path = write(tmp_path, MIN + "[model]\nd_model = 64\nd_state = 8\n")
    cfg = load_config(path, ["model.d_model=128", "train.steps=10"])
    assert cfg.model.d_model == 128  # --set beats the file
    assert cfg.model.d_state == 8  # file beats the default
    assert cfg.model.d_conv == 4  # default
    assert cfg.train.steps == 10
    # the last --set of a key wins
    assert load_config(path, ["model.d_model=1", "model.d_model=2"]).model.d_model == 2


def test_override_parsing(tmp_path):
    path = write(tmp_path, MIN)
    cfg = load_config(path, [
        "optim.betas=[0.8, 0.9]",
        "optim.lr = 3e-4",
        "head.learnable_prototypes=true",
        "data.val=data/val.bin",           # raw text for a string key
        'run.out_dir="runs/quoted"',
        "data.train=2024-01-01",           # a TOML date, but the key is a string: raw text
        "model.init=reference",
    ])
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.lr == 3e-4
    assert cfg.head.learnable_prototypes is True
    assert cfg.data.val == "data/val.bin"
    assert cfg.run.out_dir == "runs/quoted"
    assert cfg.data.train == "2024-01-01"
    assert cfg.model.init == "reference"


def test_override_type_checked(tmp_path):
    msg, _ = err(tmp_path, MIN, ['model.d_model="512"'])
    assert "model.d_model must be an integer, got str '512'" in msg and "--set" in msg
    msg, _ = err(tmp_path, MIN, ["optim.lr=nan"])
    assert "optim.lr must be a finite number" in msg
    msg, _ = err(tmp_path, MIN, ["model.d_model=abc"])
    assert "model.d_model=abc" in msg and "not a TOML value" in msg


@pytest.mark.parametrize(
    "item, expect",
    [
        ("model.d_model", "malformed override 'model.d_model'"),
        ("d_model=3", "malformed override 'd_model=3'"),
        ("a.b.c=3", "malformed override 'a.b.c=3'"),
        (".x=3", "malformed override '.x=3'"),
        ("modle.d_model=3", "unknown table [modle]"),
        ("model.dmodel=3", "unknown key model.dmodel"),
    ],
)
def test_bad_override(tmp_path, item, expect):
    msg, _ = err(tmp_path, MIN, [item])
    assert expect in msg


def test_parse_overrides_shape():
    (d, src), = parse_overrides(["train.steps=7"])
    assert d == {"train": {"steps": 7}} and "train.steps=7" in src


# ---------------------------------------------------------------------------------- dump / dict


def test_toml_round_trip(tmp_path):
    path = write(tmp_path, MIN)
    cfg = load_config(path, ["optim.betas=[0.85, 0.95]", "model.d_model=48", "optim.lr=2.5e-4",
                             "run.out_dir=runs/x y", "head.normalize_prototypes=false"])
    text = config_to_toml(cfg)
    again = load_config(write(tmp_path, text, "resolved.toml"))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_from_dict(tmp_path):
    cfg = load_config(write(tmp_path, MIN), ["model.d_model=16"])
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.9, 0.999]
    assert config_from_dict(d) == cfg
    d["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown key model.bogus in checkpoint"):
        config_from_dict(d, source="checkpoint")


def test_validate_config_catches_replace(tmp_path):
    cfg = load_config(write(tmp_path, MIN))
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=0))
    with pytest.raises(ConfigError, match="model.d_model must be >= 1"):
        validate_config(bad)
    assert validate_config(cfg) == cfg


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_run_file_is_valid(path):
    cfg = load_config(str(path), [])
    assert cfg.train.steps > 0 and (cfg.data.train or cfg.data.task)
