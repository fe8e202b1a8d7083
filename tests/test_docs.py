"""The documentation stays true to the code: docs/run-file.md is what `rtrainer keys --markdown`
generates (so a key added without regenerating it fails here), it lists every key `rtrainer keys`
prints, every relative link in README.md and docs/ points to a file that exists, and the repository
refers to no document outside it."""
import os
import re
from pathlib import Path

from conftest import REPO, run_cli

from rtrainer.docgen import REGENERATE, runfile_markdown

REPO = Path(REPO)
RUNFILE = REPO / "docs" / "run-file.md"


def test_runfile_reference_is_generated_from_config():
    committed = RUNFILE.read_text(encoding="utf-8") if RUNFILE.exists() else ""
    generated = runfile_markdown()
    if committed != generated:
        a, b = committed.splitlines(), generated.splitlines()
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(
            f"docs/run-file.md is out of date with rtrainer/config.py (first difference at line {i + 1}:\n"
            f"  committed: {a[i] if i < len(a) else '<end of file>'}\n"
            f"  generated: {b[i] if i < len(b) else '<end of file>'})\n"
            f"regenerate it with: {REGENERATE}")


def test_runfile_reference_lists_what_rtrainer_keys_prints():
    keys = run_cli("keys", check=True).stdout.splitlines()
    md = run_cli("keys", "--markdown", check=True).stdout
    assert md == runfile_markdown()
    pairs = [(keys[i], keys[i + 1].strip()) for i in range(0, len(keys), 2)]
    assert len(pairs) > 50
    sections = {}
    for head, doc in pairs:
        name, default = head.split(" = ", 1)
        section, key = name.split(".")
        sections.setdefault(section, []).append(key)
        row = next((line for line in md.splitlines() if line.startswith(f"| `{key}` |")
                    and doc.replace("|", "\\|") in line), None)
        assert row is not None, f"{name} ({doc!r}) is missing from docs/run-file.md"
    for section in sections:
        assert f"\n## [{section}]\n" in md


_LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")


def _anchors(text):
    """GitHub-style heading anchors of a Markdown text."""
    out = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_relative_links_in_the_docs_resolve():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 8
    bad = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in _LINK.finditer(text):
            target, anchor = m.group(1), m.group(2)
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                bad.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor[1:] not in _anchors(path.read_text(encoding="utf-8")):
                bad.append(f"{page.relative_to(REPO)}: {target}{anchor}: no such heading")
    assert not bad, "\n".join(bad)


# Documents that are not part of the repository must not be cited: the point they make is written
# in the project's own words instead. The patterns are assembled so that this file does not match.
_OUTSIDE = re.compile("|".join([r"SPEC ?" + "\u00a7", r"STYLE ?" + "\u00a7", "RELIA" + "BILITY",
                                r"reference ?" + "\u00a7", "reference-" + "trainer", r"\bissue [0-9]"]))

# Files other work is rewriting right now; each is cleaned as it is rewritten (then drop it here).
PENDING: set = set()   # files still to be cleaned of such references (none)


def test_no_reference_to_documents_outside_the_repository():
    roots = ["README.md", "CHANGELOG.md", "Makefile", "setup.py", "pyproject.toml", ".ci", "docs",
             "rtrainer", "kernels", "tests", "bench", "examples"]
    found = []
    for root in roots:
        top = REPO / root
        files = [top] if top.is_file() else [Path(d) / f for d, _, fs in os.walk(top) for f in fs]
        for path in files:
            rel = path.relative_to(REPO).as_posix()
            if rel in PENDING or path.suffix not in ("", ".py", ".pyx", ".pxd", ".md", ".toml", ".ini", ".cfg"):
                continue
            if "_kernels" in rel or "__pycache__" in rel:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if _OUTSIDE.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)
