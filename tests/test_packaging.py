"""Every distribution the code imports is declared in ``pyproject.toml``.

An import that only works because some other package happens to pull its
distribution in (PyYAML through moto, botocore through boto3, zope.interface
through Twisted) breaks a plain ``pip install`` while every test passes in a
``[test]`` install. So each ``import`` of ``ion/`` and ``tests/`` is read
(with :mod:`ast`, function-level ones too), resolved to the distribution that
installs it, and checked against what ``pyproject.toml`` declares:

- ``ion/`` at module level: ``[project] dependencies``;
- ``ion/`` inside a function or a ``try: ... except ImportError`` (imported on
  use, like boto3 for ``s3://``): those, or a feature extra (every extra but
  ``test`` and ``dev``);
- ``ion/testing/`` and ``tests/``: the dependencies and the ``test`` extra.

The standard library and ``ion`` itself are left out. The check runs against
the distributions installed here (``bin/test`` installs ``.[test]``); a module
that is not installed at all fails too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import metadata, util
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
#: Extras that are not features of the library: never a home for an import of ``ion/`` outside ``ion/testing``.
NOT_FEATURES = {"test", "dev"}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it (``PyYAML`` -> ``pyyaml``, ``zope.interface`` -> ``zope-interface``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution a PEP 508 requirement names (``twisted[tls]>=24.3`` -> ``twisted``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read the requirement {requirement!r}"
    return normalize(match.group(1))


@dataclass(frozen=True)
class Declared:
    """What ``pyproject.toml`` declares: the main dependencies and each extra (normalized names)."""

    main: frozenset[str]
    extras: dict[str, frozenset[str]]

    @classmethod
    def read(cls, path: Path = PYPROJECT) -> Declared:
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        return cls(frozenset(map(requirement_name, project.get("dependencies", []))),
                   {extra: frozenset(map(requirement_name, reqs))
                    for extra, reqs in project.get("optional-dependencies", {}).items()})

    def features(self) -> frozenset[str]:
        """The main dependencies and every feature extra."""
        out = set(self.main)
        for extra, names in self.extras.items():
            if extra not in NOT_FEATURES:
                out |= names
        return frozenset(out)

    def testing(self) -> frozenset[str]:
        """The main dependencies and the ``test`` extra."""
        return self.main | self.extras.get("test", frozenset())


@dataclass(frozen=True)
class Import:
    """One imported module: where, and whether it is imported on use (in a function or an ImportError guard)."""

    file: Path
    line: int
    module: str
    lazy: bool

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT) if self.file.is_relative_to(ROOT) else self.file}:{self.line}"


def _guards_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def imports_of(path: Path) -> list[Import]:
    """Every absolute import of a source file (relative ones are the package's own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(path, child.lineno, alias.name, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                found.append(Import(path, child.lineno, child.module, lazy))
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
                isinstance(child, ast.Try) and _guards_import_error(child))
            visit(child, inner)

    visit(tree, False)
    return found


def third_party(imports: list[Import]) -> list[Import]:
    """Leave out the standard library, ``ion`` and ``tests``."""
    own = {"ion", "tests", "__future__"}
    return [i for i in imports if (top := i.module.partition(".")[0]) not in sys.stdlib_module_names and top not in own]


@cache
def _top_level_names() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _files_of(dist_name: str) -> frozenset[str]:
    dist = metadata.distribution(dist_name)
    return frozenset(str(PurePosixPath(f)) for f in dist.files or ())


def distribution_of(module: str) -> str | None:
    """The (normalized) distribution that installs ``module``, or None if it is not installed.

    A top-level name several distributions share (``google``, ``zope``) is
    resolved by the file the module is loaded from.
    """
    top = module.partition(".")[0]
    candidates = sorted(set(_top_level_names().get(top, [])))
    if len(candidates) == 1:
        return normalize(candidates[0])
    parts = module.split(".")
    for n in range(len(parts), 0, -1):  # the deepest importable prefix names the file
        try:
            spec = util.find_spec(".".join(parts[:n]))
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        origin = Path(spec.origin)
        for dist in candidates:
            if any(origin.as_posix().endswith("/" + f) for f in _files_of(dist) if f.endswith(origin.name)):
                return normalize(dist)
        break
    return normalize(candidates[0]) if candidates else None


def undeclared(imports: list[Import], allowed_for: dict[bool, frozenset[str]]) -> list[str]:
    """One line per import whose distribution is not in ``allowed_for[imp.lazy]`` (or not installed)."""
    problems = []
    for imp in third_party(imports):
        dist = distribution_of(imp.module)
        if dist is None:
            problems.append(f"{imp.where()}: {imp.module} is not installed (declare its distribution)")
        elif dist not in allowed_for[imp.lazy]:
            kind = "imported on use" if imp.lazy else "imported at module level"
            problems.append(f"{imp.where()}: {imp.module} ({kind}) comes from {dist}, which is not declared "
                            f"where it is needed in pyproject.toml")
    return problems


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def check_ion(declared: Declared) -> list[str]:
    """The problems of every import of ``ion/`` (see the module notes for the rules)."""
    problems = []
    for path in _sources("ion"):
        imports = imports_of(path)
        if (ROOT / "ion" / "testing") in path.parents:
            problems += undeclared(imports, {False: declared.testing(), True: declared.testing()})
        else:
            problems += undeclared(imports, {False: declared.main, True: declared.features()})
    return problems


def test_every_import_of_ion_is_declared() -> None:
    problems = check_ion(Declared.read())
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_every_import_of_the_tests_is_declared() -> None:
    declared = Declared.read()
    problems = []
    for path in _sources("tests"):
        problems += undeclared(imports_of(path), {False: declared.testing(), True: declared.testing()})
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_every_main_dependency_is_imported() -> None:
    """A main dependency nothing imports is a stale one (or belongs in an extra)."""
    used = {distribution_of(i.module) for path in _sources("ion") for i in third_party(imports_of(path))}
    assert Declared.read().main - used == set()


def test_the_check_finds_an_undeclared_import(tmp_path: Path) -> None:
    """The checker itself: a module-level PyYAML import with PyYAML only in an extra fails; on use, it passes."""
    source = tmp_path / "mod.py"
    source.write_text(textwrap.dedent("""\
        import os
        import yaml
        from google.protobuf import message

        def later():
            import yaml
        try:
            import boto3
        except ImportError:
            boto3 = None
    """))
    declared = Declared(frozenset({"protobuf"}), {"extra": frozenset({"pyyaml", "boto3"})})
    problems = undeclared(imports_of(source), {False: declared.main, True: declared.features()})
    assert len(problems) == 1 and "mod.py:2: yaml" in problems[0] and "pyyaml" in problems[0]
    assert undeclared(imports_of(source), {False: frozenset(), True: frozenset()}) and \
        distribution_of("google.protobuf.message") == "protobuf"


def test_pyproject_metadata() -> None:
    """PEP 621 metadata with a license file, the console scripts, the pytest plugins, and the ``cc`` plugin shipped."""
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    project = data["project"]
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert all((ROOT / f).is_file() for f in project["license-files"])
    assert project["scripts"] == {"ion-cc": "ion.core.tap:run_cc", "ion-deploy": "ion.services.deploy.cli:main",
                                  "ion": "ion.command:main"}
    for name, target in project["entry-points"]["pytest11"].items():
        assert util.find_spec(target) is not None, name
    setuptools = data["tool"]["setuptools"]
    assert "twisted.plugins" in setuptools["packages"]["find"]["include"]
    assert setuptools["package-data"]["twisted.plugins"] == ["cc.py"]
    assert not (ROOT / "twisted" / "__init__.py").exists() and not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


BLOCK_PYTEST_TWISTED = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "pytest_twisted" or name.startswith("pytest_twisted."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def test_pytest_plugins_load_without_the_test_extra() -> None:
    """The ``pytest11`` entry points are loaded by pytest in any project that installs ioncore, with or
    without ``[test]``: they must import without pytest-twisted (their async fixtures then skip; under
    CI=true they fail)."""
    code = BLOCK_PYTEST_TWISTED + "import ion.testing.pytest_plugin, ion.testing.pytest_servers; print('loaded')"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr


if __name__ == "__main__":  # pragma: no cover - the check as a script: python tests/test_packaging.py
    found = check_ion(Declared.read())
    print("\n".join(found) or "every import of ion/ is declared")
    sys.exit(1 if found else 0)
