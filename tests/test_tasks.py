"""Synthetic tasks (rtrainer/tasks.py): exact layouts, the cursor, the fixed evaluation sets, the
answer-only loss and accuracy, bitwise resume of a task run, config errors, and a fast check that a
tiny model learns selective copying well above chance."""
import json

import numpy as np
import pytest

from rtrainer import Trainer, tasks
from rtrainer.config import load_config
from rtrainer.errors import ConfigError, DataError
from rtrainer.testing.reference import hpn_forward_ref, softmax_xent_ref
from conftest import checkpoint_tensors, latest_checkpoint, read_metrics, run_cli, strip_timing


# ----------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("B,T,M,A", [(64, 64, 8, 16), (16, 9, 4, 16), (8, 30, 1, 3), (4, 40, 10, 5)])
def test_selective_copying_layout(B, T, M, A):
    ids, targets = tasks.selective_copying(np.random.default_rng(0), B, T, M, A)
    assert ids.shape == targets.shape == (B, T) and ids.dtype == targets.dtype == np.int64
    assert ids.flags.c_contiguous and targets.flags.c_contiguous
    L = T - 2 * M
    for b in range(B):
        head = ids[b, :L + M]
        pos = np.flatnonzero(head)                        # the data tokens, noise = 0
        assert len(pos) == M
        assert np.all((head[pos] >= 1) & (head[pos] <= A - 2))
        assert np.all(ids[b, L + M:] == A - 1)            # M markers
        assert np.all(targets[b, :L + M] == -1)
        assert np.array_equal(targets[b, L + M:], head[pos])   # answers in order, at the markers
    # positions are spread over all of the first L+M slots, and data tokens over all of 1..A-2
    if B * M >= 4 * (L + M):
        assert len(np.unique(np.nonzero(ids[:, :L + M])[1])) == L + M
        assert set(np.unique(ids[:, :L + M][ids[:, :L + M] > 0])) == set(range(1, A - 1))


@pytest.mark.parametrize("B,T,V", [(64, 64, 16), (16, 3, 16), (8, 256, 3), (32, 10, 40)])
def test_induction_heads_layout(B, T, V):
    ids, targets = tasks.induction_heads(np.random.default_rng(1), B, T, V)
    assert ids.shape == targets.shape == (B, T) and ids.dtype == targets.dtype == np.int64
    S = V - 1
    ps = []
    for b in range(B):
        s_pos = np.flatnonzero(ids[b] == S)
        assert len(s_pos) == 2 and s_pos[1] == T - 1 and s_pos[0] <= T - 3
        p = s_pos[0]
        ps.append(p)
        assert np.all((ids[b] >= 0) & (ids[b] <= V - 1))
        assert targets[b, T - 1] == ids[b, p + 1] and ids[b, p + 1] != S
        assert np.all(targets[b, :T - 1] == -1)
    if B >= 4 * (T - 2):
        assert set(ps) == set(range(T - 2))               # p covers [0, T-3]


# ----------------------------------------------------------------------------------- the streams

@pytest.mark.parametrize("task", ["selective_copying", "induction_heads"])
def test_stream_cursor_restores_exactly(task):
    a = tasks.TaskStream(task, 4, 20, seed=3, task_tokens=3, task_vocab=10)
    for _ in range(5):
        a.next_batch()
    st = json.loads(json.dumps(a.state()))                # JSON round trip, as in the checkpoint header
    want = [a.next_batch() for _ in range(4)]
    b = tasks.TaskStream(task, 4, 20, seed=99, task_tokens=3, task_vocab=10)
    b.set_state(st)
    got = [b.next_batch() for _ in range(4)]
    for (i1, t1), (i2, t2) in zip(want, got):
        assert np.array_equal(i1, i2) and np.array_equal(t1, t2)
    assert b.batches == a.batches == 9
    c = tasks.TaskStream(task, 4, 20, seed=3, task_tokens=3, task_vocab=10)
    assert not np.array_equal(c.next_batch()[0], tasks.TaskStream(task, 4, 20, seed=4, task_tokens=3,
                                                                   task_vocab=10).next_batch()[0])


def test_stream_state_mismatch_is_a_data_error():
    a = tasks.TaskStream("selective_copying", 4, 20, seed=3, task_tokens=3)
    st = a.state()
    b = tasks.TaskStream("selective_copying", 4, 22, seed=3, task_tokens=3)
    with pytest.raises(DataError, match="seq_len = 20"):
        b.set_state(st)
    with pytest.raises(DataError, match="'rng' is not a PCG64 state"):
        a.set_state({**st, "rng": {"state": "x"}})
    with pytest.raises(DataError, match="'batches' must be a non-negative integer"):
        a.set_state({**st, "batches": -1})


def test_eval_set_is_fixed_and_independent_of_training():
    ev = tasks.TaskEval("induction_heads", 4, 16, 3, seed=5)
    first = list(ev.batches())
    for (i1, t1), (i2, t2) in zip(first, ev.batches()):
        assert np.array_equal(i1, i2) and np.array_equal(t1, t2)
    assert len(first) == 3
    tr = tasks.TaskStream("induction_heads", 4, 16, seed=5)
    assert not np.array_equal(tr.next_batch()[0], first[0][0])
    longer = next(tasks.TaskEval("induction_heads", 4, 64, 1, seed=5).batches())[0]
    assert longer.shape == (4, 64)


# ------------------------------------------------------------------------------------------ config

def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,needle", [
    ('[data]\ntask = "copying"\n', "data.task must be one of"),
    ('[data]\ntask = "selective_copying"\ntrain = "x.txt"\n', "leave data.train and data.val empty"),
    ('[data]\ntask = "selective_copying"\ntask_tokens = 40\n[train]\nseq_len = 64\n',
     "selective_copying needs seq_len >= 2·data.task_tokens + 1"),
    ('[data]\ntask = "induction_heads"\n[train]\nseq_len = 2\n', "induction_heads needs seq_len >= 3"),
    ('[data]\ntask = "induction_heads"\ntask_vocab = 2\n', "data.task_vocab must be >= 3"),
    ('[data]\ntask = "induction_heads"\ntask_tokens = 0\n', "data.task_tokens must be >= 1"),
    ('[data]\ntask = "induction_heads"\n[model]\nvocab_size = 8\n', "model.vocab_size = 8 is smaller than data.task_vocab = 16"),
    ('[data]\ntask = "induction_heads"\n[eval]\nextra_lengths = [256, 0]\n', "eval.extra_lengths[1] must be >= 1"),
    ('[data]\ntask = "induction_heads"\n[eval]\nextra_lengths = 256\n', "eval.extra_lengths must be a list of integers"),
    ('[data]\ntask = "induction_heads"\n[eval]\nextra_lengths = [2.5]\n', "eval.extra_lengths[0] must be an integer"),
])
def test_bad_task_keys_are_config_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_task_config_needs_no_data_file(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\ntask = "induction_heads"\n[eval]\nextra_lengths = [256, 1024]\n'))
    assert cfg.data.task == "induction_heads" and cfg.eval.extra_lengths == (256, 1024)


# ------------------------------------------------------------------------------------ runs on tasks

def task_config(tmp_path, task="selective_copying", steps=20, head="hpn", extra_lengths=()):
    text = f"""
[run]
out_dir = "{tmp_path / 'run'}"
seed = 3
threads = 1
[model]
d_model = 16
d_state = 4
base_layers = 2
target_layers = 2
scan_chunk = 8
[head]
kind = "{head}"
[optim]
lr = 1e-2
grad_clip = 1.0
[train]
steps = {steps}
batch_size = 4
seq_len = 16
[data]
task = "{task}"
task_tokens = 4
[eval]
val_every = 10
eval_batches = 2
extra_lengths = {list(extra_lengths)}
[checkpoint]
save_every = 5
[log]
log_every = 1
"""
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("head", ["hpn", "softmax"])
@pytest.mark.parametrize("task", ["selective_copying", "induction_heads"])
def test_evaluate_scores_only_the_answer_positions(tmp_path, head, task):
    tr = Trainer(load_config(str(task_config(tmp_path, task, steps=3, head=head, extra_lengths=[40]))),
                 console=False)
    tr.fit()
    r = tr.evaluate()
    for L, source in ((None, tr.data.val), (40, tasks.TaskEval(task, 4, 40, 2, 3, task_tokens=4))):
        n_tok = loss_sum = correct = 0
        for ids, targets in source.batches():
            z = tr.model.forward(ids).astype(np.float64)
            t = targets.reshape(-1)
            keep = t != -1
            if head == "hpn":
                P = tr.flat.params["head.prototypes"].astype(np.float64)
                loss = hpn_forward_ref(np.empty(keep.sum()), z[keep], P, t[keep], True, 1)
                Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
                pred = np.argmax(z[keep] @ Pn.T, axis=1)
            else:
                x = z[keep] @ tr.flat.params["head.W"].T.astype(np.float64) + tr.flat.params["head.b"]
                pred = np.argmax(x, axis=1)
                loss = softmax_xent_ref(x.copy(), t[keep], 1.0, 1)
            loss_sum += loss * keep.sum()
            correct += int((pred == t[keep]).sum())
            n_tok += int(keep.sum())
        assert n_tok == 2 * 4 * (4 if task == "selective_copying" else 1)
        sfx = "" if L is None else f"@{L}"
        assert r["val_loss" + sfx] == pytest.approx(loss_sum / n_tok, rel=1e-5)
        assert r["val_acc" + sfx] == correct / n_tok
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [x["step"] for x in recs if x["kind"] == "val"] == [3]


def test_extra_lengths_add_metrics_keys(tmp_path):
    cfg = task_config(tmp_path, "induction_heads", steps=10, extra_lengths=[64, 40])
    run_cli("run", cfg, check=True)
    val = [x for x in read_metrics(tmp_path / "run" / "metrics.jsonl") if x["kind"] == "val"]
    assert [x["step"] for x in val] == [10]
    for k in ("val_loss", "val_acc", "val_loss@40", "val_acc@40", "val_loss@64", "val_acc@64", "best_val_loss"):
        assert isinstance(val[0][k], float), k
    assert 0.0 <= val[0]["val_acc@64"] <= 1.0


@pytest.mark.parametrize("task", ["selective_copying", "induction_heads"])
def test_resume_of_a_task_run_is_bitwise(tmp_path, task):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg_a, cfg_b = task_config(a, task, steps=20), task_config(b, task, steps=20)
    run_cli("run", cfg_a, check=True)
    p = run_cli("run", cfg_b, env_extra={"RTRAINER_FAULT": "after_step=13:KILL"})
    assert p.returncode != 0
    p = run_cli("run", cfg_b, "--resume", "auto", check=True)
    assert "resuming at step 10" in p.stderr
    ra = strip_timing(read_metrics(a / "run" / "metrics.jsonl"))
    rb = strip_timing(read_metrics(b / "run" / "metrics.jsonl"))
    assert ra == rb and len(ra) == 22
    ta = checkpoint_tensors(latest_checkpoint(a / "run"))
    tb = checkpoint_tensors(latest_checkpoint(b / "run"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k


def test_a_tiny_model_learns_selective_copying(tmp_path):
    """Regression guard for learning itself (seconds): 14 data tokens, chance is 1/14 = 7%."""
    cfg = task_config(tmp_path, steps=300)
    text = (cfg.read_text().replace("d_model = 16", "d_model = 32").replace("d_state = 4", "d_state = 8")
            .replace("batch_size = 4", "batch_size = 16").replace("val_every = 10", "val_every = 300")
            .replace("eval_batches = 2", "eval_batches = 4").replace("save_every = 5", "save_every = 0")
            .replace("log_every = 1", "log_every = 100"))
    cfg.write_text(text)
    s = Trainer(load_config(str(cfg)), console=False).fit()
    assert s["last_val"]["val_acc"] > 0.35, s["last_val"]
