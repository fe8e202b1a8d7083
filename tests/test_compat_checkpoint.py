"""Checkpoints written by an earlier rtrainer still resume, and the resumed run continues as the
code that wrote them continued it (tests/fixtures/make_compat_checkpoints.py made them).

The kernels are built with -march=native, so a float32 sum rounds differently on a CPU with other
vector units (AVX2 vs AVX-512) than the one that wrote the fixtures. Where the continuation matches
the recorded one bit for bit (the same kind of CPU), the step-8 parameters and AdamW moments must
match the recorded hash too; elsewhere the metrics must agree to float32 rounding, and the resume
itself must still be exact on this machine: stopping at step 6 and resuming gives, at step 8, the
same bits as resuming straight through."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import read_metrics, records_close, run_cli, strip_timing

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


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def _resume(src: Path, ckpt: Path, run: Path, *extra):
    run_cli("run", src / "run.toml", "--set", f'run.out_dir="{run}"', "--resume", ckpt, "--headless",
            *extra, check=True)
    return [r for r in strip_timing(read_metrics(run / "metrics.jsonl")) if r["step"] > 4]


def test_there_are_fixtures():
    assert {"compat-lite-plain", "compat-mamba-frozen", "compat-lite-staged"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_resumes(tmp_path, case):
    src = FIXTURES / case
    expected = json.loads((src / "expected.json").read_text())
    ckpt = tmp_path / "step-4"
    shutil.copytree(src / "step-4", ckpt)     # never write next to the committed fixture
    run = tmp_path / "run"
    got = _resume(src, ckpt, run)
    step8 = _newest(run)
    assert step8.name.endswith("8")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in expected["records"]]
    if got == expected["records"]:            # the fixture's kind of CPU: exact, moments included
        assert _hash(step8) == expected["step8_sha256"]
        return
    bad = records_close(got, expected["records"])
    assert bad is None, f"differs from the recorded continuation by more than float32 rounding: {bad}"
    # on this machine the old checkpoint's resume is exact: a pause at 6 and a second resume
    # lands on the same bits at step 8 as the straight run
    ckpt2 = tmp_path / "again" / "step-4"
    shutil.copytree(src / "step-4", ckpt2)
    run2 = tmp_path / "run2"
    _resume(src, ckpt2, run2, "--stop-at", "6")
    assert _newest(run2).name.endswith("6")
    _resume(src, "auto", run2)
    assert _newest(run2).name.endswith("8") and _hash(_newest(run2)) == _hash(step8)
