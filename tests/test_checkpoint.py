"""rtrainer.checkpoint and rtrainer.metrics: round trips, corruption detection, atomic writes."""

import errno
import json
import math
import os
import struct

import numpy as np
import pytest

from rtrainer import checkpoint as C
from rtrainer.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json_atomic
from rtrainer.errors import CheckpointError, RunIOError
from rtrainer.metrics import MetricsWriter, read_metrics


def sample():
    rng = np.random.default_rng(1)
    tensors = {
        "layers.0.conv_w": rng.standard_normal((6, 4)).astype(np.float32),
        "w": rng.standard_normal((3, 5, 2)).astype(np.float32),
        "m": np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32),
        "step_ids": np.arange(7, dtype=np.int64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    gen = np.random.Generator(np.random.PCG64(123))
    state = {
        "step": 17,
        "best_val_loss": math.inf,
        "rng": gen.bit_generator.state,  # 128-bit integers
        "data": {"pos": 5, "epoch": 1},
        "config": {"model": {"d_model": 4}, "optim": {"betas": [0.9, 0.999]}},
        "np_scalar": np.float32(0.5),
    }
    return tensors, state


def header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def flip(path, offset):
    raw = bytearray(open(path, "rb").read())
    raw[offset] ^= 0x01
    open(path, "wb").write(bytes(raw))


def entries(d):
    return sorted(os.listdir(d))


# ---------------------------------------------------------------------------------- round trip


def test_round_trip_bitwise(tmp_path):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(str(p), tensors, state)
    got, st = load_checkpoint(str(p))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert got[k].tobytes() == v.tobytes(), k  # bitwise, incl. nan / -0.0 / denormal
    assert st["step"] == 17 and st["best_val_loss"] == math.inf
    assert st["rng"] == state["rng"]  # exact big integers
    restored = np.random.Generator(np.random.PCG64())
    restored.bit_generator.state = st["rng"]
    assert restored.random() == np.random.Generator(np.random.PCG64(123)).random()
    assert st["config"] == state["config"] and st["np_scalar"] == 0.5
    assert "sha256" not in st
    assert entries(tmp_path) == ["ck.safetensors"]  # no temp file left behind


def test_header_format(tmp_path):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, state)
    _, _, h = header(p)
    meta = h["__metadata__"]
    assert meta["format"] == "rtrainer-checkpoint" and meta["schema"] == "1"
    st = json.loads(meta["state"])
    assert set(st["sha256"]) == set(tensors)
    import hashlib
    assert st["sha256"]["w"] == hashlib.sha256(tensors["w"].tobytes()).hexdigest()


def test_overwrite_replaces(tmp_path):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, state)
    save_checkpoint(p, {"w": np.ones(2, np.float32)}, {"step": 2})
    got, st = load_checkpoint(p)
    assert list(got) == ["w"] and st == {"step": 2}
    assert entries(tmp_path) == ["ck.safetensors"]


def test_reserved_key(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        save_checkpoint(tmp_path / "x", {}, {"sha256": 1})


# ---------------------------------------------------------------------------------- corruption


def test_bit_flip_in_payload(tmp_path):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, state)
    _, n, h = header(p)
    start, end = h["w"]["data_offsets"]
    flip(p, 8 + n + start + (end - start) // 2)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(ei.value) == f"{p}: tensor 'w' is corrupt (checksum mismatch)"


def test_bit_flip_in_header_state(tmp_path):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, {"step": 100})
    raw, n, _ = header(p)
    i = raw.index(b'\\"step\\": 100') + len(b'\\"step\\": 10')  # the last digit of the step
    flip(p, i)  # "100" -> "101": still valid JSON and a valid safetensors file
    with pytest.raises(CheckpointError, match="not a valid rtrainer checkpoint .*checksum"):
        load_checkpoint(p)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated(tmp_path, keep):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, state)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: keep if keep >= 0 else len(raw) - 1])
    with pytest.raises(CheckpointError, match=f"{p}: not a valid rtrainer checkpoint \\("):
        load_checkpoint(p)


def test_garbage_file(tmp_path):
    p = tmp_path / "ck.safetensors"
    p.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a valid rtrainer checkpoint"):
        load_checkpoint(p)
    p.write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid rtrainer checkpoint"):
        load_checkpoint(p)


def test_missing(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(ei.value) == f"checkpoint not found: {p}"
    assert CheckpointError.exit_code == 3


def test_foreign_safetensors_and_schema(tmp_path):
    from safetensors.numpy import save_file

    p = str(tmp_path / "foreign.safetensors")
    save_file({"w": np.ones(3, np.float32)}, p)
    with pytest.raises(CheckpointError, match="not a valid rtrainer checkpoint .*format"):
        load_checkpoint(p)
    meta = {"format": "rtrainer-checkpoint", "schema": "99"}
    save_file({"w": np.ones(3, np.float32)}, p, metadata=meta)
    with pytest.raises(CheckpointError, match="schema '99' is not supported"):
        load_checkpoint(p)


# ---------------------------------------------------------------------------------- atomic writes


def test_enospc_leaves_no_temp_and_keeps_old(tmp_path, monkeypatch):
    tensors, state = sample()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, tensors, {"step": 1})
    real_fsync = os.fsync

    def full(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", full)
    with pytest.raises(RunIOError) as ei:
        save_checkpoint(p, tensors, {"step": 2})
    assert str(p) in str(ei.value) and "No space left on device" in str(ei.value)
    assert RunIOError.exit_code == 5
    monkeypatch.undo()
    assert entries(tmp_path) == ["ck.safetensors"]  # no .tmp-* left
    assert load_checkpoint(p)[1] == {"step": 1}  # the previous checkpoint is intact


def test_failed_rename_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, {"w": np.zeros(4, np.float32)}, {"step": 1})

    def boom(a, b):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(RunIOError, match="Permission denied"):
        save_checkpoint(p, {"w": np.ones(4, np.float32)}, {"step": 2})
    monkeypatch.undo()
    assert entries(tmp_path) == ["ck.safetensors"]
    assert load_checkpoint(p)[1] == {"step": 1}


def test_write_is_fsynced_before_rename(tmp_path, monkeypatch):
    """The temp file is fsync'd, then renamed, then the directory is fsync'd, in that order."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def replace(a, b):
        assert os.path.basename(a).startswith(".tmp-ck.safetensors-")
        calls.append("replace")
        return real_replace(a, b)

    monkeypatch.setattr(C.os, "fsync", fsync)
    monkeypatch.setattr(C.os, "replace", replace)
    save_checkpoint(tmp_path / "ck.safetensors", {"w": np.zeros(2, np.float32)}, {})
    assert calls == ["fsync-file", "replace", "fsync-dir"]


def test_unwritable_dir(tmp_path):
    with pytest.raises(RunIOError, match="cannot write"):
        save_checkpoint(tmp_path / "no" / "such" / "ck.safetensors", {}, {})


# ---------------------------------------------------------------------------------- JSON


def test_json_round_trip(tmp_path):
    p = tmp_path / "run_state.json"
    obj = {"step": 3, "best": None, "x": np.float64(0.25), "arr": np.arange(3), "s": "é"}
    write_json_atomic(p, obj)
    text = p.read_text()
    assert text.startswith("{\n  ")  # indented
    assert read_json(p) == {"step": 3, "best": None, "x": 0.25, "arr": [0, 1, 2], "s": "é"}
    assert entries(tmp_path) == ["run_state.json"]


def test_json_big_int_and_nan(tmp_path):
    p = tmp_path / "s.json"
    big = 2**100 + 7
    write_json_atomic(p, {"rng": {"state": big}, "v": float("nan"), "w": [float("inf")]})
    got = read_json(p)
    assert got == {"rng": {"state": big}, "v": None, "w": [None]}
    json.loads(p.read_text())  # strict JSON
    write_json_atomic(p, {"v": float("nan")})
    assert read_json(p) == {"v": None}


def test_read_json_errors(tmp_path):
    p = tmp_path / "s.json"
    with pytest.raises(CheckpointError, match=f"file not found: {p}"):
        read_json(p)
    p.write_text('{"a": 1')
    with pytest.raises(CheckpointError, match=f"{p}: invalid JSON"):
        read_json(p)
    from rtrainer.errors import DataError
    with pytest.raises(DataError):
        read_json(p, error=DataError)


# ---------------------------------------------------------------------------------- metrics


def test_metrics_fresh_truncates(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"old": 1}\n')
    w = MetricsWriter(p)
    w.write({"step": 1, "loss": 0.5})
    w.close()
    assert read_metrics(p) == [{"step": 1, "loss": 0.5}]


def test_metrics_nan_is_null_and_numpy(tmp_path):
    p = tmp_path / "metrics.jsonl"
    with MetricsWriter(p) as w:
        w.write({"loss": float("nan"), "g": float("inf"), "h": np.float32("nan"),
                 "n": np.int64(3), "f": np.float32(0.5)})
    line = p.read_bytes()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"loss": None, "g": None, "h": None, "n": 3, "f": 0.5}


def test_metrics_flushed_each_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.write({"step": 1})
    assert p.read_bytes() == b'{"step":1}\n'  # visible before close
    w.close()


def test_metrics_resume_truncates_to_offset(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.write({"step": 1})
    w.write({"step": 2})
    off = w.offset()
    assert off == p.stat().st_size
    w.write({"step": 3})
    w._fh.write(b'{"step": 4, "lo')  # a crash mid-line
    w.close()
    w = MetricsWriter(p, truncate_to=off)
    assert w.offset() == off
    w.write({"step": 3, "resumed": True})
    w.close()
    assert read_metrics(p) == [{"step": 1}, {"step": 2}, {"step": 3, "resumed": True}]


def test_metrics_resume_shorter_than_offset(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step":1}\n')
    with pytest.raises(CheckpointError, match=f"{p}: metrics file is 11 bytes, shorter than"):
        MetricsWriter(p, truncate_to=100)
    assert p.read_bytes() == b'{"step":1}\n'  # untouched
    q = tmp_path / "missing.jsonl"
    with pytest.raises(CheckpointError, match="missing"):
        MetricsWriter(q, truncate_to=5)
    MetricsWriter(q, truncate_to=0).close()
    assert q.read_bytes() == b""


def test_read_metrics_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"a":1}\n{"b":\n')
    with pytest.raises(ValueError, match=":2: not a JSON line"):
        read_metrics(p)


def test_non_contiguous_and_big_endian(tmp_path):
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran-ordered view
    be = np.arange(5, dtype=">f4")
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, {"t": t, "be": be}, {})
    got, _ = load_checkpoint(p)
    np.testing.assert_array_equal(got["t"], t)
    assert got["t"].shape == (4, 3)
    np.testing.assert_array_equal(got["be"], be)
    assert got["be"].dtype == np.dtype("<f4")
    with pytest.raises(TypeError, match="numpy array"):
        save_checkpoint(p, {"x": [1, 2]}, {})


def test_write_text_atomic(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text("old")
    C.write_text_atomic(p, "[run]\nseed = 1\n")
    assert p.read_text() == "[run]\nseed = 1\n"
    assert entries(tmp_path) == ["config.toml"]
