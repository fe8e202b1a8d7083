"""The live progress bar (on a real pseudo-terminal), the plain lines off a terminal, and the
closing message of a run."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from conftest import REPO, run_cli, tiny_config
from rtrainer.progress import Progress, closing_message, follow_up_commands

STEP = re.compile(r"^step +\d+/\d+  loss \d+\.\d{5}  lr \d\.\d{3}e[-+]\d\d  grad_norm \d+\.\d{4}  [\d,]+ tok/s  "
                  r"rss \d+ MB$")
VAL = re.compile(r"^step +\d+  val_loss \d+\.\d{5}  val_acc \d\.\d{4}  best \d+\.\d{5}$")


def run_on_pty(*args, cols=140):
    """Run `python -m rtrainer ARGS` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "rtrainer", *map(str, args)], stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave, cwd=REPO, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 65536)
        except OSError:   # EIO: the child closed the terminal
            break
        if not b:
            break
        chunks.append(b)
    os.close(master)
    return p.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


def test_bar_on_a_terminal(tmp_path):
    cfg = tiny_config(tmp_path, steps=12, extra="")
    cfg.write_text(cfg.read_text().replace("log_every = 1", "log_every = 4"))
    code, out = run_on_pty("run", cfg)
    assert code == 0, out
    assert re.search(r"train +\d+%\|.*\| *\d+/12 \[\d\d:\d\d<\d\d:\d\d, loss \d\.\d{4}.*tok/s\]", out), out
    assert "tok/s" in out and re.search(r"loss \d\.\d{4}", out) and re.search(r"val \d\.\d{4} acc", out), out
    assert "\r" in out     # redrawn in place
    # the log lines are still printed, whole, above the bar
    lines = [ln.split("\r")[-1] for ln in out.replace("\r\n", "\n").split("\n")]
    assert sum(bool(STEP.match(ln)) for ln in lines) == 3, out
    assert sum(bool(VAL.match(ln)) for ln in lines) == 2, out
    assert "rtrainer: run finished at step 12/12" in out


def test_plain_lines_off_a_terminal(tmp_path):
    cfg = tiny_config(tmp_path, steps=12)
    p = run_cli("run", cfg, check=True)
    assert "\r" not in p.stdout + p.stderr and "%|" not in p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 12 + 2 and all(STEP.match(ln) or VAL.match(ln) for ln in lines), p.stdout
    assert [ln.split("/")[0] for ln in lines if STEP.match(ln)] == [f"step {i:>6}" for i in range(1, 13)]
    err = p.stderr.splitlines()
    assert err[0].startswith("rtrainer: starting:") and all(ln.startswith("rtrainer: ") for ln in err)
    # --headless: nothing at all
    p = run_cli("run", cfg, "--overwrite", "--headless", check=True)
    assert p.stdout == "" and p.stderr == ""


def test_closing_message_says_where_the_model_is_and_what_next(tmp_path):
    cfg = tiny_config(tmp_path, steps=12)
    p = run_cli("run", cfg, "--stop-at", "5", check=True)
    run = tmp_path / "run"
    tail = p.stderr.splitlines()
    i = next(k for k, ln in enumerate(tail) if ln.startswith("rtrainer: run paused at step 5/12"))
    msg = "\n".join(tail[i:])
    assert f"{run}/checkpoints/step-00000005 (latest)" in msg
    assert f"resume:   rtrainer run {run}/config.toml --resume auto" in msg
    # generate and export are named only where this installation has those commands
    have = follow_up_commands()
    assert (f"generate: rtrainer generate {run}" in msg) == ("generate" in have)
    assert (f"export:   rtrainer export {run} {run}/export" in msg) == ("export" in have)
    assert "last val_loss" in msg    # the closing validation of the pause
    p = run_cli("run", cfg, "--resume", "auto", check=True)
    assert "rtrainer: run finished at step 12/12 (stop_reason completed)" in p.stderr
    assert f"{run}/checkpoints/step-00000012 (best and latest)" in p.stderr
    assert "--set train.steps=24" in p.stderr
    # the message resumes for real
    cmd = next(ln for ln in p.stderr.splitlines() if "continue:" in ln).split("continue: rtrainer ")[1]
    q = run_cli(*cmd.split(), check=True)
    assert "run finished at step 24/24" in q.stderr


def test_closing_message_without_checkpoint_or_validation():
    msg = closing_message({"final_step": 0, "stop_reason": "non_finite", "best_val_loss": None, "last_val": None},
                          {"out_dir": "/r", "config": "/r/config.toml", "latest": None, "best": None}, total=10)
    assert msg.splitlines() == ["rtrainer: run stopped on a non-finite loss or gradient at step 0/10 "
                                "(stop_reason non_finite)",
                                "rtrainer: no validation (eval.val_every = 0 or no validation data)",
                                "rtrainer: model: no checkpoint was written"]


def test_closing_message_names_the_follow_up_commands_it_is_given():
    summary = {"final_step": 10, "stop_reason": "completed", "best_val_loss": 1.25, "last_val": {"val_loss": 1.5}}
    paths = {"out_dir": "/r", "config": "/r/config.toml", "latest": "/r/checkpoints/step-00000010",
             "best": "/r/checkpoints/step-00000008"}
    lines = closing_message(summary, paths, total=10, commands=("generate", "export")).splitlines()
    assert lines == ["rtrainer: run finished at step 10/10 (stop_reason completed)",
                     "rtrainer: best val_loss 1.25000 at step-00000008; last val_loss 1.50000 val_acc n/a",
                     "rtrainer: model: /r/checkpoints/step-00000008 (best), /r/checkpoints/step-00000010 (latest)",
                     "rtrainer: continue: rtrainer run /r/config.toml --resume auto --set train.steps=20",
                     "rtrainer: generate: rtrainer generate /r --prompt 'Once upon a time'",
                     "rtrainer: export:   rtrainer export /r /r/export"]
    assert closing_message(summary, paths, total=10, commands=()).splitlines() == lines[:4]


def test_disabled_progress_is_plain_print(capsys):
    bar = Progress(10, 0, enabled=False, tokens_per_step=8)
    bar.update(1, 2.0)
    bar.validation(1.5, 0.25)
    bar.write("step 1")
    bar.write("rtrainer: x", sys.stderr)
    bar.close()
    out = capsys.readouterr()
    assert out.out == "step 1\n" and out.err == "rtrainer: x\n"


def test_tokenize_bar_on_a_terminal(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some words here\n\nand more words\n" * 2000)
    code, out = run_on_pty("tokenize", f, "--out", tmp_path / "o", "--bytes", "--doc-separator", r"\n\n")
    assert code == 0, out
    assert re.search(r"(checking|encoding): +\d+%\|", out), out
    code, out = run_on_pty("tokenize", f, "--out", tmp_path / "q", "--bytes", "--quiet", "--doc-separator", r"\n\n")
    assert code == 0 and "%|" not in out and "[data]" in out, out
