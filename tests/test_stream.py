"""rtrainer.stream: shard directories, the manifest and its named errors, coverage of every token,
shard order, prefetch = no prefetch, exact resume, validation windows, flat memory, and an end-to-end
run on a shard directory killed with SIGKILL and resumed."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, checkpoint_tensors, latest_checkpoint, read_metrics, records_close, run_cli, strip_timing, tiny_config
from rtrainer import shards as SH
from rtrainer import stream as S
from rtrainer.datatypes import TrainStream, ValidationSet
from rtrainer.errors import DataError
from rtrainer.shards import Shard

LENGTHS = [300, 451, 129, 800, 97, 640]


def _unique_dir(path, lengths=LENGTHS, fmt="bin"):
    """Shards whose tokens are their global position: token value = base_i + j (u32 / npy)."""
    path.mkdir(parents=True, exist_ok=True)
    base, bases = 0, []
    for i, n in enumerate(lengths):
        a = np.arange(base, base + n, dtype="<u4")
        if fmt == "npy":
            np.save(path / f"s{i:02d}.npy", a.astype(np.int64))
        else:
            a.tofile(path / f"s{i:02d}.bin")
        bases.append(base)
        base += n
    return bases


def _random_dir(path, lengths=LENGTHS, V=500, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(lengths):
        rng.integers(0, V, n).astype("<u2").tofile(path / f"s{i:02d}.bin")


def _stream(d, B=4, T=32, fmt="auto", **kw):
    kw.setdefault("seed", 5)
    return S.TokenStream(SH.open_source(str(d), fmt), B, T, **kw)


def _take(s, k):
    return [s.next_batch() for _ in range(k)]


def _same(xs, ys):
    assert len(xs) == len(ys)
    for (a, b), (c, d) in zip(xs, ys):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def _window_batch(tokens, pos, B, T):
    """The packed batch starting at token pos, computed from the array: (ids, targets) (B, T)."""
    w = np.asarray(tokens[pos:pos + B * T + 1], dtype=np.int64)
    return w[:-1].reshape(B, T), w[1:].reshape(B, T)


def _rows_batch(tokens, starts, T):
    """Rows of T+1 tokens at the given starts: (ids, targets) (len(starts), T)."""
    w = np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in starts])
    return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------ sources


def test_dir_formats_glob_and_text_cache(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.arange(10, 20, dtype="<u2").tofile(d / "a.bin")
    np.save(d / "b.npy", np.arange(20, 25, dtype=np.int32))
    (d / "c.txt").write_text("25 26\n27\t28 29\n")
    (d / "README.md").write_text("not a shard")
    (d / ".hidden.bin").write_bytes(b"\x00\x00")
    sh = SH.open_source(str(d))
    assert [os.path.basename(s.name) for s in sh] == ["a.bin", "b.npy", "c.txt"]
    assert [len(s) for s in sh] == [10, 5, 5]
    assert [s.max_id for s in sh] == [19, 24, 29]
    assert (d / ".rtrainer" / "c.txt.u32").read_bytes() == np.arange(25, 30, dtype="<u4").tobytes()
    allv = np.concatenate([np.concatenate([c for _, c in s.chunks()]) for s in sh])
    np.testing.assert_array_equal(allv, np.arange(10, 30))
    only = SH.open_source(str(d), glob="*.npy")
    assert [os.path.basename(s.name) for s in only] == ["b.npy"]
    with pytest.raises(DataError, match="no shard files matching"):
        SH.open_source(str(d), glob="*.u16")


def test_manifest_built_once(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    SH.open_source(str(d))
    m = d / ".rtrainer" / "manifest.json"
    t0 = m.stat().st_mtime_ns
    man = json.loads(m.read_text())
    assert [e["tokens"] for e in man["shards"]] == LENGTHS
    assert all(e["dtype"] == "<u2" and e["checksums"] for e in man["shards"])
    SH.open_source(str(d))
    assert m.stat().st_mtime_ns == t0  # verified, not rebuilt
    np.arange(200, dtype="<u2").tofile(d / "s99.bin")  # a new shard is indexed and added
    assert len(SH.open_source(str(d))) == len(LENGTHS) + 1


# ------------------------------------------------------------------------------ bad shards


def test_size_changed(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    SH.open_source(str(d))
    with open(d / "s01.bin", "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match=r"s01\.bin: size is 904 bytes but the manifest records 902 "
                                        r"\(changed at byte offset 902\)"):
        SH.open_source(str(d))


def test_content_changed_names_the_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(SH, "_BLOCK", 64)
    d = tmp_path / "d"
    _random_dir(d)
    SH.open_source(str(d))
    p = d / "s03.bin"
    b = bytearray(p.read_bytes())
    st = os.stat(p)
    b[200] ^= 0xFF
    p.write_bytes(bytes(b))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: quick misses it
    SH.open_source(str(d))
    # the changed byte itself, not the start of its checksum block (192)
    with pytest.raises(DataError, match=r"s03\.bin: content no longer matches the manifest: the byte at offset 200 "
                                        r"changed"):
        SH.open_source(str(d), verify="full")
    os.utime(p)  # a new mtime: the quick check re-hashes it
    with pytest.raises(DataError, match=r"s03\.bin: content no longer matches the manifest: the byte at offset 200 "
                                        r"changed"):
        SH.open_source(str(d))
    b[201] ^= 0x0F   # two changed bytes: the block is named
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"s03\.bin: content no longer matches the manifest at byte offset 192 .*"
                                        r"more than one byte"):
        SH.open_source(str(d))


def test_odd_byte_count(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.arange(10, dtype="<u2").tofile(d / "a.bin")
    (d / "b.bin").write_bytes(b"\x01" * 7)
    with pytest.raises(DataError, match=r"b\.bin: size 7 bytes is not a multiple of 2 \(format u16\); a partial "
                                        r"token at byte offset 6"):
        SH.open_source(str(d))
    with pytest.raises(DataError, match=r"b\.bin: size 7 bytes is not a multiple of 4"):
        SH.open_source(str(d), "u32")


def test_token_id_out_of_range_names_shard_and_offset(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.arange(50, dtype="<u2").tofile(d / "a.bin")
    b = np.arange(60, dtype="<u2")
    b[37] = 300
    b.tofile(d / "b.bin")
    sh = SH.open_source(str(d))
    SH.check_shards_range(sh, 301)
    assert SH.shards_max_token(sh) == 300
    with pytest.raises(DataError, match=r"b\.bin: token id 300 at offset 37 is outside \[0, 256\)"):
        SH.check_shards_range(sh, 256)
    tr, va = SH.split_shards(sh, 0.5)  # a part of a shard: still the file offset
    with pytest.raises(DataError, match=r"b\.bin: token id 300 at offset 37"):
        SH.check_shards_range(va, 256)


def test_path_escaping_the_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.arange(50, dtype="<u2").tofile(d / "a.bin")
    outside = tmp_path / "secret.bin"
    np.arange(50, dtype="<u2").tofile(outside)
    os.symlink(outside, d / "link.bin")
    with pytest.raises(DataError, match=r"shard link\.bin -> .*secret\.bin escapes the directory"):
        SH.open_source(str(d))
    os.unlink(d / "link.bin")
    with pytest.raises(DataError, match=r"data.shard_glob '\.\./\*\.bin' names a path outside the directory"):
        SH.open_source(str(d), glob="../*.bin")
    SH.open_source(str(d))
    m = d / ".rtrainer" / "manifest.json"
    man = json.loads(m.read_text())
    man["shards"][0]["path"] = "../secret.bin"
    m.write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"shard path '\.\./secret\.bin' escapes the directory"):
        SH.open_source(str(d))


def test_missing_shard_corrupt_manifest_bad_text_bad_npy(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    SH.open_source(str(d))
    os.unlink(d / "s02.bin")
    with pytest.raises(DataError, match=r"s02\.bin: shard listed in the data manifest is missing"):
        SH.open_source(str(d))
    assert len(SH.prepare_dir(str(d), rebuild=True)["shards"]) == len(LENGTHS) - 1
    (d / ".rtrainer" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable data manifest"):
        SH.open_source(str(d))
    t = tmp_path / "t"
    t.mkdir()
    (t / "a.txt").write_text("1 2 3\n4 x5 6\n")
    with pytest.raises(DataError, match=r"a\.txt: token #4 \('x5'\) is not an integer"):
        SH.open_source(str(t))
    (t / "a.txt").write_text("1 2 3\n4 -5 6\n")
    with pytest.raises(DataError, match=r"a\.txt: token id -5 at offset 4 is outside"):
        SH.open_source(str(t))
    n = tmp_path / "n"
    n.mkdir()
    np.save(n / "a.npy", np.arange(100, dtype=np.int64))
    raw = (n / "a.npy").read_bytes()
    (n / "a.npy").write_bytes(raw[:-12])
    with pytest.raises(DataError, match=r"a\.npy: holds 788 data bytes but its header says 100 tokens"):
        SH.open_source(str(n))


def test_shard_too_short_for_a_window(tmp_path):
    d = tmp_path / "d"
    _random_dir(d, [300, 20])
    with pytest.raises(DataError, match=r"s01\.bin: 20 tokens .* too few for one window of seq_len 32 "
                                        r"\(needs at least 33\)"):
        _stream(d)


# ------------------------------------------------------------------------------ coverage and order


def _epoch_rows(s, bases, lengths):
    """Token windows of one epoch (B = 1 batches), as (shard, start) from the token values."""
    out = []
    epoch0 = s.state()["epoch"]
    while s.state()["epoch"] == epoch0:
        ids, tg = s.next_batch()
        w = np.concatenate([ids[0], tg[0, -1:]])
        i = int(np.searchsorted(bases, w[0], side="right") - 1)
        assert np.array_equal(w, np.arange(w[0], w[0] + len(w))), "a window is not consecutive tokens"
        assert w[-1] < bases[i] + lengths[i], "a window spans two shards"
        out.append((i, int(w[0] - bases[i])))
    return out


@pytest.mark.parametrize("fmt", ["bin", "npy"])
def test_packed_every_token_once_per_epoch(tmp_path, fmt):
    T = 32
    bases = _unique_dir(tmp_path / "d", fmt=fmt)
    s = _stream(tmp_path / "d", B=1, T=T, fmt="u32" if fmt == "bin" else "auto")
    for epoch in range(3):
        rows = _epoch_rows(s, bases, LENGTHS)
        for i, L in enumerate(LENGTHS):
            starts = sorted(r for si, r in rows if si == i)
            count = np.zeros(L, int)  # times each token is a target
            for r in starts:
                count[r + 1:r + T + 1] += 1
            assert count[0] == 0 and (count[1:] >= 1).all(), (epoch, i)  # no token dropped
            extra = (T - (L - 1) % T) % T  # the documented overlap of the end-aligned last row
            assert count.sum() == L - 1 + extra, (epoch, i)
            assert (count[1:L - T] == 1).all() and (count[L - T:L - T + extra] == 2).all()
            assert (count[L - T + extra:] == 1).all()
            if (L - 1) % T:
                assert starts[-1] == L - T - 1
            # packed: row r's last target is row r+1's first input
            assert all(b - a == T for a, b in zip(starts[:-2], starts[1:-1]))


def test_independent_windows_share_no_token(tmp_path):
    T = 32
    bases = _unique_dir(tmp_path / "d")
    s = _stream(tmp_path / "d", B=1, T=T, fmt="u32", packed=False)
    rows = _epoch_rows(s, bases, LENGTHS)
    for i, L in enumerate(LENGTHS):
        count = np.zeros(L, int)
        for si, r in rows:
            if si == i:
                count[r:r + T + 1] += 1
        extra = (T + 1 - L % (T + 1)) % (T + 1)
        assert (count >= 1).all() and count.sum() == L + extra, i


def test_shard_order_reshuffled_each_epoch_and_batches_cross_shards(tmp_path):
    _unique_dir(tmp_path / "d")
    s = _stream(tmp_path / "d", B=4, T=32, fmt="u32")
    orders = []
    for _ in range(200):
        s.next_batch()
        o = s.state()["shard_order"]
        if not orders or o != orders[-1]:
            orders.append(o)
    assert len(orders) >= 4
    assert all(sorted(o) == list(range(len(LENGTHS))) for o in orders)
    assert len({tuple(o) for o in orders}) >= 3  # reshuffled
    s2 = _stream(tmp_path / "d", B=4, T=32, fmt="u32", shuffle=False)
    for _ in range(100):
        s2.next_batch()
        assert s2.state()["shard_order"] == list(range(len(LENGTHS)))
    # the same seed gives the same orders; another seed others
    s3 = _stream(tmp_path / "d", B=4, T=32, fmt="u32", seed=6)
    assert s3.state()["shard_order"] != orders[0] or _stream(tmp_path / "d", fmt="u32", seed=7).state()[
        "shard_order"] != orders[0]


def test_single_file_packed_batches_are_consecutive_windows(tmp_path):
    """Over one file, packed batch k is the window tokens[k*B*T : (k+1)*B*T + 1] (until the tail)."""
    p = tmp_path / "t.bin"
    np.random.default_rng(1).integers(0, 1000, 2000).astype("<u2").tofile(p)
    tokens = np.fromfile(p, "<u2")
    B, T = 4, 16
    new = S.TokenStream(SH.open_source(str(p)), B, T, seed=1)
    n = (len(tokens) - 1) // (B * T)
    expected = [_window_batch(tokens, k * B * T, B, T) for k in range(n)]
    _same(expected, _take(new, n))


# ------------------------------------------------------------------------------ one token array


def _one(tokens, B, T, name="t", **kw):
    kw.setdefault("seed", 0)
    return S.TokenStream([Shard.from_array(np.asarray(tokens), name)], B, T, **kw)


def test_packed_windows_over_one_array():
    tokens = np.arange(1000, dtype=np.int64)
    s = _one(tokens, 3, 5)
    ids, tg = s.next_batch()
    assert ids.shape == tg.shape == (3, 5)
    assert ids.dtype == tg.dtype == np.int64
    assert ids.flags.c_contiguous and tg.flags.c_contiguous
    assert not np.shares_memory(ids, tg) and not np.shares_memory(ids, tokens)
    np.testing.assert_array_equal(ids.ravel(), np.arange(15))
    np.testing.assert_array_equal(tg, ids + 1)
    for b in range(2):
        assert tg[b, -1] == ids[b + 1, 0]  # row b's last target = row b+1's first input
    ids2, _ = s.next_batch()
    assert ids2[0, 0] == 15  # consecutive batches are contiguous
    ids[:] = -1  # the caller owns its batch
    s.set_state({**s.state(), "row": 0, "batches": 0})
    assert s.next_batch()[0].min() == 0


def test_packed_from_a_memory_mapped_file(tmp_path):
    p = tmp_path / "t.bin"
    np.arange(50, dtype="<u2").tofile(p)
    (sh,) = SH.open_source(str(p))
    assert sh.array is None and sh.path == str(p)  # mapped on demand, not read whole
    ids, tg = S.TokenStream([sh], 2, 4).next_batch()
    assert type(ids) is np.ndarray and ids.dtype == np.int64
    np.testing.assert_array_equal(tg.ravel(), np.arange(1, 9))


def test_packed_epoch_ends_with_an_end_aligned_row():
    # 23 tokens, T = 3: rows start at 0, 3, ..., 18 (7 full strides of (23-1)//3), then the tail row
    # aligned to the end at 23 - 3 - 1 = 19; B = 2 -> 4 batches per epoch, the 5th starts epoch 1
    s = _one(np.arange(23), 2, 3)
    assert s.batches_per_epoch() == 4
    firsts, epochs = [], []
    for _ in range(9):
        ids, tg = s.next_batch()
        firsts.append(ids[:, 0].tolist())
        epochs.append(s.state()["epoch"])
    assert firsts == [[0, 3], [6, 9], [12, 15], [18, 19]] * 2 + [[0, 3]]
    assert epochs == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert s.state()["batches"] == 9


def test_packed_exact_fit():
    s = _one(np.arange(7), 2, 3)  # exactly one batch per epoch
    a, _ = s.next_batch()
    b, _ = s.next_batch()
    np.testing.assert_array_equal(a, b)
    assert s.state()["epoch"] == 2


def test_packed_too_short():
    with pytest.raises(DataError, match=r"train\.bin: 3 tokens .* too few for one window of seq_len 3 "
                                        r"\(needs at least 4\)"):
        _one(np.arange(3), 2, 3, "train.bin")


def test_packed_state_resume_exact():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, size=500)
    s = _one(tokens, 4, 7)
    _take(s, 13)
    st = json.loads(json.dumps(s.state()))  # JSON-able
    expected = _take(s, 40)  # spans a wrap
    r = _one(tokens, 4, 7)
    r.set_state(st)
    _same(expected, _take(r, 40))
    assert r.state() == s.state()


def test_packed_set_state_validation():
    s = _one(np.arange(100), 2, 5)
    good = s.state()
    with pytest.raises(DataError, match="fingerprint"):  # saved for other tokens
        _one(np.arange(99), 2, 5).set_state(good)
    with pytest.raises(DataError, match=r"stream position \(shard_pos 0, row 20\) is out of range"):
        s.set_state({**good, "row": 20})  # rows 0..19: (100-1)//5 = 19 full strides + the tail row
    with pytest.raises(DataError, match="'row' must be a non-negative integer"):
        s.set_state({**good, "row": -1})
    with pytest.raises(DataError, match="'epoch' must be a non-negative integer"):
        s.set_state({k: v for k, v in good.items() if k != "epoch"})
    with pytest.raises(DataError, match="must be an object"):
        s.set_state([1, 2])
    s.set_state({**good, "row": 19})  # the last row: aligned to the end, 100 - 5 - 1 = 94
    assert s.next_batch()[0][0, 0] == 94


def test_fixed_windows_over_one_array_identical_across_calls():
    tokens = np.arange(1000)
    fw = S.ShardWindows([Shard.from_array(tokens, "v")], 3, 8, 4)
    first = list(fw.batches())
    assert len(first) == len(fw) == 4
    again = list(fw.batches())
    _same(first, again)
    for a, b in first:
        assert a.shape == (3, 8) and a.dtype == np.int64 and a.flags.c_contiguous
        assert b.flags.c_contiguous
        np.testing.assert_array_equal(b, a + 1)
    starts = np.concatenate([ids[:, 0] for ids, _ in first])
    np.testing.assert_array_equal(starts, np.linspace(0, 1000 - 8 - 1, 12).astype(int))
    assert starts[0] == 0 and starts[-1] == 991  # spread over the whole array


def test_fixed_windows_modifying_a_batch_does_not_leak():
    fw = S.ShardWindows([Shard.from_array(np.arange(100))], 2, 4, 2)
    ids, _ = next(fw.batches())
    ids[:] = -1
    ids2, _ = next(fw.batches())
    assert ids2.min() >= 0


def test_fixed_windows_short():
    fw = S.ShardWindows([Shard.from_array(np.arange(5))], 2, 4, 1)  # exactly T+1 tokens: all the same window
    ids, tg = next(fw.batches())
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(DataError, match=r"val\.txt: no validation shard holds one window of seq_len 4 "
                                        r"\(needs at least 5 tokens in one shard; 1 shards, 4 tokens\)"):
        S.ShardWindows([Shard.from_array(np.arange(4))], 2, 4, 1, name="val.txt")


def test_shard_from_array_rejects_what_is_not_tokens():
    with pytest.raises(DataError, match="x: tokens must be a 1-D integer array"):
        Shard.from_array(np.zeros((2, 2), np.int64), "x")
    with pytest.raises(DataError, match="tokens must be a 1-D integer array"):
        Shard.from_array(np.zeros(4, np.float32))


def test_streams_and_validation_sets_provide_the_data_interfaces(tmp_path):
    from rtrainer.tasks import TaskEval, TaskStream

    _random_dir(tmp_path / "d")
    sh = SH.open_source(str(tmp_path / "d"))
    streams = [S.TokenStream(sh, 2, 8), TaskStream("induction_heads", 2, 16, 0, task_vocab=8)]
    vals = [S.ShardWindows(sh, 2, 8, 2), TaskEval("induction_heads", 2, 16, 2, 0, task_vocab=8)]
    for st in streams:
        assert isinstance(st, TrainStream)
        ids, tg = st.next_batch()
        cur = json.loads(json.dumps(st.state()))
        nxt = st.next_batch()
        st.set_state(cur)
        _same([nxt], [st.next_batch()])
        st.close()
    for v in vals:
        assert isinstance(v, ValidationSet) and not isinstance(v, TrainStream)
        first = list(v.batches())
        v.close()
        _same(first, list(v.batches()))  # still usable after close
    assert not isinstance(object(), TrainStream)


# ------------------------------------------------------------------------------ shuffled windows


@pytest.mark.parametrize("packed", [True, False])
def test_shuffled_windows_are_a_new_permutation_of_the_same_windows_every_epoch(tmp_path, packed):
    T = 32
    bases = _unique_dir(tmp_path / "d")
    in_order = _epoch_rows(_stream(tmp_path / "d", B=1, T=T, fmt="u32", packed=packed), bases, LENGTHS)
    s = _stream(tmp_path / "d", B=1, T=T, fmt="u32", packed=packed, shuffle_windows=True)
    assert s.windows_shuffled
    epochs = [_epoch_rows(s, bases, LENGTHS) for _ in range(3)]
    for rows in epochs:
        # every window of every shard exactly once per epoch (so every token, as in file order) ...
        assert sorted(rows) == sorted(in_order)
        # ... the shards still one after the other, in the epoch's shard order
        shards_seen = [si for si, _ in rows]
        assert [si for i, si in enumerate(shards_seen) if i == 0 or si != shards_seen[i - 1]] == \
            list(dict.fromkeys(shards_seen))
        # ... but not in file order inside a shard
        for i in range(len(LENGTHS)):
            starts = [r for si, r in rows if si == i]
            assert starts != sorted(starts), i
    # a new order every epoch
    for i in range(len(LENGTHS)):
        per_epoch = [tuple(r for si, r in rows if si == i) for rows in epochs]
        assert len(set(per_epoch)) == 3, i


def test_shuffled_windows_are_seeded(tmp_path):
    _random_dir(tmp_path / "d")
    a = _take(_stream(tmp_path / "d", shuffle_windows=True, seed=5), 60)
    _same(a, _take(_stream(tmp_path / "d", shuffle_windows=True, seed=5), 60))  # same seed, same batches
    b = _take(_stream(tmp_path / "d", shuffle_windows=True, seed=6), 60)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, b))  # another seed, another order
    c = _take(_stream(tmp_path / "d", shuffle_windows=False, seed=5), 60)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    # the order is a function of (seed, epoch, shard) only: the shard order's draw does not move it
    rows_shuf = [S.TokenStream([Shard.from_array(np.arange(500))], 1, 9, shuffle_windows=True, seed=5, shuffle=sh)
                 .next_rows() for sh in (True, False)]
    assert rows_shuf[0] == rows_shuf[1]


def test_the_cursor_keeps_the_window_order_it_was_saved_with(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    shuffled = _stream(d, shuffle_windows=True)
    _take(shuffled, 5)
    st = json.loads(json.dumps(shuffled.state()))
    assert st["shuffle_windows"] is True and st["window_seed"] == 5
    expected = _take(shuffled, 30)
    # the permutation comes from the cursor's seed, not from this stream's run.seed
    other_seed = _stream(d, shuffle_windows=True, seed=99)
    other_seed.set_state(st)
    _same(expected, _take(other_seed, 30))
    # a run keeps the window order it started with: a change is an error naming the key
    with pytest.raises(DataError, match=r"shuffle_windows = True but this run has False .*data\.shuffle_windows"):
        _stream(d, shuffle_windows=False).set_state(st)
    plain = _stream(d, shuffle_windows=False)
    _take(plain, 5)
    with pytest.raises(DataError, match="shuffle_windows = False but this run has True"):
        _stream(d, shuffle_windows=True).set_state(plain.state())
    with pytest.raises(DataError, match="'window_seed' must be a non-negative integer"):
        _stream(d, shuffle_windows=True).set_state({**st, "window_seed": "5"})


def test_a_cursor_saved_before_window_shuffling_continues_in_file_order(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    old = _stream(d, shuffle_windows=False)
    _take(old, 7)
    legacy = {k: v for k, v in old.state().items() if k not in ("shuffle_windows", "window_seed")}
    expected = _take(old, 40)  # crosses an epoch: file order in the next epoch too
    new = _stream(d, shuffle_windows=True)  # the new default
    new.set_state(legacy)
    assert not new.windows_shuffled
    _same(expected, _take(new, 40))
    # ... and it stays a cursor of that kind, so every later resume keeps the file order
    again = json.loads(json.dumps(new.state()))
    assert "shuffle_windows" not in again
    expected = _take(new, 20)
    third = _stream(d, shuffle_windows=True)
    third.set_state(again)
    _same(expected, _take(third, 20))
    # a fresh cursor of the same stream object shuffles again
    third.set_state(_stream(d, shuffle_windows=True).state())
    assert third.windows_shuffled


def test_random_windows_ignore_shuffle_windows(tmp_path):
    _random_dir(tmp_path / "d")
    a = _stream(tmp_path / "d", random_windows=True, shuffle_windows=True)
    b = _stream(tmp_path / "d", random_windows=True, shuffle_windows=False)
    _same(_take(a, 20), _take(b, 20))
    assert not a.windows_shuffled and a.state()["shuffle_windows"] is False
    b.set_state(a.state())


# ------------------------------------------------------------------------------ prefetch and resume


@pytest.mark.parametrize("mode", [{}, {"packed": False}, {"random_windows": True}, {"shuffle_windows": True},
                                  {"packed": False, "shuffle_windows": True}])
def test_prefetch_delivers_the_same_stream(tmp_path, mode):
    _random_dir(tmp_path / "d")
    ref = _take(_stream(tmp_path / "d", **mode), 150)  # several epochs
    for workers, buf in ((2, 3), (2, 16), (1, 1)):
        s = _stream(tmp_path / "d", prefetch_workers=workers, prefetch_buffer=buf, **mode)
        _same(ref, _take(s, 150))
        s.close()


def test_state_is_the_last_consumed_batch_not_the_read_ahead(tmp_path):
    _random_dir(tmp_path / "d")
    a = _stream(tmp_path / "d")
    b = _stream(tmp_path / "d", prefetch_workers=2, prefetch_buffer=8)
    for k in range(1, 12):
        a.next_batch()
        b.next_batch()
        sa, sb = a.state(), b.state()
        assert sb["batches"] == k
        assert {x: y for x, y in sa.items() if x != "prefetch"} == {x: y for x, y in sb.items() if x != "prefetch"}
    b.close()


def _batches_per_epoch(d):
    s = _stream(d)
    n = 0
    while s.state()["epoch"] == 0:
        s.next_batch()
        n += 1
    return n


@pytest.mark.parametrize("mode", [{}, {"packed": False}, {"random_windows": True}, {"shuffle_windows": True},
                                  {"packed": False, "shuffle_windows": True}])
@pytest.mark.parametrize("w_save, w_load", [(0, 0), (2, 2), (0, 2), (2, 0)])
def test_resume_mid_epoch_and_across_the_epoch_boundary(tmp_path, mode, w_save, w_load):
    d = tmp_path / "d"
    _random_dir(d)
    per_epoch = _batches_per_epoch(d)
    K = 25
    for k in (7, per_epoch - 3, 2 * per_epoch - 1):  # mid-epoch; the next K cross 1 (then 2) epoch ends
        a = _stream(d, prefetch_workers=w_save, prefetch_buffer=4, **mode)
        _take(a, k)
        st = json.loads(json.dumps(a.state()))  # through JSON, as in run_state.json
        expected = _take(a, K)
        if mode in ({}, {"shuffle_windows": True}) and k > 7:
            assert a.state()["epoch"] > st["epoch"]  # the K batches cross an epoch boundary
        b = _stream(d, prefetch_workers=w_load, prefetch_buffer=4, **mode)
        _take(b, 3)  # a stream that already read (ahead) is reset by set_state
        b.set_state(st)
        _same(expected, _take(b, K))
        assert b.state() == a.state() or w_save != w_load
        a.close()
        b.close()


def test_set_state_rejects_a_foreign_cursor(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    s = _stream(d)
    _take(s, 5)
    good = s.state()
    with pytest.raises(DataError, match="fingerprint"):
        s.set_state({**good, "fingerprint": "0" * 16})
    with pytest.raises(DataError, match="seq_len = 31 but this run has 32"):
        s.set_state({**good, "seq_len": 31})
    with pytest.raises(DataError, match="not a permutation"):
        s.set_state({**good, "shard_order": [0] * len(LENGTHS)})
    with pytest.raises(DataError, match="out of range"):
        s.set_state({**good, "row": 10_000})
    with pytest.raises(DataError, match="'rng' is not a PCG64"):
        s.set_state({**good, "rng": {"x": 1}})
    with pytest.raises(DataError, match="another kind"):
        s.set_state({"pos": 0, "epoch": 0, "batches": 0})
    s.set_state(good)


# ------------------------------------------------------------------------------ validation


def test_shard_windows_fixed_and_within_shards(tmp_path):
    bases = _unique_dir(tmp_path / "d")
    sh = SH.open_source(str(tmp_path / "d"), "u32")
    v = S.ShardWindows(sh, 3, 32, 5)
    first = list(v.batches())
    _same(first, list(v.batches()))
    for ids, tg in first:
        for w in np.concatenate([ids, tg[:, -1:]], axis=1):
            i = int(np.searchsorted(bases, w[0], side="right") - 1)
            assert np.array_equal(w, np.arange(w[0], w[0] + 33)) and w[-1] < bases[i] + LENGTHS[i]
    # over one shard: windows at linspace(0, L - T - 1, n), as documented
    one = sh[3]
    tokens = np.concatenate([c for _, c in one.chunks()])
    starts = np.linspace(0, len(tokens) - 16 - 1, 8).astype(np.int64)
    expected = [_rows_batch(tokens, starts[k * 2:(k + 1) * 2], 16) for k in range(4)]
    _same(list(S.ShardWindows([one], 2, 16, 4).batches()), expected)


def test_split_shards_holds_out_the_end_of_every_shard(tmp_path):
    _unique_dir(tmp_path / "d")
    sh = SH.open_source(str(tmp_path / "d"), "u32")
    tr, va = SH.split_shards(sh, 0.1)
    for s, t, v in zip(sh, tr, va):
        assert (t.lo, t.hi, v.lo, v.hi) == (0, int(len(s) * 0.9), int(len(s) * 0.9), len(s))


# ------------------------------------------------------------------------------ memory

_MEM_SCRIPT = r"""
import resource, sys
import numpy as np, psutil
from rtrainer import shards as SH
from rtrainer import stream as S
d, workers, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
proc = psutil.Process()
sh = SH.open_source(d)
total = sum(len(s) * s.dtype.itemsize for s in sh)
s = S.TokenStream(sh, 64, 1024, seed=0, prefetch_workers=workers, prefetch_buffer=4)
for _ in range(3):
    s.next_batch()   # threads started, first shard mapped: the fixed costs are paid
vms = proc.memory_info().vms
resource.setrlimit(resource.RLIMIT_AS, (vms + limit, vms + limit))  # address space: mappings count
rss0 = peak = proc.memory_info().rss
n = 0
while s.state()["epoch"] < 1:
    s.next_batch()
    n += 1
    if n % 25 == 0:
        peak = max(peak, proc.memory_info().rss)
try:
    np.ones(total, np.uint8)   # the control: reading the data whole does not fit in the limit
    whole = "fits"
except MemoryError:
    whole = "MemoryError"
s.close()
print(total, rss0, peak, n, whole)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_streams_5x_its_memory_limit_with_flat_rss(tmp_path, workers):
    d = tmp_path / "big"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):  # 20 shards x 16 MiB = 320 MiB
        rng.integers(0, 60000, 8 << 20, dtype=np.uint16).tofile(d / f"s{i:02d}.bin")
    limit_mb = 64
    p = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(d), str(workers), str(limit_mb)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    total, rss0, peak, n, whole = p.stdout.split()
    total, rss0, peak = int(total), int(rss0), int(peak)
    assert total >= 5 * (limit_mb << 20)
    assert int(n) >= total // (64 * 1024 * 2) - 4  # the whole epoch was streamed
    assert whole == "MemoryError"  # the limit is real
    assert peak - rss0 < 40 << 20, (rss0 >> 20, peak >> 20)  # flat: pages are released behind the cursor


# ------------------------------------------------------------------------------ end to end


def _dir_run_file(tmp_path, data_dir, steps, workers):
    cfg = tiny_config(tmp_path, steps=steps, train=data_dir, data_format="u16")
    text = cfg.read_text().replace('val_ratio = 0.1\n', f'val_ratio = 0.1\nprefetch_workers = {workers}\n'
                                   'prefetch_buffer = 3\nshuffle_shards = true\n')
    cfg.write_text(text)
    return cfg


@pytest.mark.parametrize("workers, fault", [(2, "after_step=13:KILL"), (0, "after_step=20:KILL")])
def test_run_on_a_shard_dir_killed_and_resumed_is_bitwise_identical(tmp_path, workers, fault):
    data = tmp_path / "shards"
    _random_dir(data, [700, 450, 900, 380], V=128, seed=3)  # ~2k train tokens: an epoch is ~17 steps of 128
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a = _dir_run_file(a, data, 40, workers)
    cfg_b = _dir_run_file(b, data, 40, workers)
    run_cli("run", cfg_a, check=True)
    p = run_cli("run", cfg_b, env_extra={"RTRAINER_FAULT": fault})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    state = json.loads((b / "run" / "run_state.json").read_text())
    assert state["data"]["train"]["kind"] == "shards"
    assert state["data"]["train"]["epoch"] >= 0 and state["step"] in (10, 20)
    run_cli("run", cfg_b, "--resume", "auto", check=True)
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    rb = strip_timing(read_metrics(b / "run" / "metrics.jsonl"))
    assert ra == rb
    ta = checkpoint_tensors(latest_checkpoint(a / "run"))
    tb = checkpoint_tensors(latest_checkpoint(b / "run"))
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k
    final = json.loads((a / "run" / "run_state.json").read_text())["data"]["train"]
    assert final["epoch"] >= 2  # the run crossed epoch boundaries (and the resume did)


def test_prefetch_run_equals_no_prefetch_run(tmp_path):
    data = tmp_path / "shards"
    _random_dir(data, [700, 450, 900, 380], V=128, seed=3)
    outs = []
    for w in (0, 2):
        r = tmp_path / f"w{w}"
        r.mkdir()
        run_cli("run", _dir_run_file(r, data, 20, w), check=True)
        outs.append(strip_timing(read_metrics(r / "run" / "metrics.jsonl")))
    assert outs[0] == outs[1]


def test_cli_prepare_and_bad_shard_exit_3(tmp_path):
    data = tmp_path / "shards"
    _random_dir(data, [700, 450], V=128)
    (data / "c.txt").write_text(" ".join(["5"] * 300))
    p = run_cli("prepare", data, check=True)
    assert "3 shards, 1,450 tokens, max token id 127; manifest verified" in p.stdout
    assert (data / ".rtrainer" / "c.txt.u32").exists()
    with open(data / "s00.bin", "ab") as f:
        f.write(b"\x00")
    p = run_cli("prepare", data)
    assert p.returncode == 3 and "s00.bin: size is 1401 bytes but the manifest records 1400" in p.stderr
    cfg = _dir_run_file(tmp_path, data, 5, 0)
    p = run_cli("run", cfg)
    assert p.returncode == 3 and "s00.bin: size is 1401 bytes" in p.stderr
    (data / "s00.bin").write_bytes((data / "s00.bin").read_bytes()[:-1])
    cfg.write_text(cfg.read_text().replace("vocab_size = 128", "vocab_size = 100"))
    p = run_cli("run", cfg)
    assert p.returncode == 3 and "is outside [0, 100)" in p.stderr and "s0" in p.stderr


def test_cursor_of_the_old_single_file_stream_is_accepted(tmp_path):
    """Checkpoints of earlier versions hold the cursor of a single-file packed stream: ``pos`` (a
    multiple of B*T), ``epoch``, ``batches``, ``n_tokens``. It continues at the same window."""
    p = tmp_path / "t.bin"
    np.random.default_rng(2).integers(0, 1000, 3000).astype("<u2").tofile(p)
    tokens = np.fromfile(p, "<u2")
    B, T = 4, 16
    st = json.loads(json.dumps({"pos": 9 * B * T, "epoch": 0, "batches": 9, "n_tokens": len(tokens),
                                "batch_size": B, "seq_len": T}))
    expected = [_window_batch(tokens, (9 + k) * B * T, B, T) for k in range(10)]
    new = S.TokenStream(SH.open_source(str(p)), B, T, seed=1)
    new.set_state(st)
    _same(expected, _take(new, 10))
    assert new.state()["batches"] == 19
    with pytest.raises(DataError, match="saved for 2999 tokens"):
        new.set_state({**st, "n_tokens": 2999})
    with pytest.raises(DataError, match="'pos' must be a non-negative multiple of seq_len"):
        new.set_state({**st, "pos": 5})


def test_text_shard_converted_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(SH, "_BLOCK", 16)  # tokens cut at every chunk boundary
    d = tmp_path / "d"
    d.mkdir()
    vals = np.random.default_rng(4).integers(0, 100_000, 500)
    (d / "a.txt").write_text("\n".join(" ".join(map(str, vals[i:i + 7])) for i in range(0, 500, 7)))  # no final \n
    (sh,) = SH.open_source(str(d))
    assert len(sh) == 500 and sh.max_id == vals.max()
    s = S.TokenStream([sh], 1, 499, shuffle=False)
    ids, tg = s.next_batch()
    np.testing.assert_array_equal(np.concatenate([ids[0], tg[0, -1:]]), vals)


def test_touched_but_unchanged_shard_is_rehashed_once(tmp_path):
    d = tmp_path / "d"
    _random_dir(d)
    SH.open_source(str(d))
    os.utime(d / "s01.bin", ns=(1, 10**18))
    SH.open_source(str(d))  # content verified, new mtime recorded
    man = json.loads((d / ".rtrainer" / "manifest.json").read_text())
    assert man["shards"][1]["mtime_ns"] == 10**18


def test_trainer_closes_the_prefetch_workers(tmp_path):
    import threading

    from rtrainer.trainer import Trainer

    data = tmp_path / "shards"
    _random_dir(data, [700, 450], V=128)
    cfg = _dir_run_file(tmp_path, data, 4, 2)
    tr = Trainer.from_file(str(cfg), console=False)
    tr.fit()
    assert tr.data.train.state()["batches"] == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("rtrainer-prefetch")]


# ------------------------------------------------------------------------------ window order of old and new runs

FIXTURE = REPO / "tests" / "fixtures" / "in_order_run"


def _fixture_run_file(tmp_path, extra=""):
    """The run file of the fixture run (1 layer, width 8, 30 steps on the first 3,000 corpus bytes,
    checkpoints every 10 steps), made with the code before data.shuffle_windows existed. The fixture
    holds its step-10 checkpoint, its metrics and the tensors of its step 30."""
    from conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:3000])
    text = (FIXTURE / "run.toml.in").read_text().replace("{out_dir}", str(tmp_path / "run")).replace(
        "{train}", str(corpus))
    p = tmp_path / "run.toml"
    p.write_text(text.replace("[data]\n", "[data]\n" + extra))
    return p


@pytest.mark.parametrize("extra", ["", "shuffle_windows = false\n"])
def test_a_checkpoint_from_before_window_shuffling_resumes_in_order_bitwise(tmp_path, extra):
    from rtrainer.checkpoint import load_checkpoint

    cfg = _fixture_run_file(tmp_path, extra)
    _, old_state = load_checkpoint(str(FIXTURE / "step-00000010"))
    assert "shuffle_windows" not in old_state["config"]["data"] and "shuffle_windows" not in old_state["data"]["train"]
    # resume the old step-10 checkpoint, pause at 20, resume again: both resumes keep the file order
    run_cli("run", cfg, "--resume", FIXTURE / "step-00000010", "--stop-at", "20", check=True)
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())["data"]["train"]
    assert state["batches"] == 20 and "shuffle_windows" not in state
    run_cli("run", cfg, "--resume", "auto", check=True)
    want = strip_timing(read_metrics(FIXTURE / "metrics.jsonl"))
    got = strip_timing(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    tail = [r for r in want if r.get("step", 0) > 10]
    ta = checkpoint_tensors(FIXTURE / "final-step-00000030.safetensors")
    tb = checkpoint_tensors(latest_checkpoint(tmp_path / "run"))
    assert set(ta) == set(tb)
    # steps 11..30 of the uninterrupted run of the old code: bit for bit on the kind of CPU that
    # wrote the fixture; on another (AVX2 vs AVX-512 kernels) to float32 rounding. A shuffled
    # order would differ by far more (the test below).
    if got[-len(tail):] == tail:
        for k in ta:
            assert np.array_equal(ta[k], tb[k]), k
    else:
        assert records_close(got[-len(tail):], tail, rel=1e-4) is None
        for k in ta:
            np.testing.assert_allclose(tb[k], ta[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_a_new_run_shuffles_the_windows_and_resumes_bitwise(tmp_path):
    cfg = _fixture_run_file(tmp_path)   # no data.shuffle_windows: the default
    a = tmp_path / "a"
    a.mkdir()
    cfg_a = a / "run.toml"
    cfg_a.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(a / "run")))
    run_cli("run", cfg_a, check=True)
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    assert ra != strip_timing(read_metrics(FIXTURE / "metrics.jsonl"))  # another order than the old runs'
    st = json.loads((a / "run" / "run_state.json").read_text())["data"]["train"]
    assert st["shuffle_windows"] is True and st["epoch"] >= 1   # the run crossed an epoch boundary
    p = run_cli("run", cfg, env_extra={"RTRAINER_FAULT": "after_step=14:KILL"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    run_cli("run", cfg, "--resume", "auto", check=True)
    assert strip_timing(read_metrics(tmp_path / "run" / "metrics.jsonl")) == ra
    ta = checkpoint_tensors(latest_checkpoint(a / "run"))
    tb = checkpoint_tensors(latest_checkpoint(tmp_path / "run"))
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k
    # the order a run started with is kept: resuming it in file order is refused (exit 3, one line)
    p = run_cli("run", cfg, "--resume", latest_checkpoint(a / "run"), "--set", "data.shuffle_windows=false",
                "--set", "train.steps=40", "--overwrite")
    assert p.returncode == 3 and "shuffle_windows = True but this run has False" in p.stderr, p.stderr
    assert p.stderr.count("rtrainer: error:") == 1
