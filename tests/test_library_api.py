"""The public library API: examples/library.py runs as a real process, and its pieces behave as documented."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rtrainer
from rtrainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

SMALL = {"model": {"d_model": 16, "d_state": 4, "base_layers": 1, "target_layers": 1, "vocab_size": 12},
         "head": {"kind": "softmax"}}


def test_example_runs(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "library.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    m = re.search(r"val loss ([0-9.]+) -> ([0-9.]+)", p.stdout)
    assert m, p.stdout
    assert float(m.group(2)) < float(m.group(1)) - 0.1, p.stdout    # it learned
    assert (tmp_path / "model.safetensors").is_file()
    m = re.search(r"optimizer updates (\d+)", p.stdout)
    assert m and int(m.group(1)) == 61, p.stdout                      # 60 saved + 1 after loading


def test_build_from_dict_validates():
    with pytest.raises(ConfigError, match="d_modle"):
        rtrainer.Net.build({"model": {"d_modle": 8, "vocab_size": 12}})
    with pytest.raises(ConfigError, match="vocab_size"):
        rtrainer.Net.build({"model": {"d_model": 8}})
    net = rtrainer.Net.build(SMALL)
    assert net.model.V == 12 and net.cfg.model.d_model == 16


def test_save_load_round_trip(tmp_path):
    net = rtrainer.Net.build(SMALL)
    net.init(3, "mamba")
    opt = net.build_optimizer()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 12, size=(2, 8)).astype(np.int64)
    targets = np.roll(ids, -1, axis=1)
    for i in range(3):
        r = rtrainer.train_step(net, opt, ids, targets, lr=1e-2, step=i)
        assert r.finite
    path = rtrainer.save(net, tmp_path / "m.safetensors", opt, step=3)
    back = rtrainer.load(path)
    for name, v in net.tensors().items():
        np.testing.assert_array_equal(back.tensors()[name], v, err_msg=name)
    assert back.state["step"] == 3 and back.build_optimizer().state() == {"updates": 3}
    # one more step from the loaded net equals one more step from the original, bitwise
    opt_b = back.build_optimizer()
    rtrainer.train_step(net, opt, ids, targets, lr=1e-2, step=3)
    rtrainer.train_step(back, opt_b, ids, targets, lr=1e-2, step=3)
    for name, v in net.tensors().items():
        np.testing.assert_array_equal(back.tensors()[name], v, err_msg=name)


def test_import_rtrainer_stays_cheap():
    code = "import sys, rtrainer; rtrainer.Net; print(any(m.startswith('rtrainer._kernels') for m in sys.modules))"
    lazy = subprocess.run([sys.executable, "-c", "import sys, rtrainer; "
                           "print(any(m.startswith('rtrainer._kernels') for m in sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    assert lazy.returncode == 0 and lazy.stdout.strip() == "False", lazy.stderr
    used = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert used.returncode == 0 and used.stdout.strip() == "True", used.stderr
