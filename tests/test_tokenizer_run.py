"""A run trained through `rtrainer tokenize` and `data.tokenizer`: everything that reads its
checkpoints (generate, eval, export, inspect, the library) decodes with the tokenizer the
checkpoint records, checks its hash, and lets `--tokenizer` take precedence."""
import json
import math
import shutil

import pytest

import rtrainer
from conftest import CORPUS, run_cli
from rtrainer.generate import generate, open_model
from rtrainer.tokenizer import load_tokenizer

PROMPT = "And the king said to the"


def ok(*args):
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    return p


def one_error(p, code, match):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("rtrainer: error:"), (p.returncode, p.stderr)
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    text = tmp / "corpus.txt"
    text.write_bytes(CORPUS.read_bytes()[:120_000])
    lines = ok("tokenize", text, "--out", tmp / "tok", "--vocab-size", "400", "--doc-separator", r"\n\n", "--quiet").stdout
    cfg = tmp / "run.toml"
    cfg.write_text(f"""
[run]
out_dir = "{tmp / 'run'}"
seed = 5
threads = 1
[head]
kind = "softmax"
[train]
steps = 12
batch_size = 4
seq_len = 32
[eval]
val_every = 6
eval_batches = 1
[checkpoint]
save_every = 6
keep_last = 0
[log]
log_every = 6
""" + lines.replace("[model]\n", "[model]\nd_model = 16\nd_state = 4\nbase_layers = 1\ntarget_layers = 1\n"))
    ok("run", cfg, "--headless")
    return tmp, tmp / "run", tmp / "tok" / "tokenizer.json", text


def test_the_recorded_tokenizer_decodes_and_a_flag_takes_precedence(bpe_run, tmp_path):
    tmp, run, tok_path, _ = bpe_run
    tok = load_tokenizer(tok_path)
    g = ["--prompt", PROMPT, "--max-new-tokens", "30", "--seed", "2"]
    a = ok("generate", run, *g).stdout
    net, used = open_model(str(run))
    assert used.sha256 == tok.sha256                           # no flag: the checkpoint's own tokenizer
    ids = tok.encode(PROMPT)
    assert len(ids) < len(PROMPT.encode())                     # BPE merges, not bytes
    assert a == PROMPT + tok.decode(generate(net, ids, 30, temperature=0.8, seed=2)[0].tolist()) + "\n"
    # --tokenizer wins over the record: the same V, other merges -> another encoding of the prompt
    other = tmp_path / "other.json"
    j = json.loads(tok_path.read_text())
    j["model"]["merges"] = j["model"]["merges"][: len(j["model"]["merges"]) // 2]
    other.write_text(json.dumps(j))
    o = load_tokenizer(other)
    assert o.vocab_size == tok.vocab_size and o.encode(PROMPT) != ids
    b = ok("generate", run, *g, "--tokenizer", other).stdout
    _, used = open_model(str(run), tokenizer=str(other))
    assert used.sha256 == o.sha256 and b.startswith(PROMPT) and b != a


def test_a_recorded_tokenizer_that_is_gone_or_changed_is_an_integrity_error(bpe_run, tmp_path):
    _, run, tok_path, _ = bpe_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    saved = tok_path.read_bytes()
    try:
        j = json.loads(saved)
        j["model"]["merges"] = j["model"]["merges"][::-1]
        tok_path.write_text(json.dumps(j))                         # the file changed since training
        one_error(run_cli("generate", moved, "--prompt", "a"), 3, "changed since")
        tok_path.unlink()                                          # ... or is gone
        one_error(run_cli("generate", moved, "--prompt", "a"), 3, "no longer exists")
        one_error(run_cli("eval", moved, "--data", CORPUS), 3, "no longer exists")
    finally:
        tok_path.write_bytes(saved)
    ok("generate", moved, "--prompt", "a", "--max-new-tokens", "3")


def test_export_carries_the_recorded_tokenizer_and_inspect_shows_it(bpe_run, tmp_path):
    _, run, tok_path, _ = bpe_run
    out = tmp_path / "export"
    ok("export", run, out)
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    g = ["--prompt", PROMPT, "--max-new-tokens", "25", "--seed", "9"]
    assert ok("generate", out, *g).stdout == ok("generate", run, *g).stdout
    assert rtrainer.load(str(out)).predict  # the library reads it too
    rep = json.loads(ok("inspect", run, "--json").stdout)
    sha = load_tokenizer(tok_path).sha256
    assert sha in json.dumps(rep)
    assert sha in ok("inspect", out).stdout or sha[:12] in ok("inspect", out).stdout


def test_bits_per_byte_through_the_recorded_tokenizer(bpe_run):
    _, run, _, text = bpe_run
    r = json.loads(ok("eval", run, "--data", text, "--json", "--max-batches", "4").stdout)
    assert r["read_as"] == "text"
    assert math.isclose(r["bits_per_token"], r["loss"] / math.log(2), rel_tol=1e-12)
    # a BPE token covers more than one byte, so a bit per token is spread over several bytes
    assert 0 < r["bits_per_byte"] < r["bits_per_token"] / 1.5
