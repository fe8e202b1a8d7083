"""`rtrainer tokenize`: throughput (MB/s of text, tokens/s) and peak RSS on a generated corpus.

    .venv/bin/python bench/bench_tokenize.py [--mib 64] [--vocab 4096] [--files 8]
    make bench   # also collects the pytest-benchmark test below (a small corpus)

The corpus: ``--files`` UTF-8 files of Zipf-distributed synthetic words (a 30,000-word lexicon, some
words with accented letters), lines of 5-25 words, documents of 5-60 lines separated by a blank
line. Three runs of the command, each its own process (peak RSS = that process's VmHWM at exit):

1. ``--vocab-size N``: train a byte-level BPE on the corpus, then encode it (two passes);
2. ``--tokenizer``: encode with the tokenizer of run 1 (a check pass and an encode pass);
3. ``--bytes``: the identity byte tokenizer.

Flat memory: runs 2 and 3 are repeated on a corpus of a quarter of the size; their peak RSS should
not grow with the corpus (the text is read in 4 MiB chunks and written shard by shard).

Wall time depends on what else the machine runs; the CPU seconds of the process (user + system,
all its threads) are printed too, and MB per CPU-second is the figure to compare between machines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def make_corpus(d: str, mib: int, files: int, seed: int = 0) -> int:
    """Write about ``mib`` MiB of text into ``files`` files under ``d``; returns the bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.4, 2.0, 1.9,
                     1.0, 1.5, 2.0, 0.8, 0.15, 0.1, 0.15, 0.07])
    freq /= freq.sum()
    lex = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=freq)) for _ in range(30_000)]
    for i in range(0, len(lex), 97):
        lex[i] = lex[i][:-1] + "é"
    lex = np.array(lex, dtype=object)
    per_file = (mib << 20) // files
    total = 0
    for f in range(files):
        parts, size = [], 0
        while size < per_file:
            n_lines = int(rng.integers(5, 61))
            lens = rng.integers(5, 26, size=n_lines)
            idx = np.minimum(rng.zipf(1.2, size=int(lens.sum())) - 1, len(lex) - 1)
            words = lex[idx]
            lines, k = [], 0
            for n in lens:
                lines.append(" ".join(words[k:k + n]))
                k += n
            doc = "\n".join(lines) + "\n"
            parts.append(doc)
            size += len(doc.encode())
        data = "\n".join(parts).encode()
        with open(os.path.join(d, f"part{f:03d}.txt"), "wb") as fh:
            fh.write(data)
        total += len(data)
    return total


# The child reports its own peak RSS (VmHWM of its address space) as it exits. Not ru_maxrss: Linux
# keeps the larger of the pre-exec and the new image's peak in it, so a child forked from this
# process (which holds the generated corpus) would report this process's size.
_CHILD = """
import atexit, sys
def _hwm():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nVmHWM {kb}\\n")
atexit.register(_hwm)
from rtrainer.cli import entry
sys.argv = ["rtrainer", *sys.argv[1:]]
entry()
"""


def run_tokenize(args: list[str]) -> dict:
    """One `rtrainer tokenize` process: wall time, CPU time, peak RSS (MiB), and its meta.json."""
    out = args[args.index("--out") + 1]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", _CHILD, "tokenize", *args, "--quiet"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode()   # (until the child exits: its stderr is small)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.stderr.close()
    p.returncode = status
    hwm = [line for line in err.splitlines() if line.startswith("VmHWM ")]
    if status != 0 or not hwm:
        raise RuntimeError(f"tokenize failed ({status}): {err}")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mib": int(hwm[-1].split()[1]) / 1024,
            "meta": meta}


def report(name: str, r: dict) -> None:
    m = r["meta"]
    mb = m["input_bytes"] / 1e6
    tok = m["tokens"]["train"] + m["tokens"]["val"]
    print(f"{name:<40} {mb:6.1f} MB {tok / 1e6:6.2f} M tokens V={m['vocab_size']:<5} | wall {r['wall_s']:6.1f} s "
          f"{mb / r['wall_s']:6.2f} MB/s {tok / r['wall_s'] / 1e6:5.2f} M tok/s | cpu {r['cpu_s']:6.1f} s "
          f"{mb / r['cpu_s']:6.2f} MB/cpu-s | peak RSS {r['rss_mib']:4.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--files", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtrainer-bench-tok-") as tmp:
        big, small = os.path.join(tmp, "big"), os.path.join(tmp, "small")
        os.makedirs(big)
        os.makedirs(small)
        t0 = time.perf_counter()
        nb = make_corpus(big, a.mib, a.files)
        make_corpus(small, max(1, a.mib // 4), a.files)   # the same lexicon and word statistics
        print(f"corpus: {nb / 1e6:.1f} MB in {a.files} files (generated in {time.perf_counter() - t0:.1f} s); "
              f"cores: {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        sep = ["--doc-separator", r"\n\n"]
        r = run_tokenize([big, "--out", os.path.join(tmp, "bpe"), "--vocab-size", str(a.vocab), *sep])
        report(f"BPE train + encode (V {a.vocab})", r)
        tok = os.path.join(tmp, "bpe", "tokenizer.json")
        for corpus, label in ((big, ""), (small, " (1/4 corpus)")):
            r = run_tokenize([corpus, "--out", os.path.join(tmp, "enc" + label[:3]), "--tokenizer", tok, *sep])
            report("encode with tokenizer.json" + label, r)
            r = run_tokenize([corpus, "--out", os.path.join(tmp, "bytes" + label[:3]), "--bytes", *sep])
            report("bytes" + label, r)


def test_tokenize_bpe_small(benchmark, tmp_path):
    """pytest-benchmark: train + encode a 4 MiB corpus (one round: it is a whole process)."""
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(str(src), 4, 2)
    n = [0]

    def once():
        n[0] += 1
        return run_tokenize([str(src), "--out", str(tmp_path / f"o{n[0]}"), "--vocab-size", "2048",
                             "--doc-separator", r"\n\n"])

    r = benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(rss_mib=r["rss_mib"], tokens=r["meta"]["tokens"]["train"])


if __name__ == "__main__":
    main()
