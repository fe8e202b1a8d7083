"""Checkpoints written by an earlier rtrainer still resume, and the resumed run continues exactly
as the code that wrote them continued it: the same metrics lines and, at step 8, the same
parameters and AdamW moments bit for bit (tests/fixtures/make_compat_checkpoints.py made them)."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import read_metrics, run_cli, strip_timing

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = sorted(p.name for p in FIXTURES.glob("compat-*") if p.is_dir())


def _hash(step_dir: Path) -> str:
    from safetensors.numpy import load_file

    t = load_file(str(step_dir / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(t[k].tobytes())
    return h.hexdigest()


def test_there_are_fixtures():
    assert {"compat-lite-plain", "compat-mamba-frozen", "compat-lite-staged"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_resumes_bitwise(tmp_path, case):
    src = FIXTURES / case
    expected = json.loads((src / "expected.json").read_text())
    ckpt = tmp_path / "step-4"
    shutil.copytree(src / "step-4", ckpt)     # never write next to the committed fixture
    run = tmp_path / "run"
    run_cli("run", src / "run.toml", "--set", f'run.out_dir="{run}"', "--resume", ckpt, "--headless", check=True)
    got = [r for r in strip_timing(read_metrics(run / "metrics.jsonl")) if r["step"] > 4]
    assert got == expected["records"]
    step8 = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert step8.name.endswith("8") and _hash(step8) == expected["step8_sha256"]
