"""The documents cannot go stale silently: the file map of ``docs/architecture.md`` matches the
tree under ``ion/`` both ways, and every relative link of README.md and docs/*.md resolves.

The map's rule (stated in its intro): every file under ``ion/`` has a row, by its path from the
repository root (each ``*.py`` module, each package by its ``__init__.py``, and the package data
such as ``py.typed``, ``.proto``, ``.pyi``); ``__pycache__`` folders and compiled files are not
part of the tree. A row is a table line whose first cell is one backticked path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAP_HEADING = "## File map"

#: ``| `path` | ... |``: a row of a map table.
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")
#: ``[text](target)``, not an image's; the target up to a space or the closing parenthesis.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")


def map_section(text: str) -> str:
    """The text of the ``## File map`` section (up to the next ``## `` heading)."""
    start = text.index(MAP_HEADING)
    rest = text[start + len(MAP_HEADING):]
    end = re.search(r"^## ", rest, re.MULTILINE)
    return rest[:end.start()] if end else rest


def map_paths(text: str) -> list[str]:
    """Every path the file map lists, in order."""
    return [m.group(1) for line in map_section(text).splitlines() if (m := _ROW.match(line.strip()))]


def tree_files(root: Path = ROOT) -> set[str]:
    """Every file under ``ion/`` that the map must list (paths from the repository root)."""
    files = set()
    for path in (root / "ion").rglob("*"):
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        files.add(path.relative_to(root).as_posix())
    return files


def missing_from_map(text: str, root: Path = ROOT) -> list[str]:
    listed = set(map_paths(text))
    return sorted(tree_files(root) - listed)


def not_in_tree(text: str, root: Path = ROOT) -> list[str]:
    return [p for p in map_paths(text) if not (root / p).exists()]


def test_the_map_lists_every_file_under_ion() -> None:
    missing = missing_from_map(ARCHITECTURE.read_text(encoding="utf-8"))
    assert not missing, f"docs/architecture.md's file map lacks: {', '.join(missing)}"


def test_every_path_in_the_map_exists() -> None:
    stale = not_in_tree(ARCHITECTURE.read_text(encoding="utf-8"))
    assert not stale, f"docs/architecture.md's file map names paths that do not exist: {', '.join(stale)}"


def test_the_map_lists_each_path_once() -> None:
    paths = map_paths(ARCHITECTURE.read_text(encoding="utf-8"))
    twice = sorted({p for p in paths if paths.count(p) > 1})
    assert not twice, f"listed more than once: {', '.join(twice)}"


def test_a_file_left_out_of_the_map_fails() -> None:
    """The check can fail: a map without one module's row, or with a row for a file that is not
    there, is caught."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `ion/core/process.py` |"))
    assert missing_from_map(text.replace(row + "\n", "")) == ["ion/core/process.py"]
    extra = "| `ion/core/gone.py` | a module that was removed |\n"
    assert not_in_tree(text.replace(row + "\n", row + "\n" + extra)) == ["ion/core/gone.py"]


# -- links ---------------------------------------------------------------------------------------------
def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that point into the repository (not URLs), outside code."""
    targets: list[str] = []
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                targets.append(target)
    return targets


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_the_readme_links_every_doc() -> None:
    links = {t.partition("#")[0] for t in relative_links(ROOT / "README.md")}
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert docs <= links, f"README.md does not link {', '.join(sorted(docs - links))}"
