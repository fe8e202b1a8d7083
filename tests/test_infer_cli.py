"""`rtrainer generate | eval | export | inspect` on real runs trained by the CLI in a temporary
directory, and every bad input: one `rtrainer: error:` line, a non-zero exit, nothing on disk changed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtrainer.generate import HFCodec, generate, sample_next, text_codec
from rtrainer.infer import InferenceState, load_model, scores

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "shakespeare.txt"


def cli(*args, cwd=None, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "rtrainer", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def train(tmp: Path, name: str, *sets, env=None) -> Path:
    out = tmp / name
    base = ["run", ROOT / "examples" / "quickstart.toml", "--headless",
            "--set", f"run.out_dir={json.dumps(str(out))}", "--set", f"data.train={json.dumps(str(CORPUS))}",
            "--set", "run.threads=1", "--set", "model.d_model=32", "--set", "train.seq_len=32",
            "--set", "train.batch_size=8", "--set", "train.steps=20", "--set", "eval.val_every=10",
            "--set", "eval.eval_batches=2", "--set", "checkpoint.save_every=10", "--set", "checkpoint.keep_last=0",
            "--set", "schedule.warmup_steps=2", "--set", "log.log_every=10"]
    for s in sets:
        base += ["--set", s]
    cli(*base, env=env)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_runs")
    return {
        "hpn": train(tmp, "hpn"),
        "softmax": train(tmp, "softmax", 'model.layer="mamba"', 'head.kind="softmax"', "model.expand=2"),
        "tmp": tmp,
    }


def tree(p: Path) -> dict:
    """Every file under p with its size, mtime and content hash (to prove nothing changed)."""
    import hashlib

    out = {}
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(p))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        else:
            out[str(f.relative_to(p))] = "dir"
    return out


def assert_one_error(r, code, match):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtrainer: error:"), r.stderr
    assert match in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ generate

def test_generate_streams_text_deterministically(runs):
    args = ["generate", runs["hpn"], "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "7"]
    a = cli(*args).stdout
    assert a.startswith("ROMEO:") and len(a) == len("ROMEO:") + 40 + 1     # bytes: 40 new characters + "\n"
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
    lm = load_model(str(runs[kind]))
    prompt = list(CORPUS.read_bytes()[:70])                      # 70 > train.seq_len = 32
    gen = generate(lm, prompt, 30, temperature=0.0)[0]
    seq = np.array([prompt + gen.tolist()], np.int64)
    z = lm.model.forward(seq[:, :-1]).copy()
    s = scores(lm.head, z)[len(prompt) - 1:]
    for t, g in enumerate(gen):
        best = s[t].max()
        assert s[t, g] >= best - 1e-4, (t, g, s[t].argmax())


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
    # frequencies follow softmax(logits / T) (chi-square-free check on a 3-token vocabulary)
    lg = np.log(np.array([[0.6, 0.3, 0.1]]))
    r = [np.random.default_rng(5)]
    draws = np.array([sample_next(lg, r, 1.0, None, 1.0)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    # top-p 0.7 keeps {0.6, 0.3} (the smallest set reaching 0.7), renormalised to 2/3, 1/3
    draws = np.array([sample_next(lg, r, 1.0, None, 0.7)[0] for _ in range(3000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [2 / 3, 1 / 3, 0], atol=0.03)
    # rows are independent: row 0 draws the same with or without other rows
    a = sample_next(logits[:1], [np.random.default_rng(9)], 1.0, 10, 0.9)
    b = sample_next(logits, [np.random.default_rng(9)] + rngs[1:], 1.0, 10, 0.9)
    assert a[0] == b[0]


def test_long_prompt_step_state_equals_the_full_forward(runs):
    lm = load_model(str(runs["softmax"]))
    ids = np.array([list(CORPUS.read_bytes()[:200])], np.int64)   # 200 tokens, training length 32
    st = InferenceState(lm, batch=1)
    z = st.prefill(ids)
    zf = lm.model.forward(ids)[-1]
    np.testing.assert_allclose(z[0], zf, atol=5e-6)


# ------------------------------------------------------------------------------------------ eval

@pytest.mark.parametrize("kind", ["hpn", "softmax"])
def test_eval_text_and_token_file_and_shard_dir(runs, kind, tmp_path):
    r = json.loads(cli("eval", runs[kind], "--data", CORPUS, "--json", "--max-batches", "4").stdout)
    assert r["read_as"] == "text" and r["tokens"] == 4 * 8 * 32 and 0 <= r["accuracy"] <= 1
    assert r["step"] == 20 or r["step"] == 10
    u8 = tmp_path / "tok.u8"
    u8.write_bytes(CORPUS.read_bytes())
    r2 = json.loads(cli("eval", runs[kind], "--data", u8, "--format", "u8", "--json", "--max-batches", "4").stdout)
    assert r2["read_as"] == "tokens"
    np.testing.assert_allclose(r2["loss"], r["loss"], rtol=1e-6)        # the same bytes, read two ways
    d = tmp_path / "shards"
    d.mkdir()
    a = np.frombuffer(CORPUS.read_bytes(), np.uint8).astype("<u2")
    a.tofile(d / "000.bin")
    r3 = json.loads(cli("eval", runs[kind], "--data", d, "--json", "--max-batches", "4").stdout)
    np.testing.assert_allclose(r3["loss"], r["loss"], rtol=1e-6)
    if kind == "softmax":
        assert math.isclose(r["bits_per_token"], r["loss"] / math.log(2), rel_tol=1e-12)
        assert math.isclose(r["bits_per_byte"], r["bits_per_token"], rel_tol=1e-9)     # byte-level: 1 byte/token
    else:
        assert r["bits_per_token"] is None and r["bits_per_byte"] is None
    text = cli("eval", runs[kind], "--data", CORPUS, "--max-batches", "2").stdout
    assert "loss" in text and "accuracy" in text


def test_eval_loss_is_the_mean_over_the_windows(runs):
    """The reported loss/accuracy = the head's loss over the same windows computed here by hand."""
    from rtrainer import stream

    lm = load_model(str(runs["softmax"]))
    r = json.loads(cli("eval", runs["softmax"], "--data", CORPUS, "--json", "--max-batches", "3",
                       "--batch-size", "4", "--seq-len", "50").stdout)
    arr = np.frombuffer(CORPUS.read_bytes(), np.uint8).astype(np.int64)
    n = len(arr)
    assert n > 3 * 4 * 50
    # --max-batches 3: 3 batches of windows spread evenly over the data
    W = stream.ShardWindows([stream.Shard("x", None, np.int64, 0, n, array=arr)], 4, 50, 3)
    tot, cor, cnt = 0.0, 0, 0
    for ids, tg in W.batches():
        z = lm.model.forward(ids)
        s = scores(lm.head, z).astype(np.float64)
        m = s.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
        t = tg.reshape(-1)
        tot += float(np.sum(lse - s[np.arange(len(t)), t]))
        cor += int(np.sum(np.argmax(s, axis=1) == t))
        cnt += len(t)
    assert r["tokens"] == cnt
    np.testing.assert_allclose(r["loss"], tot / cnt, rtol=1e-5)
    assert r["accuracy"] == cor / cnt


# ------------------------------------------------------------------------------------------ export

def test_export_is_bitwise_the_checkpoint_and_generates_the_same(runs, tmp_path):
    out = tmp_path / "export"
    r = cli("export", runs["softmax"], out)
    assert "exported step" in r.stdout
    names = sorted(os.listdir(out))
    assert {"README.md", "config.json", "model.safetensors"} <= set(names)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    from safetensors.numpy import load_file

    st = load_file(str(out / "model.safetensors"))
    assert not [k for k in st if "adam" in k]                                # weights only
    a, b = load_model(str(runs["softmax"])), load_model(str(out))
    assert b.kind == "export" and a.step == b.step
    for name in a.flat.params:
        assert a.flat.params[name].tobytes() == b.flat.params[name].tobytes(), name
    ids = np.array([list(b"To be, or not")], np.int64)
    assert a.model.forward(ids).tobytes() == b.model.forward(ids).tobytes()
    g = ["--prompt", "To be", "--max-new-tokens", "30", "--seed", "5"]
    assert cli("generate", runs["softmax"], *g).stdout == cli("generate", out, *g).stdout
    card = (out / "README.md").read_text()
    assert "mamba" in card and f"{sum(v.size for v in st.values()):,}" in card and "rtrainer generate" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"]["model"]["layer"] == "mamba" and cfg["step"] == a.step
    assert cfg["validation"]["val_loss"] is not None
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss_curve.png").stat().st_size > 1000 and "loss_curve.png" in card
    except ImportError:
        assert not (out / "loss_curve.png").exists()
    # inspect reads the export
    rep = json.loads(cli("inspect", out, "--json").stdout)
    assert rep["kind"] == "export" and rep["parameters"]["optimizer_moments"] == 0


def test_export_refuses_a_non_empty_directory_unless_overwrite(runs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    r = cli("export", runs["hpn"], out, check=False)
    assert_one_error(r, 2, "not empty")
    assert tree(tmp_path) == before
    cli("export", runs["hpn"], out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(n for n in os.listdir(tmp_path)) == ["busy"]               # no temp or trash left


def test_export_latest_vs_best(runs, tmp_path):
    cli("export", runs["hpn"], tmp_path / "latest", "--checkpoint", "latest")
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["step"] == 20


# ------------------------------------------------------------------------------------------ inspect

def test_inspect_run_checkpoint_and_corruption(runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["hpn"], run)
    rep = json.loads(cli("inspect", run, "--json").stdout)
    assert rep["kind"] == "run" and [c["step"] for c in rep["checkpoints"]] == [20, 10]
    assert all(c["ok"] for c in rep["checkpoints"])
    assert rep["step"] == 20 and rep["data_cursor"]["batches"] == 20 and rep["best_step"] in (10, 20)
    lm = load_model(str(run), which="latest")
    rows = {t["name"]: t for t in rep["tensors"]}
    for name, v in lm.flat.params.items():
        row = rows["param/" + name]
        assert row["shape"] == list(v.shape) and row["non_finite"] == 0
        np.testing.assert_allclose(row["norm"], np.linalg.norm(v.astype(np.float64)), rtol=1e-12)
    assert rep["parameters"]["total"] == sum(v.size for v in lm.flat.params.values())
    assert rep["parameters"]["trainable"] == lm.flat.n_trainable < rep["parameters"]["total"]   # fixed prototypes
    # corrupt step 10: the run report flags it, inspecting it alone is an error
    f = run / "checkpoints" / "step-00000010" / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF
    f.write_bytes(bytes(b))
    rep = json.loads(cli("inspect", run, "--json").stdout)
    bad = [c for c in rep["checkpoints"] if not c["ok"]]
    assert [c["step"] for c in bad] == [10] and "checksum" in bad[0]["error"]
    assert "INVALID" in cli("inspect", run).stdout
    # a checkpoint's tensor file on its own; strict JSON (no NaN/Infinity literals)
    good = run / "checkpoints" / "step-00000020" / "model.safetensors"
    rep = json.loads(cli("inspect", good, "--json").stdout, parse_constant=lambda c: pytest.fail(c))
    assert rep["kind"] == "checkpoint" and rep["step"] == 20
    assert_one_error(cli("inspect", f.parent, check=False), 3, "checksum mismatch")
    assert_one_error(cli("generate", f.parent, check=False), 3, "checksum mismatch")


def test_inspect_counts_non_finite_values(tmp_path):
    env = dict(os.environ, RTRAINER_FAULT="nan_param_after_step=10:layers.0.D_skip")
    run = train(tmp_path, "nan", "train.steps=12", "eval.val_every=0", env=env)
    rep = json.loads(cli("inspect", run / "checkpoints" / "step-00000012", "--json").stdout)
    rows = {t["name"]: t for t in rep["tensors"]}
    assert rows["param/layers.0.D_skip"]["non_finite"] == 32
    assert rep["non_finite_tensors"] == ["param/layers.0.D_skip"]
    assert "WARNING: non-finite" in cli("inspect", run / "checkpoints" / "step-00000012").stdout


# ------------------------------------------------------------------------------------------ tokenizers

def test_tokenizer_json_is_used_and_checked_against_the_vocabulary(runs, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    def bpe(vocab, full_alphabet):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        extra = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if full_alphabet else {}
        tok.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=vocab, show_progress=False, **extra))
        return tok

    lm = load_model(str(runs["softmax"]))
    V = lm.vocab_size
    wrong = tmp_path / "wrong.json"
    bpe(300, True).save(str(wrong))
    lm.tokenizer_path = str(wrong)
    from rtrainer.errors import DataError

    with pytest.raises(DataError, match="the tokenizer has 300 tokens but the model has V = 126"):
        text_codec(lm)
    # a BPE of exactly V tokens (the corpus' own alphabet + merges) is used for text <-> ids
    tok = bpe(V, False)
    assert tok.get_vocab_size() == V
    right = tmp_path / "right.json"
    tok.save(str(right))
    lm.tokenizer_path = str(right)
    codec = text_codec(lm)
    assert isinstance(codec, HFCodec) and codec.vocab_size == V
    text = "To be, or not to be"
    ids = codec.encode(text)
    assert len(ids) < len(text) and codec.decode(ids) == text
    assert int(codec.token_bytes(V)[ids].sum()) == len(text.encode())     # bytes per token, for bits/byte
    gen = generate(lm, ids, 20, temperature=1.0, seed=2)[0]
    assert isinstance(codec.decode(gen.tolist()), str)


# ------------------------------------------------------------------------------------------ bad input

def test_bad_input_is_one_error_line_and_changes_nothing(runs, tmp_path):
    run = runs["hpn"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model at all" * 10)
    empty_prompt = tmp_path / "empty.txt"
    empty_prompt.write_bytes(b"")
    before = tree(run), tree(tmp_path)
    cases = [
        (["generate", junk], 3, "not a valid rtrainer checkpoint"),
        (["generate", tmp_path], 3, "not an rtrainer model"),
        (["generate", tmp_path / "missing"], 3, "not found"),
        (["eval", junk, "--data", CORPUS], 3, "not a valid rtrainer checkpoint"),
        (["inspect", junk], 3, "not a valid rtrainer checkpoint"),
        (["export", junk, tmp_path / "e"], 3, "not a valid rtrainer checkpoint"),
        (["generate", run, "--top-k", "1000"], 2, "--top-k must be in [1, V = 126]"),
        (["generate", run, "--top-k", "0"], 2, "--top-k"),
        (["generate", run, "--temperature", "-0.5"], 2, "--temperature must be >= 0"),
        (["generate", run, "--max-new-tokens", "-1"], 2, "--max-new-tokens must be >= 0"),
        (["generate", run, "--top-p", "0"], 2, "--top-p"),
        (["generate", run, "--num-samples", "0"], 2, "--num-samples"),
        (["generate", run, "--tau", "0"], 2, "--tau must be > 0"),
        (["generate", run, "--threads", "-1"], 2, "--threads must be >= 0"),
        (["eval", run, "--data", CORPUS, "--batch-size", "0"], 2, "--batch-size >= 1"),
        (["generate", run, "--prompt", "a", "--prompt-file", empty_prompt], 2, "not both"),
        (["generate", run, "--prompt", ""], 2, "encodes to no tokens"),
        (["generate", run, "--prompt-file", empty_prompt], 2, "encodes to no tokens"),
        (["generate", run, "--prompt", "caf\u00e9"], 2, "which the model (V = 126) does not have"),
        (["generate", run, "--prompt-file", tmp_path / "nope.txt"], 2, "cannot read --prompt-file"),
        (["eval", run, "--data", tmp_path / "nope.bin"], 3, "data not found"),
        (["eval", run, "--data", empty_prompt], 3, "encodes to no tokens"),
    ]
    for args, code, match in cases:
        assert_one_error(cli(*args, check=False), code, match)
    assert (tree(run), tree(tmp_path)) == before


def test_run_directory_best_and_latest(runs, tmp_path):
    """best = run_state.json's best_step (rewritten at every checkpoint); a best.json a run started over
    with --overwrite left behind is not used; latest = the newest checkpoint that verifies."""
    import shutil

    from rtrainer.infer import resolve_model_path

    run = tmp_path / "r"
    shutil.copytree(runs["hpn"], run)
    rs = json.loads((run / "run_state.json").read_text())
    rs["best_step"] = 10
    (run / "run_state.json").write_text(json.dumps(rs))
    assert resolve_model_path(str(run))[0].endswith("step-00000010")
    assert resolve_model_path(str(run), "latest")[0].endswith("step-00000020")
    rs["best_step"] = None
    (run / "run_state.json").write_text(json.dumps(rs))
    (run / "checkpoints" / "best.json").write_text(json.dumps({"step": 10}))
    assert resolve_model_path(str(run))[0].endswith("step-00000020")
    # latest skips a checkpoint that does not verify
    (run / "checkpoints" / "step-00000020" / "MANIFEST.json").unlink()
    assert resolve_model_path(str(run), "latest")[0].endswith("step-00000010")
