"""rtrainer.net.Net: built from a config, it computes what its pieces compute; loading a step
checkpoint or a run directory gives back the trained parameters; bad paths are clear errors."""
import numpy as np
import pytest

from conftest import latest_checkpoint, run_cli, tiny_config
from rtrainer.config import load_config
from rtrainer.errors import CheckpointError
from rtrainer.heads import HPNHead
from rtrainer.model import MambaLiteStack, MambaStack
from rtrainer.net import Freeze, Net

V = 13


def _batch(B=2, T=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))


@pytest.mark.parametrize("layer, head", [("mamba-lite", "hpn"), ("mamba", "softmax")])
def test_build_forward_loss_predict(tmp_path, layer, head):
    cfg = load_config(tiny_config(tmp_path), [f'model.layer="{layer}"', f'head.kind="{head}"',
                                              'train.freeze="first:1"'])
    net = Net.build(cfg, V)
    assert isinstance(net.model, MambaStack if layer == "mamba" else MambaLiteStack)
    assert net.model.L == 2 and net.model.D == 16
    # the freeze mask comes from train.freeze: layer 0 is not trainable, layer 1 is
    assert all(not s.trainable for s in net.flat.specs if s.name.startswith("layers.0."))
    assert all(s.trainable for s in net.flat.specs if s.name.startswith("layers.1."))
    net.init(3, "mamba")
    ids, targets = _batch()
    z = net.forward(ids).copy()
    assert z.shape == (ids.size, 16) and np.all(np.isfinite(z))
    loss = net.loss(ids, targets)
    assert loss == net.head.forward(net.model.forward(ids), targets) and np.isfinite(loss)
    pred = net.predict(ids)
    assert pred.shape == ids.shape and pred.dtype == np.int64
    assert np.array_equal(pred.reshape(-1), net.head.predict(z))
    # evaluate: token-weighted mean loss and accuracy over the batches
    batches = [_batch(seed=1), _batch(seed=2)]
    r = net.evaluate(batches)
    want_loss = np.mean([net.loss(i, t) for i, t in batches])     # equal token counts
    want_acc = np.mean([np.mean(net.predict(i) == t) for i, t in batches])
    assert r["loss"] == pytest.approx(want_loss, rel=1e-12) and r["acc"] == pytest.approx(want_acc)
    # forward_backward: the loss, gradients of the trainable tensors only
    assert net.forward_backward(ids, targets) == loss
    assert np.any(net.grads["layers.1.out_proj_w"]) and not np.any(net.grads["layers.0.out_proj_w"])


def test_evaluate_ignores_unscored_targets():
    net = Net(MambaLiteStack(V, 8, 4, 3, 1, 1, scan_chunk=4), HPNHead(V, 8))
    net.init(0, "mamba")
    ids, targets = _batch()
    masked = targets.copy()
    masked[:, :5] = -1
    r = net.evaluate([(ids, masked)])
    keep = masked != -1
    assert r["acc"] == pytest.approx(np.mean(net.predict(ids)[keep] == masked[keep]))
    assert r["loss"] == pytest.approx(net.loss(ids, masked), rel=1e-12)


def test_tensors_round_trip():
    a = Net(MambaLiteStack(V, 8, 4, 3, 1, 2, scan_chunk=4), HPNHead(V, 8))
    a.init(1, "mamba")
    a.flat.m[:] = 0.5
    b = Net(MambaLiteStack(V, 8, 4, 3, 1, 2, scan_chunk=4), HPNHead(V, 8))
    b.load_tensors(a.tensors())
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    ids, _ = _batch()
    assert np.array_equal(a.forward(ids), b.forward(ids))
    with pytest.raises(CheckpointError, match="tensor 'param/embedding' is missing"):
        b.load_tensors({k: v for k, v in a.tensors().items() if k != "param/embedding"}, source="x")


def test_load_a_step_checkpoint_and_a_run_directory(tmp_path):
    cfg = tiny_config(tmp_path, steps=20)
    run_cli("run", cfg, "--headless", check=True)
    step_dir = latest_checkpoint(tmp_path / "run")
    net = Net.load(step_dir)
    from conftest import checkpoint_tensors

    saved = checkpoint_tensors(step_dir)
    for name, v in net.params.items():
        assert np.array_equal(v, saved[f"param/{name}"]), name
    ids, targets = _batch()
    ids, targets = ids % 128, targets % 128
    again = Net.load(tmp_path / "run")           # a run directory: its newest valid checkpoint
    assert again.source == str(step_dir)
    assert again.loss(ids, targets) == net.loss(ids, targets)
    # a corrupt newest checkpoint is skipped for the one before it
    (step_dir / "model.safetensors").write_bytes(b"garbage")
    older = Net.load(tmp_path / "run")
    assert older.source != str(step_dir) and older.source.endswith("10")


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Net.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no step checkpoint in"):
        Net.load(tmp_path / "empty")


def test_freeze_from_config(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["model.target_layers=3", 'train.freeze="indices:2,0"',
                                              "train.freeze_embedding=true"])
    assert Freeze.from_config(cfg) == Freeze(layers=(0, 2), embedding=True)
    net = Net.build(cfg, V)
    assert not net.flat.spec("embedding").trainable and net.model.train_embedding is False
    assert net.model.frozen_layers == {0, 2}
