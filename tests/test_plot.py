"""`rtrainer plot` renders real runs; a run directory without metrics is an error."""
import numpy as np

from conftest import run_cli, tiny_config


def _runs(tmp_path):
    dirs = []
    for name, lr in (("a", "1e-2"), ("b", "3e-3")):
        d = tmp_path / name
        d.mkdir()
        cfg = tiny_config(d, steps=12)
        cfg.write_text(cfg.read_text().replace("lr = 1e-2", f"lr = {lr}"))
        run_cli("run", cfg, "--headless", check=True)
        dirs.append(d / "run")
    return dirs


def test_plot_real_runs(tmp_path):
    import matplotlib.image as mpimg

    a, b = _runs(tmp_path)
    p = run_cli("plot", a, check=True)
    assert p.stdout.strip() == str(a / "plot.png")
    one = mpimg.imread(a / "plot.png")
    assert one.shape[:2] == (800, 1200) and one[..., :3].std() > 0.01   # a drawn picture, not a blank one
    out = tmp_path / "both.png"
    run_cli("plot", a, b, "-o", out, check=True)
    two = mpimg.imread(out)
    assert two.shape == one.shape and not np.array_equal(one, two)   # the second run is drawn over the first
    run_cli("plot", a, b, "-o", tmp_path / "both.svg", check=True)
    assert (tmp_path / "both.svg").read_text().lstrip().startswith("<?xml")


def test_plot_errors_write_nothing(tmp_path):
    a, _ = _runs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n')
    out = tmp_path / "x.png"
    cases = [
        ((empty,), 3, "no metrics.jsonl"),
        ((a, empty), 3, "no metrics.jsonl"),
        ((tmp_path / "missing",), 3, "not a run directory"),
        ((tmp_path / "blank",), 3, "no train or validation records"),
        ((tmp_path / "junk",), 3, "metrics.jsonl:2: not a JSON line"),
    ]
    for args, code, msg in cases:
        p = run_cli("plot", *args, "-o", out)
        assert p.returncode == code and msg in p.stderr, (args, p.stderr)
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("rtrainer: error:")
        assert not out.exists()
    p = run_cli("plot", a, "-o", tmp_path / "x.txt")
    assert p.returncode == 2 and ".png" in p.stderr and not (tmp_path / "x.txt").exists()
    p = run_cli("plot", a, "-o", tmp_path / "nodir" / "x.png")
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = run_cli("plot")
    assert p.returncode == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "b", "blank", "empty", "junk"]
