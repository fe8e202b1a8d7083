"""`rtrainer parity`: the save/load/resume probe passes on a correct trainer and names the first
difference when resume is broken."""
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from rtrainer import stream as stream_mod
from rtrainer.probe import ParityMismatch, config_for_probe, first_tensor_difference, run_parity


def test_parity_command_passes_and_leaves_the_run_directory_alone(tmp_path):
    cfg = tiny_config(tmp_path, steps=200)
    p = run_cli("parity", cfg, "--steps", "16", check=True)
    assert "parity: OK" in p.stdout
    assert "straight == resumed, bitwise" in p.stdout and "round trip" in p.stdout
    assert not (tmp_path / "run").exists()


def test_parity_detects_a_resume_that_forgets_the_data_cursor(tmp_path, monkeypatch):
    cfg = config_for_probe(str(tiny_config(tmp_path, steps=16)), [])
    monkeypatch.setattr(stream_mod.TokenStream, "set_state", lambda self, d: None)
    with pytest.raises(ParityMismatch, match="straight vs resumed at step 16: tensor "):
        run_parity(cfg, steps=16, workdir=str(tmp_path), say=lambda *_: None)


def test_parity_detects_a_resume_that_restarts_adam_bias_correction(tmp_path, monkeypatch):
    import dataclasses

    from rtrainer import trainer as trainer_mod

    cfg = config_for_probe(str(tiny_config(tmp_path, steps=16)), [])
    real = trainer_mod.Trainer._load_resume_state

    def forgetful(self):
        state = real(self)
        if state is not None:
            state = dataclasses.replace(state, optimizer_updates=0)   # a runstate.RunState
        return state

    monkeypatch.setattr(trainer_mod.Trainer, "_load_resume_state", forgetful)
    with pytest.raises(ParityMismatch, match="straight vs resumed"):
        run_parity(cfg, steps=16, workdir=str(tmp_path), say=lambda *_: None)


def test_parity_command_usage_error(tmp_path):
    cfg = tiny_config(tmp_path, steps=10)
    p = run_cli("parity", cfg, "--steps", "1")
    assert p.returncode == 2 and "rtrainer: error: --steps: the parity probe needs at least 2" in p.stderr, p.stderr


def test_first_tensor_difference_is_bitwise():
    a = {"w": np.array([[1.0, 2.0], [3.0, np.nan]], np.float32)}
    assert first_tensor_difference(a, {"w": a["w"].copy()}) is None          # NaN == NaN bitwise
    b = {"w": a["w"].copy()}
    b["w"][1, 0] = np.nextafter(np.float32(3.0), np.float32(4.0))
    d = first_tensor_difference(a, b)
    assert d.startswith("tensor w[1, 0]: ") and "1 of 4 elements differ" in d
    z = {"w": a["w"].copy()}
    z["w"][0, 0] = 0.0
    zz = {"w": a["w"].copy()}
    zz["w"][0, 0] = -0.0
    assert first_tensor_difference(z, zz) is not None                      # -0.0 is not 0.0 bitwise
    assert "exists only in B" in first_tensor_difference({}, {"x": np.zeros(1)})
