import numpy as np
import pytest

from rtrainer.errors import CheckpointError
from rtrainer.params import FlatParams, ParamSpec


def specs():
    return [ParamSpec("a", (3, 5), decay=True), ParamSpec("b", (7,)),
            ParamSpec("fixed", (4, 4), decay=True, trainable=False), ParamSpec("c", (2, 3), decay=True)]


def test_views_share_one_aligned_buffer():
    f = FlatParams(specs())
    for name, (a, b) in f.offsets.items():
        assert a % 16 == 0
        assert np.shares_memory(f.params[name], f.data) and np.shares_memory(f.grads[name], f.grad)
    f.params["b"][...] = 3.0
    a, b = f.offsets["b"]
    assert np.all(f.data[a:b] == 3.0) and f.data.sum() == 21.0


def test_segments_follow_trainable_and_decay_scope():
    f = FlatParams(specs())
    seg = f.segments("matrices")
    assert [tuple(r) for r in seg] == [(*f.offsets["a"], 1), (*f.offsets["b"], 0), (*f.offsets["c"], 1)]
    assert set(f.segments("all")[:, 2]) == {1}
    assert f.n_trainable == 15 + 7 + 6


def test_zero_grad_zeroes_trainable_gradients():
    f = FlatParams(specs())
    f.grad[:] = 1.0
    f.zero_grad()
    for name in ("a", "b", "c"):
        assert not f.grads[name].any(), name


def test_state_round_trip_and_errors():
    f = FlatParams(specs())
    rng = np.random.default_rng(0)
    for buf in (f.data, f.m, f.v):
        buf[:] = rng.standard_normal(f.size)
    g = FlatParams(specs())
    g.load_state_tensors({k: v.copy() for k, v in f.state_tensors().items()})
    for name in f.params:
        assert np.array_equal(f.params[name], g.params[name])
    tensors = f.state_tensors()
    del tensors["adam_v/c"]
    with pytest.raises(CheckpointError, match="adam_v/c"):
        g.load_state_tensors(tensors)
    tensors = f.state_tensors()
    tensors["param/a"] = np.zeros((5, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"param/a.*\(5, 3\)"):
        g.load_state_tensors(tensors)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        FlatParams([ParamSpec("a", (1,)), ParamSpec("a", (2,))])
