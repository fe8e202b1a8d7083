"""`rtrainer tokenize` and the run's tokenizer (data.tokenizer): real files, real processes."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, run_cli
from rtrainer import shards
from rtrainer.tokenizer import EOD_TOKEN, byte_tokenizer, file_sha256, load_tokenizer

WORDS = ("the of and to in is was he for it with as his on be at by had are but from or not this which you were "
         "all her she there would their we him been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like "
         "über naïve café 東京 Ωμέγα").split()


def make_docs(n, seed=0, words=(20, 200)):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(*words)
        text = " ".join(rng.choice(WORDS) for _ in range(k))
        text = text.replace(" the ", "\nthe ", 2).replace(" and ", ",  and ", 1)
        docs.append(f"doc {i}: {text}.")
    return docs


def read_shards(d, fmt):
    found = shards.open_source(str(d), fmt)
    return np.concatenate([np.concatenate([c for _, c in s.chunks()]) for s in found]).astype(np.int64)


def split_at(ids, eod):
    cut = np.flatnonzero(ids == eod)
    assert len(cut) and cut[-1] == len(ids) - 1, "every document ends with the end-of-document token"
    return [ids[a + 1:b] for a, b in zip(np.r_[-1, cut[:-1]], cut)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    docs = make_docs(40)
    for i in range(0, 40, 4):  # 10 files of 4 documents, separated by a blank line
        (d / ("sub" if i >= 20 else ".") / f"f{i:02d}.txt").write_text("\n\n".join(docs[i:i + 4]), encoding="utf-8")
    (d / ".hidden.txt").write_text("never read")
    return d, docs


def test_bpe_train_split_by_documents_and_decode_back(tmp_path, corpus):
    d, docs = corpus
    out = tmp_path / "tok"
    p = run_cli("tokenize", d, "--out", out, "--vocab-size", "400", "--doc-separator", r"\n\n", "--val-ratio", "0.2",
                check=True)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size <= 400 and meta["format"] == "u16"
    assert meta["tokenizer"]["sha256"] == file_sha256(out / "tokenizer.json") == tok.sha256
    eod = meta["tokenizer"]["eod_id"]
    assert eod == tok.eod_id == tok.special_ids[EOD_TOKEN]
    assert meta["documents"] == {"train": 32, "val": 8}
    assert len(meta["inputs"]) == 10 and all(len(i["sha256"]) == 64 for i in meta["inputs"])
    assert {i["sha256"] for i in meta["inputs"]} == {file_sha256(f) for f in d.rglob("f*.txt")}
    train, val = read_shards(out / "train", "u16"), read_shards(out / "val", "u16")
    assert len(train) == meta["tokens"]["train"] and len(val) == meta["tokens"]["val"]
    tr = [tok.decode(x) for x in split_at(train, eod)]
    va = [tok.decode(x) for x in split_at(val, eod)]
    assert len(tr) == 32 and len(va) == 8
    assert sorted(tr + va) == sorted(docs)          # whole documents, each in exactly one split
    assert not set(tr) & set(va)
    # the printed run-file lines point at what was written
    assert f'train = "{out / "train"}"' in p.stdout and f'tokenizer = "{out / "tokenizer.json"}"' in p.stdout
    assert 'format = "u16"' in p.stdout and f'val = "{out / "val"}"' in p.stdout
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tok")]   # no temporary directory left


def test_encode_with_existing_tokenizer_matches_whole_document_encoding(tmp_path, corpus):
    d, docs = corpus
    run_cli("tokenize", d, "--out", tmp_path / "a", "--vocab-size", "350", "--val-ratio", "0", check=True)
    tok_file = tmp_path / "a" / "tokenizer.json"
    # one long document (far more than one encoder piece), with runs of spaces and newlines
    rng = random.Random(3)
    big = "".join(rng.choice(WORDS) + rng.choice([" ", "  ", "\n", "\n\n", " \n ", ", "]) for _ in range(60_000))
    big += f" and the text {EOD_TOKEN} written out is ordinary text"
    f = tmp_path / "big.txt"
    f.write_text(big, encoding="utf-8")
    run_cli("tokenize", f, "--out", tmp_path / "b", "--tokenizer", tok_file, "--val-ratio", "0", check=True)
    tok = load_tokenizer(tok_file)
    ids = read_shards(tmp_path / "b" / "train", "u16")
    tok.hf.encode_special_tokens = True
    assert ids.tolist() == tok.hf.encode(big, add_special_tokens=False).ids + [tok.eod_id]
    assert tok.decode(ids[:-1]) == big
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["tokenizer"]["kind"] == "tokenizer"


def test_bytes_identity_across_read_chunks(tmp_path):
    # > one 4 MiB read chunk, multi-byte characters straddling its boundary
    unit = "aé東😀 \n"
    text = unit * ((4 << 20) // len(unit.encode()) + 1000)
    f = tmp_path / "one.txt"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "bytes"
    p = run_cli("tokenize", f, "--out", out, "--bytes", "--val-ratio", "0", "--shard-tokens", "1000000", check=True)
    assert "val_ratio = 0.0" in p.stdout and not (out / "val").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and meta["tokenizer"]["eod_id"] == 256
    # 1,000,000-token shards; the short last one is folded into the one before
    names = sorted(x.name for x in (out / "train").glob("*.bin"))
    assert names == meta["shards"]["train"] and len(names) == 4
    sizes = [(out / "train" / n).stat().st_size // 2 for n in names]
    assert sizes[:3] == [1_000_000] * 3 and sizes[3] == len(text.encode()) + 1 - 3_000_000 > 1_000_000
    ids = read_shards(out / "train", "u16")
    assert ids.tolist()[:-1] == list(text.encode("utf-8")) and ids[-1] == 256
    # the tokenizer.json is an ordinary Hugging Face tokenizer: byte b <-> id b
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    s = "héllo 東京\n"
    assert hf.encode(s).ids == list(s.encode("utf-8"))
    assert hf.decode(list(s.encode("utf-8")) + [256], skip_special_tokens=False) == s + EOD_TOKEN
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.is_bytes and tok.encode(s) == list(s.encode()) and tok.decode(tok.encode(s)) == s


def test_u32_when_the_vocabulary_exceeds_u16(tmp_path, corpus):
    d, docs = corpus
    big = byte_tokenizer([EOD_TOKEN] + [f"<extra{i}>" for i in range(65_300)])
    assert big.vocab_size > 65_536
    big.save(tmp_path / "big.json")
    out = tmp_path / "t32"
    p = run_cli("tokenize", d, "--out", out, "--tokenizer", tmp_path / "big.json", "--doc-separator", r"\n\n",
                check=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "u32" and 'format = "u32"' in p.stdout
    ids = read_shards(out / "train", "u32")
    assert ids.max() == 256 and len(ids) * 4 == sum(x.stat().st_size for x in (out / "train").glob("*.bin"))


def test_invalid_utf8_names_file_and_offset_and_writes_nothing(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n" * 10)
    bad = tmp_path / "bad.txt"
    off = (4 << 20) + 17      # in the second read chunk
    bad.write_bytes((b"some words " * (off // 11 + 1))[:off] + b"\xff" + b"tail")
    for mode in (["--bytes"], ["--vocab-size", "300"]):
        p = run_cli("tokenize", good, bad, "--out", tmp_path / "out", *mode)
        assert p.returncode == 3, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
        assert errors == [f"rtrainer: error: {bad}: invalid UTF-8 at byte offset {off} (invalid start byte)"]
        assert p.stderr.strip().splitlines()[-1] == errors[0]
        assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.txt", "good.txt"]


def test_a_failed_write_is_an_io_error_and_leaves_nothing(tmp_path, corpus):
    """A file size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) stops
    the shard writer: exit 5, one error line, no temporary or half-written output, and the parent
    directories --out made for itself are gone again."""
    import resource
    import subprocess
    import sys

    from conftest import REPO

    d, _ = corpus
    out = tmp_path / "new" / "deeper" / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    p = subprocess.run([sys.executable, "-m", "rtrainer", "tokenize", str(d), "--out", str(out), "--bytes"],
                       capture_output=True, text=True, cwd=REPO, preexec_fn=limit, timeout=300)
    assert p.returncode == 5, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith("rtrainer: error: cannot write ") and "File too large" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["corpus"]


def test_non_empty_out_refused_unless_overwrite(tmp_path, corpus):
    d, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    p = run_cli("tokenize", d, "--out", out, "--bytes")
    assert p.returncode == 2 and "--out" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert [x.name for x in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    # a failing --overwrite run leaves the old directory as it was
    (tmp_path / "bad.txt").write_bytes(b"ok\xc3")
    p = run_cli("tokenize", tmp_path / "bad.txt", "--out", out, "--bytes", "--overwrite")
    assert p.returncode == 3 and "byte offset 2" in p.stderr, p.stderr
    assert [x.name for x in out.iterdir()] == ["keep.txt"]
    run_cli("tokenize", d, "--out", out, "--bytes", "--overwrite", check=True)
    assert sorted(x.name for x in out.iterdir()) == ["meta.json", "tokenizer.json", "train", "val"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli("tokenize", d, "--out", empty, "--bytes", check=True)   # an empty directory is fine
    assert (empty / "meta.json").exists()


def test_globs_directories_and_bad_arguments(tmp_path, corpus):
    d, _ = corpus
    out = tmp_path / "g"
    run_cli("tokenize", str(d / "**" / "f1*.txt"), "--out", out, "--bytes", "--val-ratio", "0.5", check=True)
    meta = json.loads((out / "meta.json").read_text())
    assert [Path(i["path"]).name for i in meta["inputs"]] == ["f12.txt", "f16.txt"]
    assert meta["documents"] == {"train": 1, "val": 1}
    cases = [
        ((tmp_path / "missing.txt", "--bytes"), 3, "input not found"),
        ((str(tmp_path / "nothing*.txt"), "--bytes"), 3, "matches no files"),
        ((d, "--vocab-size", "100"), 2, "smaller than the 256 byte symbols"),
        ((d, "--bytes", "--vocab-size", "300"), 2, "not allowed with argument"),
        ((d, "--bytes", "--val-ratio", "1.5"), 2, "--val-ratio"),
        ((d, "--bytes", "--min-frequency", "0"), 2, "--min-frequency"),
        ((d / "f00.txt", "--bytes"), 3, "one document"),
        ((d, "--tokenizer", tmp_path / "nope.json"), 3, "tokenizer file not found"),
        ((d, "--tokenizer", d / "f00.txt"), 3, "not a tokenizer.json"),
    ]
    for args, code, msg in cases:
        p = run_cli("tokenize", *args, "--out", tmp_path / "x")
        assert p.returncode == code and msg in p.stderr, (args, p.returncode, p.stderr)
        assert p.stderr.strip().splitlines()[-1].startswith("rtrainer: error:"), p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()
    # a tokenizer without the end-of-document token
    byte_tokenizer([]).save(tmp_path / "noeod.json")
    p = run_cli("tokenize", d, "--out", tmp_path / "x", "--tokenizer", tmp_path / "noeod.json")
    assert p.returncode == 2 and "--no-eod" in p.stderr, p.stderr
    run_cli("tokenize", d, "--out", tmp_path / "x", "--tokenizer", tmp_path / "noeod.json", "--no-eod", check=True)
    assert json.loads((tmp_path / "x" / "meta.json").read_text())["vocab_size"] == 256


def snapshot(d):
    """{relative path: bytes} of every file under d but the lock file."""
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(Path(d).rglob("*")) if f.is_file()
            and f.name != ".lock"}


def _run_file(tmp_path, printed):
    """A run file made of the lines `rtrainer tokenize` printed, plus a tiny model and schedule."""
    cfg = tmp_path / "run.toml"
    model = "[model]\nd_model = 16\nd_state = 4\nbase_layers = 1\ntarget_layers = 1\n"
    cfg.write_text(f"""
[run]
out_dir = "{tmp_path / 'run'}"
seed = 3
threads = 1
[head]
kind = "softmax"
[train]
steps = 6
batch_size = 2
seq_len = 16
[eval]
val_every = 3
eval_batches = 1
[checkpoint]
save_every = 3
[log]
log_every = 3
""" + printed.replace("[model]\n", model))
    return cfg


def test_the_run_knows_its_tokenizer(tmp_path, corpus):
    d, _ = corpus
    out = tmp_path / "tok"
    p = run_cli("tokenize", d, "--out", out, "--vocab-size", "300", "--doc-separator", r"\n\n", check=True)
    cfg = _run_file(tmp_path, p.stdout)
    tok = load_tokenizer(out / "tokenizer.json")
    dry = run_cli("run", cfg, "--dry-run", check=True)
    assert f"V {tok.vocab_size} (from data.tokenizer)" in dry.stdout, dry.stdout
    r = run_cli("run", cfg, check=True)
    assert f"V={tok.vocab_size}," in r.stderr
    from rtrainer.checkpoint import load_checkpoint
    from rtrainer.tokenizer import tokenizer_for_state

    _, state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000006")
    assert state["tokenizer"] == {"path": str(out / "tokenizer.json"), "sha256": tok.sha256,
                                  "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    assert state["config"]["model"]["vocab_size"] == tok.vocab_size
    assert f'tokenizer = "{out / "tokenizer.json"}"' in (tmp_path / "run" / "config.toml").read_text()
    assert tokenizer_for_state(state).decode(tok.encode("the end")) == "the end"
    from rtrainer.runstate import RunState

    assert tokenizer_for_state(RunState.from_json(state)).sha256 == tok.sha256   # a RunState works too
    # a model.vocab_size that disagrees with the tokenizer
    p = run_cli("run", cfg, "--overwrite", "--set", f"model.vocab_size={tok.vocab_size + 1}")
    assert p.returncode == 2 and "does not match the tokenizer" in p.stderr, p.stderr
    # resuming with another tokenizer (same V, other merges) is refused
    before = snapshot(tmp_path / "run")
    other = tmp_path / "other.json"
    txt = json.loads((out / "tokenizer.json").read_text())
    txt["model"]["merges"] = txt["model"]["merges"][::-1]
    other.write_text(json.dumps(txt))
    p = run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=9", "--set", f'data.tokenizer="{other}"')
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("rtrainer: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "cannot resume" in errors[0], p.stderr
    other_sha = file_sha256(other)
    assert f"{out / 'tokenizer.json'} (sha256 {tok.sha256[:12]}" in errors[0], errors
    assert f"{other} has sha256 {other_sha[:12]}" in errors[0], errors
    # ... and so is resuming without one
    p = run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=9", "--set", 'data.tokenizer=""')
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("rtrainer: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "no data.tokenizer" in errors[0], p.stderr
    assert snapshot(tmp_path / "run") == before     # refused before anything was written
    # the same file under another path resumes (the checksum is what counts)
    copy = tmp_path / "copy.json"
    copy.write_bytes((out / "tokenizer.json").read_bytes())
    run_cli("run", cfg, "--resume", "auto", "--set", "train.steps=9", "--set", f'data.tokenizer="{copy}"',
            check=True)
    _, state9 = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000009")
    assert state9["tokenizer"]["path"] == str(copy) and state9["tokenizer"]["sha256"] == tok.sha256
    # a tokenizer smaller than the ids of the data
    byte_tokenizer([]).save(tmp_path / "small.json")
    p = run_cli("run", cfg, "--overwrite", "--set", f'data.tokenizer="{tmp_path / "small.json"}"')
    assert p.returncode == 3 and "outside [0, 256)" in p.stderr, p.stderr
    # the changed tokenizer file is noticed by whoever reads the checkpoint
    (out / "tokenizer.json").write_text(json.dumps(txt))
    from rtrainer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="changed"):
        tokenizer_for_state(state)


def test_data_tokenizer_key_checks(tmp_path):
    from rtrainer.config import load_config
    from rtrainer.errors import ConfigError

    f = tmp_path / "t.toml"
    f.write_text('[data]\ntask = "induction_heads"\ntokenizer = "x.json"\n')
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_config(str(f))
    f.write_text('[data]\ntrain = "x"\ntokenizer = "x.json"\n')
    assert load_config(str(f)).data.tokenizer == "x.json"
