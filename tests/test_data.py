"""Token files (rtrainer.tokenfiles) read as single-file sources (rtrainer.shards.open_source):
every format, the named errors, and the chunked range / max scans over shards. The streams over
them are tests/test_stream.py."""

import numpy as np
import pytest

from rtrainer import shards as SH
from rtrainer import tokenfiles as TF
from rtrainer.errors import DataError
from rtrainer.shards import Shard, check_shards_range, shards_max_token, split_shards


def load_tokens(path, fmt="auto"):
    """The tokens of a one-file source, read through its shard (chunk by chunk)."""
    (sh,) = SH.open_source(str(path), fmt)
    if sh.array is not None:
        return sh.array
    assert sh.path == str(path)  # a binary file is read in place, never loaded whole at open
    return np.concatenate([c for _, c in sh.chunks()])


# ---------------------------------------------------------------------------------- formats


def test_txt(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("1 2\n3\t4  \n\n 5\r\n-6\n")
    a = load_tokens(str(p))
    assert a.dtype == np.int64 and a.ndim == 1
    assert a.tolist() == [1, 2, 3, 4, 5, -6]


def test_txt_bad_token(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("1 2 3\n4 x5 6\n")
    with pytest.raises(DataError) as ei:
        load_tokens(str(p))
    assert str(ei.value) == f"{p}: token #4 ('x5') is not an integer"
    p.write_text("1 2.5")
    with pytest.raises(DataError, match=r"token #1 \('2.5'\) is not an integer"):
        load_tokens(str(p))
    p.write_text("1 99999999999999999999999")
    with pytest.raises(DataError, match=r"token #1 .* does not fit in int64"):
        load_tokens(str(p))


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_txt_empty(tmp_path, content):
    p = tmp_path / "t.txt"
    p.write_text(content)
    with pytest.raises(DataError, match="empty token file"):
        load_tokens(str(p))


def test_u8(tmp_path):
    p = tmp_path / "t.raw"
    p.write_bytes(b"hello\xff\x00")
    a = load_tokens(str(p), "u8")
    assert a.dtype == np.uint8
    assert a.tolist() == list(b"hello\xff\x00")


@pytest.mark.parametrize("fmt, dtype", [("u16", "<u2"), ("u32", "<u4")])
def test_u16_u32_memmap(tmp_path, fmt, dtype):
    ref = np.array([0, 1, 255, 256, 65535, 7], dtype=dtype)
    if fmt == "u32":
        ref[3] = 70000
    p = tmp_path / "t.dat"
    p.write_bytes(ref.tobytes())
    a = load_tokens(str(p), fmt)  # memory-mapped, not read whole (asserted in load_tokens)
    assert a.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a, ref)


def test_bin_auto_is_u16_little_endian(tmp_path):
    p = tmp_path / "t.bin"
    p.write_bytes(bytes([1, 0, 0, 1]))
    assert load_tokens(str(p)).tolist() == [1, 256]


@pytest.mark.parametrize("fmt, nbytes", [("u16", 7), ("u32", 6)])
def test_odd_byte_count(tmp_path, fmt, nbytes):
    p = tmp_path / "t.dat"
    p.write_bytes(b"\x01" * nbytes)
    with pytest.raises(DataError) as ei:
        load_tokens(str(p), fmt)
    assert str(p) in str(ei.value) and f"{nbytes} bytes" in str(ei.value)


@pytest.mark.parametrize("fmt", ["u8", "u16", "u32"])
def test_raw_empty(tmp_path, fmt):
    p = tmp_path / "t.dat"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty token file"):
        load_tokens(str(p), fmt)


def test_npy(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.array([3, 1, 4, 1, 5], dtype=np.int32))
    a = load_tokens(str(p))
    assert a.tolist() == [3, 1, 4, 1, 5]
    (sh,) = SH.open_source(str(p))
    assert sh.header > 0 and sh.dtype == np.int32  # the data after the header, read in place


@pytest.mark.parametrize(
    "arr, expect",
    [
        (np.zeros((2, 3), dtype=np.int64), "1-D"),
        (np.zeros(3, dtype=np.float32), "integers"),
        (np.zeros(0, dtype=np.int64), "empty"),
    ],
)
def test_npy_bad(tmp_path, arr, expect):
    p = tmp_path / "t.npy"
    np.save(p, arr)
    with pytest.raises(DataError, match=expect) as ei:
        load_tokens(str(p))
    assert str(p) in str(ei.value)


def test_npy_garbage_and_pickle(tmp_path):
    p = tmp_path / "t.npy"
    p.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="not a valid .npy"):
        load_tokens(str(p))
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="must be integers, got dtype object"):  # never unpickles
        load_tokens(str(p))
    np.save(p, np.arange(10, dtype=np.int64))
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"t\.npy: holds 72 data bytes but its header says 10 tokens"):
        load_tokens(str(p))


def test_auto_format(tmp_path):
    assert TF.resolve_format("a/b.TXT") == "txt"
    assert TF.resolve_format("b.npy") == "npy"
    assert TF.resolve_format("b.bin") == "u16"
    assert TF.resolve_format("b.bin", "u32") == "u32"
    with pytest.raises(DataError, match=r"cannot infer the format of x\.dat; set data.format"):
        load_tokens("x.dat")
    with pytest.raises(DataError, match="unknown data format"):
        load_tokens("x.txt", "csv")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"token file not found: {p}"):
        load_tokens(str(p))
    with pytest.raises(DataError, match="is a directory"):
        TF.check_readable(str(tmp_path))


# ---------------------------------------------------------------------------------- range scans


def test_check_token_range(monkeypatch):
    monkeypatch.setattr(SH, "_BLOCK", 4 * 8)  # in-memory shards scan _BLOCK // 8 tokens per chunk: 4
    a = np.array([0, 1, 2, 3, 4, 5, 9, 2, 10, 1], dtype=np.int64)
    check_shards_range([Shard.from_array(a, "f")], 11)
    with pytest.raises(DataError) as ei:
        check_shards_range([Shard.from_array(a, "f.txt")], 9)
    assert str(ei.value) == "f.txt: token id 9 at offset 6 is outside [0, 9)"
    b = a.copy()
    b[5] = -1
    with pytest.raises(DataError, match=r"token id -1 at offset 5 is outside \[0, 11\)"):
        check_shards_range([Shard.from_array(b, "f.txt")], 11)
    # the offset is the token's index in its file, also for a sub-range of it
    with pytest.raises(DataError, match=r"f\.txt: token id 10 at offset 8 "):
        check_shards_range([Shard.from_array(a, "f.txt").sub(7, 10)], 10)


def test_check_token_range_memmap(tmp_path, monkeypatch):
    monkeypatch.setattr(SH, "_BLOCK", 3 * 2)  # 3 u16 tokens per chunk
    p = tmp_path / "t.bin"
    np.array([1, 2, 3, 4, 5, 300, 6], dtype="<u2").tofile(p)
    sh = SH.open_source(str(p))
    assert shards_max_token(sh) == 300
    with pytest.raises(DataError, match=rf"{p}: token id 300 at offset 5 is outside \[0, 256\)"):
        check_shards_range(sh, 256)


def test_max_token_chunked(monkeypatch):
    monkeypatch.setattr(SH, "_BLOCK", 2 * 8)
    assert shards_max_token([Shard.from_array(np.array([5, 1, 2, 9, 3]))]) == 9
    assert shards_max_token([Shard.from_array(np.array([-3, -1]))]) == -1
    assert shards_max_token([Shard.from_array(np.array([5, 1])), Shard.from_array(np.array([7]))]) == 7


def test_split_tokens():
    a = np.arange(100)
    (tr,), (va,) = split_shards([Shard.from_array(a)], 0.1)
    assert len(tr) == 90 and len(va) == 10 and (va.lo, va.hi) == (90, 100)
    assert tr.array is a and va.array is a  # ranges of the same tokens, no copy
    (tr,), va = split_shards([Shard.from_array(a)], 0.0)
    assert len(tr) == 100 and va == []
