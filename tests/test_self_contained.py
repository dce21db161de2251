"""A clone passes its own tests: no file in the repo reaches for a path outside it.

CI happens to have a `shared/` folder beside the checkout; a user's clone does not. A test that
read from there passed in CI and failed for everyone else, so this scan fails on any reference
that leaves the repo: a relative path that climbs above the root, the parents of a file's own
path beyond the root, the root's parent, or an absolute path into this workplace. This file holds
examples of each, so it is the one file the scan passes over; its tests show the scan catches them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ROOT

# Upstream data, checked by their own tests; they hold no paths of ours.
VENDORED = ("tests/schemas/",)
SELF = Path(__file__).resolve()
# Path(__file__)...parents[N] and Path(__file__)...parent.parent...
_PARENTS_INDEX = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
_PARENT_CHAIN = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent)+)")
_ROOT_PARENT = re.compile(r"\bROOT\s*(?:\.parent\b|/\s*[\"']\.\.[\"'])")
_RELATIVE = re.compile(r"(?<![\w.])((?:\.\./)+)([\w.-]*)")
# The workplace's own folders (this checkout's siblings); "/" + "work" keeps this file clean.
_WORKPLACE = re.compile("/" + r"work/(?:shared|main|wt-[\w-]+|\.library|\.mirror)\b")


def repo_files(root: Path) -> list[Path]:
    """Tracked files, plus untracked ones git does not ignore; every file when root is no checkout."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0:
        names = [name for name in listed.stdout.split("\0") if name]
    else:
        names = [str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()]
    paths = [root / name for name in sorted(names) if not name.startswith(VENDORED)]
    return [path for path in paths if path.is_file() and path.resolve() != SELF]


def outside_references(root: Path) -> list[str]:
    """`file:line: text` for every reference in the tree that resolves outside `root`."""
    found = []
    for path in repo_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        depth = len(path.relative_to(root).parts) - 1  # folders between the root and the file
        for number, line in enumerate(text.splitlines(), start=1):
            if _escapes(line, path, root, depth):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def _escapes(line: str, path: Path, root: Path, depth: int) -> bool:
    if _WORKPLACE.search(line) or _ROOT_PARENT.search(line):
        return True
    if any(int(index) > depth for index in _PARENTS_INDEX.findall(line)):
        return True
    if any(chain.count(".parent") - 1 > depth for chain in _PARENT_CHAIN.findall(line)):
        return True
    inside = root.resolve()
    for climb, name in _RELATIVE.findall(line):
        # Relative to the file (a script's own folder), or to the root (where the tests run).
        from_file = (path.parent / climb / name).resolve()
        from_root = (root / climb / name).resolve()
        if not from_file.is_relative_to(inside) or (not from_file.exists() and not from_root.is_relative_to(inside)):
            return True
    return False


def test_no_file_refers_to_a_path_outside_the_repo():
    assert outside_references(ROOT) == [], "a user's clone has nothing beside it: vendor what the tests need"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_scan_catches_each_kind_of_reference_outside(tmp_path):
    shared = ".." + "/shared/schemas/x.json"
    tree = _tree(
        tmp_path,
        {
            "tests/test_a.py": f'SCHEMA = Path(__file__).resolve().parents[2] / "shared"\nOTHER = "{shared}"\n',
            "tests/test_b.py": "HERE = Path(__file__).parent.parent.parent\n",
            "tests/test_c.py": 'SCHEMA = ROOT.parent / "shared" / "schemas"\n',
            "scripts/run.sh": "cat " + "/" + "work/shared/FACTS.md\n",
            "docs/notes.md": f"see {shared}\n",
        },
    )
    found = outside_references(tree)
    assert [entry.split(":")[:2] for entry in found] == [
        ["docs/notes.md", "1"],
        ["scripts/run.sh", "1"],
        ["tests/test_a.py", "1"],
        ["tests/test_a.py", "2"],
        ["tests/test_b.py", "1"],
        ["tests/test_c.py", "1"],
    ]


def test_the_scan_allows_paths_inside_the_repo(tmp_path):
    tree = _tree(
        tmp_path,
        {
            "tests/test_a.py": "ROOT = Path(__file__).resolve().parents[1]\nUP = Path(__file__).parent.parent\n",
            "scripts/test.sh": 'cd "$(dirname "$0")/.."\nsource ../requirements.txt\n',
            "requirements.txt": "pytest==9.2.0\n",
            "components/x.py": 'TEMPLATES = Path(__file__).resolve().parent.parent / "cloud-init"\n',
        },
    )
    assert outside_references(tree) == []
