"""Every `path:line` citation of the authors' code in the repository points at a file of the commits sdm follows,
within its length (tests/authors_code.json lists those files with their line counts and hashes). With
SDM_AUTHORS_CODE naming local checkouts of the two repositories (paths joined by os.pathsep), the table itself is
checked against them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TABLE = json.loads((Path(__file__).parent / "authors_code.json").read_text())
# a file of the authors (folders, a name, .py or .sh), a colon, then lines "12", "12-20", "12, 30-31"
CITATION = re.compile(r"((?:[A-Za-z0-9_]+/)*[A-Za-z0-9_]+\.(?:py|sh)):(\d+(?:-\d+)?(?:,\s*\d+(?:-\d+)?)*)")
OWN = ("sdm/", "tests/", "benchmarks/", "notebooks/", ".ci/")  # citations of our own files are not the authors'


def tracked_files() -> list[str]:
    """The repository's files: git's list in a checkout, else every file outside hidden and virtual-env folders."""
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.split()
    skip = (".", "venv", "node_modules")
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not any(part.startswith(skip) for part in p.relative_to(REPO).parts)]


def authors_files() -> dict[tuple[str, str], int]:
    return {(repo, path): f["lines"] for repo, info in TABLE["repositories"].items() for path, f in info["files"].items()}


def citations() -> list[tuple[str, int, str, list[tuple[int, int]], str]]:
    """(file, line, cited path, [(first, last), ...], the text around it) for every citation in the
    tracked text files."""
    tracked = tracked_files()
    found: list = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".ipynb", ".toml", ".txt", ".json") or name.startswith("benchmarks/results/"):
            continue
        text = path.read_text(errors="replace")
        for m in CITATION.finditer(text):
            if m.group(1).startswith(OWN) or (REPO / m.group(1)).is_file():
                continue
            spans = [tuple(int(v) for v in (part.split("-") * 2)[:2]) for part in re.split(r",\s*", m.group(2))]
            found.append((name, text.count("\n", 0, m.start()) + 1, m.group(1), spans, text[max(0, m.start() - 400) : m.end() + 200]))
    return found


def test_every_citation_names_one_file_of_the_authors_and_lines_inside_it() -> None:
    files = authors_files()
    found = citations()
    assert len(found) > 50  # the scan sees the repository's citations
    problems = []
    for where, line, cited, spans, context in found:
        matches = [key for key in files if key[1] == cited or key[1].endswith("/" + cited)]
        if len(matches) > 1:  # a path two repositories share (Jamais Vu forks GeoAware-SC): the one named beside it
            matches = [key for key in matches if key[0] in context] or matches
        if len(matches) != 1:
            problems.append(f"{where}:{line}: {cited} names {len(matches)} of the authors' files ({matches}); write its folders")
            continue
        length = files[matches[0]]
        problems += [f"{where}:{line}: {cited}:{a}-{b} lies outside the file ({length} lines)" for a, b in spans if not 1 <= a <= b <= length]
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not os.environ.get("SDM_AUTHORS_CODE"), reason="set SDM_AUTHORS_CODE to local checkouts of the authors' code")
def test_the_table_matches_a_local_checkout_of_the_authors_code() -> None:
    for root in map(Path, os.environ["SDM_AUTHORS_CODE"].split(os.pathsep)):
        repo = next(r for r, info in TABLE["repositories"].items() if all((root / p).is_file() for p in list(info["files"])[:3]))
        for path, facts in TABLE["repositories"][repo]["files"].items():
            data = (root / path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == facts["sha256"], f"{repo}/{path} differs from commit {TABLE['repositories'][repo]['commit']}"


def test_links_in_the_docs_and_notebooks_stay_inside_the_repository() -> None:
    """Every relative Markdown link of the README, docs/ and the notebooks names a file or folder of a clone; none
    points outside it (a clone has no ../shared)."""
    tracked = tracked_files()
    dead = []
    for name in tracked:
        if not name.endswith((".md", ".ipynb")):
            continue
        text = (REPO / name).read_text()
        if name.endswith(".ipynb"):
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
        dead += [f"{name}: ../shared" for _ in re.findall(r"\.\./shared/DESIGN", text)]
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:|#", target):
                continue
            base = REPO / "notebooks" if name.endswith(".ipynb") else (REPO / name).parent
            if not (base / target.split("#")[0]).exists() or not (base / target).resolve().is_relative_to(REPO):
                dead.append(f"{name}: {target}")
    assert not dead, dead
