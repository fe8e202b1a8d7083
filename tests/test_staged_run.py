"""Staged training end to end through the real CLI: BP cadence, FF metrics, expansion from a
checkpoint with freezing, resume after a real SIGKILL, and the errors a user meets."""
import signal

import numpy as np
import pytest

from conftest import latest_checkpoint, read_metrics, run_cli, strip_timing, tiny_config
from rtrainer.checkpoint import load_checkpoint
from rtrainer.model import init_layer

FF_KEYS = {"ff_loss", "bp_applied", "conflict_layers", "surgery"}


def sets(**kw):
    out = []
    for k, v in kw.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def ckpt(run_dir):
    return load_checkpoint(str(latest_checkpoint(run_dir)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A trained 2-layer model: the starting point of the expansion runs."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(tmp, steps=20)
    run_cli("run", cfg, check=True)
    return tmp / "run"     # a run directory: init_from takes its newest step checkpoint


def test_cadence_and_ff_metrics(tmp_path):
    cfg = tiny_config(tmp_path, steps=12)
    p = run_cli("run", cfg, *sets(train__ff="true", train__bp_cadence=3, train__surgery="orthograd"), check=True)
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in train if r["bp_applied"]] == [3, 6, 9, 12]
    for r in train:
        assert FF_KEYS <= set(r) and r["surgery"] == "orthograd"
        assert r["ff_loss"] is not None and r["ff_loss"] >= 0
        if r["bp_applied"]:
            assert r["loss"] is not None and 0 <= r["conflict_layers"] <= 2
        else:
            assert r["loss"] is None and r["conflict_layers"] == 0   # no HPN loss on FF-only steps
    _, state = ckpt(tmp_path / "run")
    assert state["optimizer_updates"] == 4          # Adam's bias correction counts Adam updates only
    assert state["staged"]["bp_steps"] == 4 and state["staged"]["ff_steps"] == 8
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step") and "/12" in ln]
    assert len(lines) == 12
    for ln in lines:   # the console never reports the FF loss as "loss"
        assert ("ff-only" in ln) != (" loss " in ln), ln
        assert "ff_loss" in ln


def test_ff_only_steps_move_only_d_skip(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    run_cli("run", cfg, *sets(train__ff="true", train__bp_cadence=5, train__ff_lr=0.1, model__init="reference"),
            check=True)
    t2, _ = ckpt(tmp_path / "run")
    p1 = tmp_path / "p1"
    p1.mkdir()
    run_cli("run", tiny_config(p1, steps=2), *sets(train__ff="true", train__bp_cadence=5, train__ff_lr=0.0,
                                                   model__init="reference"), check=True)
    t0, _ = ckpt(p1 / "run")   # ff_lr = 0: the initial parameters
    for k in t2:
        if k.endswith("D_skip") and k.startswith("param/"):
            assert not np.array_equal(t2[k], t0[k]), k
        else:
            assert np.array_equal(t2[k], t0[k]), k   # no Adam update, no moments, nothing else


def test_expand_from_checkpoint_with_frozen_layers(tmp_path, base_run):
    cfg = tiny_config(tmp_path, steps=15)
    run_cli("run", cfg, *sets(model__init_from=f'"{base_run}"', model__target_layers=6,
                              model__placement="specific:1,3,4,5", train__freeze="first:2"), check=True)
    base, _ = ckpt(base_run)
    t, state = ckpt(tmp_path / "run")
    assert state["staged"]["layout"] == [0, None, 1, None, None, None]
    assert state["staged"]["frozen_layers"] == [0, 1]
    # frozen: base layer 0 and new layer 1, parameters and moments bitwise unchanged
    fresh = {f"layers.1.{n}": np.zeros_like(t[f"param/layers.1.{n}"]) for n in
             ("conv_w", "conv_b", "x_proj_w", "dt_proj_w", "dt_proj_b", "A_log", "D_skip", "out_proj_w")}
    init_layer(fresh, 1, np.random.default_rng([7, 7, 1]), "mamba", 6)
    for k, v in t.items():
        kind, name = k.split("/", 1)
        if name.startswith("layers.0."):
            assert np.array_equal(v, base[k]), k
        elif name.startswith("layers.1."):
            if kind == "param" and name.endswith(("conv_w", "conv_b")):
                # calibrated to the input scale (Staged.calibrate_new_layers): fresh * one factor
                nz = fresh[name] != 0
                assert np.array_equal(v == 0, ~nz), k
                if nz.any():
                    ratio = v[nz] / fresh[name][nz]
                    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
            elif kind == "param":
                expect = 0.0 if name.endswith("out_proj_w") else fresh[name]
                assert np.array_equal(v, np.broadcast_to(expect, v.shape)), k
            else:
                assert not np.any(v), k
        elif name.startswith("layers.2."):   # base layer 1, trained on
            assert not np.array_equal(v, base[k.replace("layers.2.", "layers.1.")]), k
        elif name.startswith(("layers.3.", "layers.4.", "layers.5.")) and kind == "param":
            assert np.any(v), k
            if name.endswith("out_proj_w"):
                assert np.abs(v).max() > 0, k     # the identity block started to learn
    assert not np.array_equal(t["param/embedding"], base["param/embedding"])
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [r["val_loss"] for r in recs if r["kind"] == "val"]
    assert val[-1] < val[0]


def test_freeze_embedding(tmp_path):
    cfg = tiny_config(tmp_path, steps=6)
    run_cli("run", cfg, *sets(train__freeze_embedding="true", train__freeze="indices:1"), check=True)
    p0 = tmp_path / "p0"
    p0.mkdir()
    # the same run with lr ~ 0 would still decay; compare with the initial state instead
    run_cli("run", tiny_config(p0, steps=1), *sets(train__freeze_embedding="true", train__freeze="indices:0,1",
                                                   optim__weight_decay=0.0), check=True)
    t, _ = ckpt(tmp_path / "run")
    t0, _ = ckpt(p0 / "run")
    for k in t:
        if "embedding" in k or "layers.1." in k:
            assert np.array_equal(t[k], t0[k]), k
        elif k.startswith("param/layers.0."):
            assert not np.array_equal(t[k], t0[k]), k


def _straight_and_killed(tmp_path, extra, kill_at):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a, cfg_b = tiny_config(a, steps=16), tiny_config(b, steps=16)
    run_cli("run", cfg_a, *extra, check=True)
    p = run_cli("run", cfg_b, *extra, env_extra={"RTRAINER_FAULT": f"after_step={kill_at}:KILL"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    p = run_cli("run", cfg_b, *extra, "--resume", "auto", check=True)
    assert "resuming at step 10" in p.stderr
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    rb = strip_timing(read_metrics(b / "run" / "metrics.jsonl"))
    assert ra == rb
    ta, sa = ckpt(a / "run")
    tb, sb = ckpt(b / "run")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k
    assert sa["staged"] == sb["staged"]
    return ra


def test_staged_run_resumes_bitwise_after_sigkill(tmp_path, base_run):
    extra = sets(model__init_from=f'"{base_run}"', model__target_layers=4, model__placement="insert:1",
                 train__freeze="first:1", train__ff="true", train__bp_cadence=3, train__surgery="gradnorm",
                 train__ff_lr=0.01)
    recs = _straight_and_killed(tmp_path, extra, 13)   # checkpoint at 10, killed after 13
    assert [r["step"] for r in recs if r["kind"] == "train" and r["bp_applied"]] == [3, 6, 9, 12, 15]


@pytest.mark.parametrize("args, msg", [
    (sets(model__target_layers=6, model__placement="specific:1,3,4"),
     "model.placement = 'specific:1,3,4' lists 3 new layer positions, but target_layers - base_layers = 6 - 2 = 4"),
    (sets(model__target_layers=6, model__placement="specific:1,3,4,9"), "position 9 is out of range [0, 6)"),
    (sets(model__target_layers=6, model__placement="middle"), "model.placement must be append | prepend"),
    (sets(train__freeze="first:3"), "train.freeze = 'first:3': the model has only 2 layers"),
    (sets(train__freeze="last:1"), "train.freeze must be none | first:N | indices:i,j,..."),
    (sets(train__bp_cadence=4), "train.bp_cadence = 4 needs train.ff = true"),
    (sets(train__surgery="cagradstep"), "train.surgery must be one of"),
    (sets(train__ff="true", train__freeze="first:2"), "freezes every layer"),
    (sets(model__target_layers=1), "model.target_layers = 1 is smaller than model.base_layers = 2"),
    (sets(model__init_from='"/nonexistent/x.safetensors"'), "/nonexistent/x.safetensors"),
])
def test_invalid_options_exit_2(tmp_path, args, msg):
    p = run_cli("run", tiny_config(tmp_path), *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert msg in p.stderr and p.stderr.startswith("rtrainer: error:"), p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_init_from_with_wrong_layer_count(tmp_path, base_run):
    p = run_cli("run", tiny_config(tmp_path), *sets(model__init_from=f'"{base_run}"', model__base_layers=3,
                                                    model__target_layers=4))
    assert p.returncode == 2, p.stderr
    assert "holds a 2-layer model but model.base_layers = 3" in p.stderr


def test_resume_refuses_another_freeze(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    run_cli("run", cfg, *sets(train__freeze="first:1"), check=True)
    p = run_cli("run", cfg, "--resume", "auto", *sets(train__freeze="none", train__steps=8))
    assert p.returncode == 2 and "frozen_layers is [0] in the checkpoint but [] in this run" in p.stderr, p.stderr


def test_fresh_expansion_starts_from_the_fresh_base_model(tmp_path):
    """Without init_from, the base layers are initialised exactly as a base_layers run's."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    frozen = sets(train__freeze="first:2", train__freeze_embedding="true")
    run_cli("run", tiny_config(a, steps=1), *frozen, check=True)
    run_cli("run", tiny_config(b, steps=1), *frozen, *sets(model__target_layers=4, model__placement="prepend"),
            check=True)
    ta, _ = ckpt(a / "run")
    tb, sb = ckpt(b / "run")
    assert sb["staged"]["layout"] == [None, None, 0, 1]
    # prepend + first:2 froze the two NEW layers; compare the base layers (now 2, 3) before training
    run_cli("run", tiny_config(b, steps=1), *sets(model__target_layers=4, model__placement="prepend",
                                                  train__freeze="indices:2,3", train__freeze_embedding="true",
                                                  run__out_dir=f'"{b / "run2"}"'), check=True)
    tc, _ = ckpt(b / "run2")
    for k in ta:
        kind, name = k.split("/", 1)
        if kind == "param" and (name.startswith("layers.") or name == "embedding"):
            j = name.split(".")[1] if name.startswith("layers.") else None
            kb = k if j is None else k.replace(f"layers.{j}.", f"layers.{int(j) + 2}.")
            assert np.array_equal(ta[k], tc[kb]), k


def test_missing_init_from_is_an_error_but_a_resumed_run_no_longer_needs_it(tmp_path, base_run):
    import shutil

    p = run_cli("run", tiny_config(tmp_path), *sets(model__init_from=f'"{tmp_path / "nowhere"}"', model__target_layers=3))
    assert p.returncode == 2 and "model.init_from" in p.stderr and "no such checkpoint" in p.stderr, p.stderr
    base = tmp_path / "base_copy"
    shutil.copytree(base_run, base)
    cfg = tiny_config(tmp_path, steps=6)
    grow = sets(model__init_from=f'"{base}"', model__target_layers=3)
    run_cli("run", cfg, *grow, "--overwrite", check=True)
    shutil.rmtree(base)                       # the base run is gone: resuming must not need it
    p = run_cli("run", cfg, *grow, "--resume", "auto", *sets(train__steps=8))
    assert p.returncode == 0 and "resuming at step 6" in p.stderr, p.stderr
