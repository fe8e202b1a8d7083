"""rtrainer.data: every token format, the named errors, PackedStream and FixedWindows."""

import json

import numpy as np
import pytest

from rtrainer import data as D
from rtrainer.data import (
    FixedWindows,
    PackedStream,
    check_token_range,
    load_tokens,
    max_token,
    split_tokens,
)
from rtrainer.errors import DataError


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
    assert isinstance(a, np.memmap)
    assert a.tolist() == list(b"hello\xff\x00")


@pytest.mark.parametrize("fmt, dtype", [("u16", "<u2"), ("u32", "<u4")])
def test_u16_u32_memmap(tmp_path, fmt, dtype):
    ref = np.array([0, 1, 255, 256, 65535, 7], dtype=dtype)
    if fmt == "u32":
        ref[3] = 70000
    p = tmp_path / "t.dat"
    p.write_bytes(ref.tobytes())
    a = load_tokens(str(p), fmt)
    assert isinstance(a, np.memmap)  # memory-mapped, not read whole
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
    assert isinstance(a, np.memmap) and a.tolist() == [3, 1, 4, 1, 5]


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
    with pytest.raises(DataError, match="not a valid .npy"):  # never unpickles
        load_tokens(str(p))


def test_auto_format(tmp_path):
    assert D.resolve_format("a/b.TXT") == "txt"
    assert D.resolve_format("b.npy") == "npy"
    assert D.resolve_format("b.bin") == "u16"
    assert D.resolve_format("b.bin", "u32") == "u32"
    with pytest.raises(DataError, match=r"cannot infer the format of x\.dat; set data.format"):
        load_tokens("x.dat")
    with pytest.raises(DataError, match="unknown data format"):
        load_tokens("x.txt", "csv")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"token file not found: {p}"):
        load_tokens(str(p))
    with pytest.raises(DataError, match="is a directory"):
        load_tokens(str(tmp_path), "u16")


# ---------------------------------------------------------------------------------- range scans


def test_check_token_range(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 4)  # force several chunks
    a = np.array([0, 1, 2, 3, 4, 5, 9, 2, 10, 1], dtype=np.int64)
    check_token_range(a, 11, "f")
    with pytest.raises(DataError) as ei:
        check_token_range(a, 9, "f.txt")
    assert str(ei.value) == "f.txt: token id 9 at offset 6 is outside [0, 9)"
    b = a.copy()
    b[5] = -1
    with pytest.raises(DataError, match=r"token id -1 at offset 5 is outside \[0, 11\)"):
        check_token_range(b, 11, "f.txt")


def test_check_token_range_memmap(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 3)
    p = tmp_path / "t.bin"
    np.array([1, 2, 3, 4, 5, 300, 6], dtype="<u2").tofile(p)
    a = load_tokens(str(p))
    assert max_token(a) == 300
    with pytest.raises(DataError, match=rf"{p}: token id 300 at offset 5 is outside \[0, 256\)"):
        check_token_range(a, 256, str(p))


def test_max_token_chunked(monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 2)
    assert max_token(np.array([5, 1, 2, 9, 3])) == 9
    assert max_token(np.array([-3, -1])) == -1


def test_split_tokens():
    a = np.arange(100)
    tr, va = split_tokens(a, 0.1)
    assert len(tr) == 90 and len(va) == 10 and va[0] == 90
    assert np.shares_memory(tr, a) and np.shares_memory(va, a)  # views, no copy
    tr, va = split_tokens(a, 0.0)
    assert len(tr) == 100 and len(va) == 0


# ---------------------------------------------------------------------------------- PackedStream


def test_packed_windows():
    tokens = np.arange(1000, dtype=np.int64)
    s = PackedStream(tokens, 3, 5, "t")
    ids, tg = s.next_batch()
    assert ids.shape == tg.shape == (3, 5)
    assert ids.dtype == tg.dtype == np.int64
    assert ids.flags.c_contiguous and tg.flags.c_contiguous
    assert not np.shares_memory(ids, tg)
    np.testing.assert_array_equal(ids.ravel(), np.arange(15))
    np.testing.assert_array_equal(tg, ids + 1)
    for b in range(2):
        assert tg[b, -1] == ids[b + 1, 0]  # row b's last target = row b+1's first input
    ids2, _ = s.next_batch()
    assert ids2[0, 0] == 15  # consecutive batches are contiguous


def test_packed_from_memmap(tmp_path):
    p = tmp_path / "t.bin"
    np.arange(50, dtype="<u2").tofile(p)
    s = PackedStream(load_tokens(str(p)), 2, 4, str(p))
    ids, tg = s.next_batch()
    assert type(ids) is np.ndarray and ids.dtype == np.int64
    np.testing.assert_array_equal(tg.ravel(), np.arange(1, 9))


def test_packed_wrap_and_epoch():
    tokens = np.arange(23)  # B*T = 6: batches start at 0, 6, 12; 18+7 > 23 -> wrap, tail skipped
    s = PackedStream(tokens, 2, 3, "t")
    assert s.batches_per_epoch() == 3
    firsts = []
    epochs = []
    for _ in range(7):
        ids, tg = s.next_batch()
        firsts.append(int(ids[0, 0]))
        epochs.append(s.epoch)
    assert firsts == [0, 6, 12, 0, 6, 12, 0]
    assert epochs == [0, 0, 1, 1, 1, 2, 2]
    assert s.state()["batches"] == 7


def test_packed_exact_fit():
    s = PackedStream(np.arange(7), 2, 3, "t")  # exactly one batch
    a, _ = s.next_batch()
    b, _ = s.next_batch()
    np.testing.assert_array_equal(a, b)
    assert s.epoch == 2


def test_packed_too_short():
    with pytest.raises(DataError, match=r"train\.bin: 6 tokens are too few .*\(needs at least 7\)"):
        PackedStream(np.arange(6), 2, 3, "train.bin")


def test_packed_state_resume_exact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, size=500)
    s = PackedStream(tokens, 4, 7, "t")
    for _ in range(13):
        s.next_batch()
    st = json.loads(json.dumps(s.state()))  # JSON-able
    expected = [s.next_batch() for _ in range(40)]  # spans a wrap
    r = PackedStream(tokens, 4, 7, "t")
    r.set_state(st)
    for ids, tg in expected:
        ids2, tg2 = r.next_batch()
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(tg, tg2)
    assert r.state() == s.state()


def test_packed_set_state_validation():
    s = PackedStream(np.arange(100), 2, 5, "t")
    good = s.state()
    with pytest.raises(DataError, match="saved for 99 tokens but the data has 100"):
        s.set_state({**good, "n_tokens": 99})
    with pytest.raises(DataError, match="position 95 is out of range"):
        s.set_state({**good, "pos": 95})
    with pytest.raises(DataError, match="'pos' must be a non-negative integer"):
        s.set_state({**good, "pos": -1})
    with pytest.raises(DataError, match="'epoch' must be a non-negative integer"):
        s.set_state({k: v for k, v in good.items() if k != "epoch"})
    s.set_state({**good, "pos": 89})  # last valid start: 89 + 11 = 100
    assert s.next_batch()[0][0, 0] == 89


# ---------------------------------------------------------------------------------- FixedWindows


def test_fixed_windows_identical_across_calls():
    tokens = np.arange(1000)
    fw = FixedWindows(tokens, 3, 8, 4, "v")
    first = list(fw.batches())
    assert len(first) == len(fw) == 4
    again = list(fw.batches())
    for (a, b), (c, d) in zip(first, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        assert a.shape == (3, 8) and a.dtype == np.int64 and a.flags.c_contiguous
        assert b.flags.c_contiguous
        np.testing.assert_array_equal(b, a + 1)
    starts = np.concatenate([ids[:, 0] for ids, _ in first])
    np.testing.assert_array_equal(starts, np.linspace(0, 1000 - 8 - 1, 12).astype(int))
    assert starts[0] == 0 and starts[-1] == 991  # spread over the whole array


def test_fixed_windows_modifying_a_batch_does_not_leak():
    fw = FixedWindows(np.arange(100), 2, 4, 2, "v")
    ids, _ = next(fw.batches())
    ids[:] = -1
    ids2, _ = next(fw.batches())
    assert ids2.min() >= 0


def test_fixed_windows_short():
    fw = FixedWindows(np.arange(5), 2, 4, 1, "v")  # exactly T+1 tokens: every window is the same
    ids, tg = next(fw.batches())
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(DataError, match=r"val\.txt: 4 tokens are too few .*\(needs at least 5\)"):
        FixedWindows(np.arange(4), 2, 4, 1, "val.txt")
