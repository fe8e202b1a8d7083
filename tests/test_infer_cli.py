"""`rtrainer generate | eval | export | inspect` on real runs trained by the CLI in a temporary
directory, the library's load of exports and run directories, and every bad input: one
`rtrainer: error:` line, a non-zero exit, nothing on disk changed."""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import rtrainer
from conftest import CORPUS, run_cli, tiny_config
from rtrainer import runstate
from rtrainer.errors import CheckpointError, ConfigError
from rtrainer.generate import generate, model_tokenizer, open_model, sample_next
from rtrainer.infer import HeadScorer, InferenceState
from rtrainer.stream import ShardWindows
from rtrainer.shards import Shard

V = 128          # tiny_config's model.vocab_size
TEXT = CORPUS.read_bytes()[:60_000]


def cli(*args, env_extra=None):
    p = run_cli(*args, env_extra=env_extra)
    assert p.returncode == 0, p.stderr
    return p


def train(tmp: Path, *sets, steps=20, env_extra=None) -> Path:
    cfg = tiny_config(tmp, steps=steps)
    args = ["run", cfg, "--headless", "--set", "checkpoint.keep_last=0"]
    for s in sets:
        args += ["--set", s]
    cli(*args, env_extra=env_extra)
    return tmp / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def one(name, *sets):
        return train(tmp_path_factory.mktemp(name), *sets)

    return {"hpn": one("hpn"),
            "softmax": one("softmax", 'model.layer="mamba"', 'head.kind="softmax"', "model.expand=2")}


def tree(p: Path) -> dict:
    """Every file under p with its size, mtime and content hash (to prove nothing changed)."""
    out = {}
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(p))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        else:
            out[str(f.relative_to(p))] = "dir"
    return out


def assert_one_error(p, code, match):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtrainer: error:"), p.stderr
    assert match in lines[0], lines[0]


def bpe(path: Path, vocab: int, full_alphabet: bool) -> Path:
    """A byte-level BPE tokenizer.json trained on the corpus (vocab entries in all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if full_alphabet else {}
    tok.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=vocab, show_progress=False, **extra))
    assert tok.get_vocab_size() == vocab
    tok.save(str(path))
    return path


# ------------------------------------------------------------------------------------------ generate

def test_generate_streams_text_deterministically(runs):
    args = ["generate", runs["hpn"], "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "7"]
    a = cli(*args).stdout
    assert a.startswith("ROMEO:") and len(a) == len("ROMEO:") + 40 + 1     # bytes < 128: 40 characters + "\n"
    assert cli(*args).stdout == a                                         # same seed, same text
    assert cli(*args[:-1], "8").stdout != a                               # another seed, another sample


def test_num_samples_are_batched_and_sample_one_matches_a_single_sample(runs):
    one = cli("generate", runs["softmax"], "--prompt", "KING", "--max-new-tokens", "25", "--seed", "3").stdout
    many = cli("generate", runs["softmax"], "--prompt", "KING", "--max-new-tokens", "25", "--seed", "3",
               "--num-samples", "3").stdout
    parts = many.split("--- sample ")
    assert len(parts) == 4 and parts[1].startswith("1/3\n")
    assert parts[1][len("1/3\n"):] == one
    assert len({p[4:] for p in parts[1:]}) > 1                              # the samples differ


@pytest.mark.parametrize("kind", ["hpn", "softmax"])
def test_greedy_generation_is_the_arg_max_of_the_training_forward(runs, kind):
    """Greedy ids, fed back through the full (window) forward: each is the arg max of the scores at
    the position before it (up to near-ties); the prompt is longer than the training length."""
    net, _ = open_model(str(runs[kind]), threads=1)
    prompt = list(TEXT[:70])                                     # 70 > train.seq_len = 32
    gen = generate(net, prompt, 30, temperature=0.0)[0]
    seq = np.array([prompt + gen.tolist()], np.int64)
    s = HeadScorer(net.head)(net.forward(seq[:, :-1]).copy())[len(prompt) - 1:]
    for t, g in enumerate(gen):
        assert s[t, g] >= s[t].max() - 1e-4, (t, g, s[t].argmax())


@pytest.mark.parametrize("kind", ["hpn", "softmax"])
def test_step_mode_of_a_trained_model_equals_its_forward_at_every_position(runs, kind):
    """200 tokens (the training length is 32) through the step mode of a loaded Net, batched over 2
    sequences: z at every position equals the training forward's."""
    net, _ = open_model(str(runs[kind]), threads=1)
    ids = np.frombuffer(TEXT[:400], np.uint8).astype(np.int64).reshape(2, 200)
    zf = net.forward(ids).reshape(2, 200, -1).copy()
    st = InferenceState(net, batch=2)
    for t in range(200):
        np.testing.assert_allclose(st.step(ids[:, t]), zf[:, t], rtol=0, atol=5e-6, err_msg=f"position {t}")


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50))
    greedy = np.argmax(logits, axis=1)
    rngs = [np.random.default_rng([1, i]) for i in range(4)]
    np.testing.assert_array_equal(sample_next(logits, rngs, 1.0, 1, 1.0), greedy)        # top-k 1
    np.testing.assert_array_equal(sample_next(logits, rngs, 1.0, None, 1e-9), greedy)     # tiny nucleus
    np.testing.assert_array_equal(sample_next(logits, rngs, 0.0, None, 1.0), greedy)      # temperature 0
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for _ in range(50):
        got = sample_next(logits, rngs, 2.0, 5, 1.0)
        assert all(got[i] in top5[i] for i in range(4))
    # frequencies follow softmax(logits / T) on a 3-token vocabulary
    lg = np.log(np.array([[0.6, 0.3, 0.1]]))
    r = [np.random.default_rng(5)]
    draws = np.array([sample_next(lg, r, 1.0, None, 1.0)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [0.6, 0.3, 0.1], atol=0.03)
    # top-p 0.7 keeps {0.6, 0.3} (the smallest set reaching 0.7), renormalised to 2/3, 1/3
    draws = np.array([sample_next(lg, r, 1.0, None, 0.7)[0] for _ in range(3000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [2 / 3, 1 / 3, 0], atol=0.03)
    # rows are independent: row 0 draws the same with or without other rows
    a = sample_next(logits[:1], [np.random.default_rng(9)], 1.0, 10, 0.9)
    b = sample_next(logits, [np.random.default_rng(9)] + rngs[1:], 1.0, 10, 0.9)
    assert a[0] == b[0]


# ------------------------------------------------------------------------------------------ eval

@pytest.mark.parametrize("kind", ["hpn", "softmax"])
def test_eval_text_and_token_file_and_shard_dir(runs, kind, tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    r = json.loads(cli("eval", runs[kind], "--data", text, "--json", "--max-batches", "4").stdout)
    assert r["read_as"] == "text" and r["tokens"] == 4 * 8 * 32 and 0 <= r["accuracy"] <= 1
    assert r["step"] == 20
    u8 = tmp_path / "tok.u8"
    u8.write_bytes(TEXT)
    r2 = json.loads(cli("eval", runs[kind], "--data", u8, "--format", "u8", "--json", "--max-batches", "4").stdout)
    assert r2["read_as"] == "tokens" and r2["loss"] == r["loss"]            # the same bytes, read two ways
    d = tmp_path / "shards"
    d.mkdir()
    np.frombuffer(TEXT, np.uint8).astype("<u2").tofile(d / "000.bin")
    r3 = json.loads(cli("eval", runs[kind], "--data", d, "--json", "--max-batches", "4").stdout)
    assert r3["loss"] == r["loss"]
    if kind == "softmax":
        assert math.isclose(r["bits_per_token"], r["loss"] / math.log(2), rel_tol=1e-12)
        assert math.isclose(r["bits_per_byte"], r["bits_per_token"], rel_tol=1e-9)     # bytes: 1 byte/token
        assert r3["bits_per_byte"] is not None
    else:
        assert r["bits_per_token"] is None and r["bits_per_byte"] is None
    out = cli("eval", runs[kind], "--data", text, "--max-batches", "2").stdout
    assert "loss" in out and "accuracy" in out


def test_eval_loss_is_the_mean_over_the_windows(runs, tmp_path):
    """The reported loss/accuracy = the softmax cross-entropy over the same windows, by hand."""
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT)
    r = json.loads(cli("eval", runs["softmax"], "--data", text, "--json", "--max-batches", "3",
                       "--batch-size", "4", "--seq-len", "50").stdout)
    net, _ = open_model(str(runs["softmax"]), threads=1)
    arr = np.frombuffer(TEXT, np.uint8).astype(np.int64)
    W = ShardWindows([Shard.from_array(arr)], 4, 50, 3)
    tot, cor, cnt = 0.0, 0, 0
    for ids, tg in W.batches():
        s = HeadScorer(net.head)(net.forward(ids)).astype(np.float64)
        m = s.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
        t = tg.reshape(-1)
        tot += float(np.sum(lse - s[np.arange(len(t)), t]))
        cor += int(np.sum(np.argmax(s, axis=1) == t))
        cnt += len(t)
    assert r["tokens"] == cnt == 3 * 4 * 50
    np.testing.assert_allclose(r["loss"], tot / cnt, rtol=1e-5)
    assert r["accuracy"] == cor / cnt


# ------------------------------------------------------------------------------------------ export

def test_export_is_bitwise_the_checkpoint_and_generates_the_same(runs, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "export"
    assert "exported step 20" in cli("export", runs["softmax"], out).stdout
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    st = load_file(str(out / "model.safetensors"))
    assert not [k for k in st if "adam" in k or "/" in k]                    # weights only, by name
    a = rtrainer.load(runs["softmax"], which="best")
    b = rtrainer.load(out)
    assert b.state["kind"] == "export" and a.state["step"] == b.state["step"] == 20
    assert a.flat.param_buf.tobytes() == b.flat.param_buf.tobytes()
    assert not b.flat.m.any() and not b.flat.v.any()
    ids = np.array([list(b"To be, or not to be, that is the question")], np.int64)
    assert a.forward(ids).tobytes() == b.forward(ids).tobytes()
    assert a.loss(ids[:, :-1], ids[:, 1:]) == b.loss(ids[:, :-1], ids[:, 1:])
    g = ["--prompt", "To be", "--max-new-tokens", "30", "--seed", "5"]
    assert cli("generate", runs["softmax"], *g).stdout == cli("generate", out, *g).stdout
    assert model_tokenizer(b).is_bytes
    card = (out / "README.md").read_text()
    assert "mamba" in card and f"{sum(v.size for v in st.values()):,}" in card and "rtrainer generate" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"]["model"]["layer"] == "mamba" and cfg["step"] == 20
    assert cfg["validation"]["val_loss"] is not None and cfg["architecture"]["model"]["vocab_size"] == V
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss_curve.png").stat().st_size > 1000 and "loss_curve.png" in card
    except ImportError:
        assert not (out / "loss_curve.png").exists()
    rep = json.loads(cli("inspect", out, "--json").stdout)
    assert rep["kind"] == "export" and rep["parameters"]["optimizer_moments"] == 0
    assert rep["parameters"]["total"] == a.flat.size
    # an export of the export is the same model
    cli("export", out, tmp_path / "again")
    assert rtrainer.load(tmp_path / "again").flat.param_buf.tobytes() == a.flat.param_buf.tobytes()


def test_export_refuses_a_non_empty_directory_unless_overwrite(runs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    assert_one_error(run_cli("export", runs["hpn"], out), 2, "not empty")
    assert tree(tmp_path) == before
    cli("export", runs["hpn"], out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["busy"]                          # no temp or trash left


def test_run_directory_best_and_latest(runs, tmp_path):
    """best = run_state.json's best_step; latest = the newest checkpoint that verifies."""
    run = tmp_path / "r"
    shutil.copytree(runs["hpn"], run)
    rs = json.loads((run / "run_state.json").read_text())
    rs["best_step"] = 10
    (run / "run_state.json").write_text(json.dumps(rs))
    assert runstate.find_model(run, "best")[0].endswith("step-00000010")
    assert runstate.find_model(run, "latest")[0].endswith("step-00000020")
    assert rtrainer.load(run, which="best").state["step"] == 10
    cli("export", run, tmp_path / "latest", "--checkpoint", "latest")
    cli("export", run, tmp_path / "best")
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["step"] == 20
    assert json.loads((tmp_path / "best" / "config.json").read_text())["step"] == 10
    rs["best_step"] = None                                                   # never validated: the newest
    (run / "run_state.json").write_text(json.dumps(rs))
    assert runstate.find_model(run, "best")[0].endswith("step-00000020")
    # latest skips a checkpoint that does not verify
    (run / "checkpoints" / "step-00000020" / "MANIFEST.json").unlink()
    assert runstate.find_model(run, "latest")[0].endswith("step-00000010")
    with pytest.raises(ConfigError, match="'best' or 'latest'"):
        runstate.find_model(run, "newest")


# ------------------------------------------------------------------------------------------ inspect

def test_inspect_run_checkpoint_and_corruption(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["hpn"], run)
    rep = json.loads(cli("inspect", run, "--json").stdout)
    assert rep["kind"] == "run" and [c["step"] for c in rep["checkpoints"]] == [20, 10]
    assert all(c["ok"] for c in rep["checkpoints"])
    assert rep["step"] == 20 and rep["data_cursor"]["batches"] == 20 and rep["best_step"] in (10, 20)
    net = rtrainer.load(run)
    rows = {t["name"]: t for t in rep["tensors"]}
    for name, v in net.params.items():
        row = rows["param/" + name]
        assert row["shape"] == list(v.shape) and row["non_finite"] == 0
        np.testing.assert_allclose(row["norm"], np.linalg.norm(v.astype(np.float64)), rtol=1e-12)
    assert rep["parameters"]["total"] == net.flat.size
    assert rep["parameters"]["trainable"] == net.flat.n_trainable < net.flat.size    # fixed prototypes
    # corrupt step 10: the run report flags it, inspecting or generating from it alone is an error
    f = run / "checkpoints" / "step-00000010" / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    rep = json.loads(cli("inspect", run, "--json").stdout)
    bad = [c for c in rep["checkpoints"] if not c["ok"]]
    assert [c["step"] for c in bad] == [10] and "checksum mismatch" in bad[0]["error"]
    assert "INVALID" in cli("inspect", run).stdout
    good = run / "checkpoints" / "step-00000020" / "model.safetensors"
    rep = json.loads(cli("inspect", good, "--json").stdout, parse_constant=lambda c: pytest.fail(c))
    assert rep["kind"] == "checkpoint" and rep["step"] == 20
    assert_one_error(run_cli("inspect", f.parent), 3, "checksum mismatch")
    assert_one_error(run_cli("generate", f.parent), 3, "checksum mismatch")


def test_inspect_counts_non_finite_values(tmp_path):
    run = train(tmp_path, "eval.val_every=0", steps=12,
                env_extra={"RTRAINER_FAULT": "nan_param_after_step=10:layers.0.D_skip"})
    step = run / "checkpoints" / "step-00000012"
    rep = json.loads(cli("inspect", step, "--json").stdout)
    rows = {t["name"]: t for t in rep["tensors"]}
    assert rows["param/layers.0.D_skip"]["non_finite"] == 16
    assert rep["non_finite_tensors"] == ["param/layers.0.D_skip"]
    assert "WARNING: non-finite" in cli("inspect", step).stdout


# ------------------------------------------------------------------------------------------ tokenizers

def test_a_tokenizer_file_is_used_checked_and_exported(runs, tmp_path):
    """--tokenizer FILE: its vocabulary must be the model's; a matching one encodes the prompt and
    decodes the sample, eval reads text through it, and an export carries it (hash-checked)."""
    wrong = bpe(tmp_path / "wrong.json", 300, True)
    assert_one_error(run_cli("generate", runs["softmax"], "--tokenizer", wrong), 2,
                     "the tokenizer has 300 tokens but the model has V = 128")
    right = bpe(tmp_path / "right.json", V, False)
    g = ["--prompt", "To be, or not", "--max-new-tokens", "20", "--seed", "4", "--tokenizer", right]
    a = cli("generate", runs["softmax"], *g).stdout
    assert a.startswith("To be, or not") and cli("generate", runs["softmax"], *g).stdout == a
    net, tok = open_model(str(runs["softmax"]), tokenizer=str(right))
    ids = tok.encode("To be, or not")
    assert len(ids) < len("To be, or not")                                  # BPE merges, not bytes
    gen = generate(net, ids, 20, temperature=0.8, seed=4)[0]
    assert a == "To be, or not" + tok.decode(gen.tolist()) + "\n"
    text = tmp_path / "t.txt"
    text.write_bytes(TEXT[:5000])
    r = json.loads(cli("eval", runs["softmax"], "--data", text, "--tokenizer", right, "--json").stdout)
    assert r["read_as"] == "text" and r["tokens"] > 0 and r["bits_per_byte"] < r["bits_per_token"]
    out = tmp_path / "exp"
    cli("export", runs["softmax"], out, "--tokenizer", right)
    assert (out / "tokenizer.json").read_bytes() == right.read_bytes()
    assert cli("generate", out, *g[:-2]).stdout == a                        # the export's own tokenizer
    # a tokenizer.json changed after the export no longer matches its recorded hash
    (out / "tokenizer.json").write_bytes(wrong.read_bytes())
    assert_one_error(run_cli("generate", out, "--prompt", "a"), 3, "sha256")


def test_a_run_on_token_ids_needs_a_tokenizer_for_text(tmp_path):
    from rtrainer.tokenizer import byte_tokenizer

    data = tmp_path / "ids.bin"
    np.frombuffer(TEXT, np.uint8).astype("<u2").tofile(data)
    run = train(tmp_path, f"data.train={json.dumps(str(data))}", 'data.format="u16"', steps=10)
    assert_one_error(run_cli("generate", run, "--prompt", "a"), 2, "give --tokenizer FILE")
    text = tmp_path / "t.txt"
    text.write_bytes(TEXT[:3000])
    assert_one_error(run_cli("eval", run, "--data", text), 2, "has no tokenizer")
    assert json.loads(cli("eval", run, "--data", data, "--json").stdout)["read_as"] == "tokens"
    bytes_json = tmp_path / "bytes.json"
    byte_tokenizer().save(bytes_json)                                          # 257 ids: bytes + <|endoftext|>
    assert cli("generate", run, "--prompt", "KING", "--tokenizer", bytes_json,
               "--max-new-tokens", "5").stdout.startswith("KING")


# ------------------------------------------------------------------------------------------ bad input

def test_bad_input_is_one_error_line_and_changes_nothing(runs, tmp_path):
    run = runs["hpn"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model at all" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    not_json = tmp_path / "tok.json"
    not_json.write_text("{ no")
    export_dir = tmp_path / "half-export"
    export_dir.mkdir()
    (export_dir / "config.json").write_text("{}")
    (export_dir / "model.safetensors").write_bytes(b"\0" * 64)
    before = tree(run), tree(tmp_path)
    cases = [
        (["generate", junk], 3, "not a valid rtrainer checkpoint"),
        (["generate", tmp_path], 3, "not an rtrainer model"),
        (["generate", tmp_path / "missing"], 3, "no such checkpoint"),
        (["generate", export_dir], 3, "not a valid rtrainer checkpoint"),
        (["eval", junk, "--data", CORPUS], 3, "not a valid rtrainer checkpoint"),
        (["inspect", junk], 3, "not a valid rtrainer checkpoint"),
        (["inspect", tmp_path], 3, "not an rtrainer checkpoint, run directory or export"),
        (["export", junk, tmp_path / "e"], 3, "not a valid rtrainer checkpoint"),
        (["generate", run, "--top-k", "1000"], 2, "--top-k must be in [1, V = 128]"),
        (["generate", run, "--top-k", "0"], 2, "--top-k"),
        (["generate", run, "--temperature", "-0.5"], 2, "--temperature must be >= 0"),
        (["generate", run, "--temperature", "nan"], 2, "--temperature must be >= 0"),
        (["generate", run, "--max-new-tokens", "-1"], 2, "--max-new-tokens must be >= 0"),
        (["generate", run, "--top-p", "0"], 2, "--top-p"),
        (["generate", run, "--top-p", "1.5"], 2, "--top-p"),
        (["generate", run, "--num-samples", "0"], 2, "--num-samples"),
        (["generate", run, "--tau", "0"], 2, "--tau must be > 0"),
        (["generate", run, "--threads", "-1"], 2, "--threads must be >= 0"),
        (["generate", run, "--tokenizer", not_json], 3, "not a tokenizer.json"),
        (["generate", run, "--tokenizer", tmp_path / "nope.json"], 3, "tokenizer file not found"),
        (["eval", run, "--data", CORPUS, "--batch-size", "0"], 2, "--batch-size >= 1"),
        (["generate", run, "--prompt", "a", "--prompt-file", empty], 2, "not both"),
        (["generate", run, "--prompt", ""], 2, "encodes to no tokens"),
        (["generate", run, "--prompt-file", empty], 2, "encodes to no tokens"),
        (["generate", run, "--prompt", "caf\u00e9"], 2, "which the model (V = 128) does not have"),
        (["generate", run, "--prompt-file", tmp_path / "nope.txt"], 2, "cannot read --prompt-file"),
        (["eval", run, "--data", tmp_path / "nope.bin"], 3, "data not found"),
        (["eval", run, "--data", empty], 3, "encodes to no tokens"),
        (["export", run, junk], 2, "exists and is not a directory"),
        (["export", run, run / "checkpoints"], 2, "not empty"),
    ]
    for args, code, match in cases:
        assert_one_error(run_cli(*args), code, match)
    assert (tree(run), tree(tmp_path)) == before


def test_the_library_reads_what_the_commands_read(runs, tmp_path):
    """rtrainer.load of a run directory = its newest valid checkpoint (as before); of a path that is
    no model, a CheckpointError naming it."""
    net = rtrainer.load(runs["hpn"])
    assert net.state["step"] == 20 and net.source.endswith("step-00000020")
    with pytest.raises(CheckpointError, match="not an rtrainer model"):
        rtrainer.load(tmp_path)
