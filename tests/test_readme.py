"""README.md's quick start, run as a new user runs it: in a fresh copy of the repository and a new venv.

The commands are not copied here: they are read from README.md's code blocks
marked ``<!-- readme-test: NAME -->`` (the line right before the block), so a
README change that breaks them fails this test, and so does a code change that
makes the README wrong:

- ``install``: ``pip install -e . && ion-deploy examples/deployment.json``, run
  with bash in the copy, the venv's ``bin`` first on ``PATH``; every item deployed;
- ``again``: each line run on its own: the rerun says *Already deployed*, the
  ``--json`` one prints one JSON document, ``--version`` the version of ``pyproject.toml``;
- ``container`` + ``shell``: the container command run in a terminal (a pty, as a
  user types into it: the shell only starts on a terminal), each ``><>`` line
  typed in, the lines the README shows under them expected in the output, then
  Ctrl-D: the container stops with status 0.

The copy holds the checkout's files as they are (tracked and new, not the
ignored ones: no ``examples/deployed``, no ``ionlocal.config``). The venv is
made with ``--system-site-packages`` and without pip, so ``pip install -e .``
resolves every dependency from what the suite already has (its build still
fetches setuptools from the index, in its isolated build environment); the
venv gets the two commands a full install would put in its ``bin``: ``pip``
and ``twistd`` (console scripts of the outer pip and Twisted, run by the venv's
Python). That the dependencies are *declared* is tests/test_packaging.py's
check. ``ION_README_CLEAN_VENV=1`` makes a venv of its own instead (with pip,
no system site packages): everything is installed from the index (about 20 s
more on a 2-core machine).

Also: the wheel built from the copy ships the ``twistd cc`` plugin, the data files and the license.

Marked ``readme``; it runs in ``bin/test`` like every other test (about 15 s).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKED_BLOCK = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")
PROMPT = "><> "

pytestmark = [pytest.mark.readme, pytest.mark.timeout(300)]


def readme_blocks(text: str) -> dict[str, str]:
    """The marked code blocks of a README: ``{name: the block's text}``."""
    blocks: dict[str, str] = {}
    for name, body in MARKED_BLOCK.findall(text):
        assert name not in blocks, f"two README blocks are marked readme-test: {name}"
        blocks[name] = body
    return blocks


def commands(block: str) -> list[str]:
    """The non-empty lines of a block."""
    return [line.strip() for line in block.splitlines() if line.strip()]


def shell_session(block: str) -> tuple[list[str], list[str]]:
    """A ``><>`` block: the lines typed in, and the lines shown as their output."""
    typed = [line[len(PROMPT):].strip() for line in block.splitlines() if line.startswith(PROMPT.strip())]
    shown = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith(PROMPT.strip())]
    return typed, shown


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as they are now (tracked and untracked, never the ignored ones) in ``dest``:
    what a clone holds, plus the changes not committed yet."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the work tree, not yet in the index
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


CONSOLE_SCRIPT = """#!{python}
import sys
from {module} import {function}
sys.exit({function}())
"""


def make_venv(dest: Path, *, clean: bool) -> Path:
    """A new venv at ``dest`` (see the module notes); its ``bin`` folder."""
    if clean:
        subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=180)
        return dest / "bin"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(dest)],
                   check=True, timeout=60)
    bin_dir = dest / "bin"
    for name, module, function in (("pip", "pip._internal.cli.main", "main"),
                                   ("twistd", "twisted.scripts.twistd", "run")):
        script = bin_dir / name
        script.write_text(CONSOLE_SCRIPT.format(python=bin_dir / "python", module=module, function=function))
        script.chmod(0o755)
    return bin_dir


@dataclass
class QuickStart:
    """The copy, the venv, the environment the README's commands run in, and the install's outcome."""

    copy: Path
    bin_dir: Path
    env: dict[str, str]
    blocks: dict[str, str]
    install: subprocess.CompletedProcess[str]
    seconds: float

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """One README command, with bash, in the copy."""
        return subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=self.copy, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickStart]:
    """The ``install`` block run in a fresh copy with a new venv (once for the tests of this module)."""
    started = time.monotonic()
    top = tmp_path_factory.mktemp("readme")
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert "install" in blocks, "README.md has no block marked readme-test: install"
    copy = fresh_copy(top / "ioncore")
    bin_dir = make_venv(top / "venv", clean=os.environ.get("ION_README_CLEAN_VENV") == "1")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "ION_CACHE_DIR")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(bin_dir.parent),
               XDG_CACHE_HOME=str(top / "xdg-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1", TERM="xterm",
               PIP_NO_INPUT="1")
    qs = QuickStart(copy, bin_dir, env, blocks, subprocess.CompletedProcess([], 0), 0.0)
    qs.install = qs.run(blocks["install"], timeout=240)
    qs.seconds = time.monotonic() - started
    yield qs


def test_readme_marks_the_quick_start_blocks() -> None:
    """The README still has the marked blocks this test runs, and the shell block shows an answer."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert {"install", "again", "container", "shell"} <= set(blocks), sorted(blocks)
    typed, shown = shell_session(blocks["shell"])
    assert typed and shown


def test_install_and_deploy(quick_start: QuickStart) -> None:
    """``pip install -e . && ion-deploy examples/deployment.json``: installed into the venv from the copy,
    every sample item deployed under the copy's ``examples/deployed``, into the venv's own cache."""
    result = quick_start.install
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "All 3 items deployed" in result.stdout, result.stdout
    assert shutil.which("ion-deploy", path=quick_start.env["PATH"]) == str(quick_start.bin_dir / "ion-deploy")
    where = subprocess.run([str(quick_start.bin_dir / "python"), "-c", "import ion; print(ion.__file__)"],
                           cwd="/", env=quick_start.env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(quick_start.copy / "ion" / "__init__.py"), where.stderr
    assert (quick_start.copy / "examples" / "deployed" / "etc" / "motd.txt").read_text().startswith("Deployed by")
    assert list((Path(quick_start.env["XDG_CACHE_HOME"]) / "ion" / "deploy").glob("*/noarch/motd/1.0/.entry"))
    print(f"\nREADME quick start: copy, venv and install in {quick_start.seconds:.1f} s")


def test_again_json_and_version(quick_start: QuickStart) -> None:
    """The ``again`` block, a line at a time: already deployed, the JSON result, the version."""
    assert quick_start.install.returncode == 0, "the install failed (see test_install_and_deploy)"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    seen = set()
    for command in commands(quick_start.blocks["again"]):
        result = quick_start.run(command)
        assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
        args = shlex.split(command)
        if "--version" in args:
            assert result.stdout == f"ion-deploy (ioncore) {version}\n"
            seen.add("version")
        elif "--json" in args:
            data = json.loads(result.stdout)
            assert data["ok"] is True and all(i["state"] == "cached" and i["already"] for i in data["items"])
            seen.add("json")
        else:
            assert "Already deployed: all 3 items" in result.stdout, result.stdout
            seen.add("again")
    assert seen == {"again", "json", "version"}


def type_into_terminal(argv: list[str], typed: list[str], *, cwd: Path, env: dict[str, str],
                       timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` on a new terminal, type each line once the output settles, then Ctrl-D;
    the exit status and everything it wrote (escape sequences removed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout

    def read(until: str | None = None, quiet: float = 0.5) -> None:
        """Read until ``until`` shows up and nothing came for ``quiet`` s (or the process closed the terminal)."""
        last = time.monotonic()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    return  # the other side is closed
                if not chunk:
                    return
                out.extend(chunk)
                last = time.monotonic()
            elif (until is None or until in clean(out)) and time.monotonic() - last >= quiet:
                return

    try:
        read(PROMPT)
        for line in typed:
            os.write(master, line.encode() + b"\r")
            read()
        os.write(master, b"\x04")
        read(quiet=5)
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return code, clean(out)


def clean(raw: bytes | bytearray) -> str:
    """Terminal output as text: escape sequences and carriage returns removed."""
    return ANSI.sub("", raw.decode("utf-8", errors="replace"))


def test_container_and_shell(quick_start: QuickStart) -> None:
    """``twistd -n cc res/apps/hello.app`` in a terminal: the README's ``><>`` lines typed in give the
    answers it shows; Ctrl-D stops the container (status 0)."""
    assert quick_start.install.returncode == 0, "the install failed (see test_install_and_deploy)"
    (command,) = commands(quick_start.blocks["container"])
    typed, shown = shell_session(quick_start.blocks["shell"])
    code, output = type_into_terminal(shlex.split(command), typed, cwd=quick_start.copy, env=quick_start.env)
    for line in shown:
        assert line in output, f"{line!r} not in the shell's output:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    assert code == 0, output[-4000:]


def test_the_wheel_ships_the_plugin_the_data_and_the_license(quick_start: QuickStart, tmp_path: Path) -> None:
    """A wheel built from the copy (``pip wheel --no-deps``) holds ``twisted/plugins/cc.py`` but never a
    ``twisted/__init__.py`` or ``twisted/plugins/__init__.py`` (that would shadow Twisted's own), the
    typed marker and the .proto/.pyi of the records, the license, and the entry points."""
    import zipfile

    built = subprocess.run([str(quick_start.bin_dir / "python"), "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(tmp_path), str(quick_start.copy)], env=quick_start.env,
                           capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("ioncore-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    assert {"twisted/plugins/cc.py", "ion/py.typed", "ion/services/records/deployer.proto",
            "ion/services/records/deployer_pb2.pyi", "ion/testing/slowrepo.py", f"{info}/licenses/LICENSE"} <= names
    assert not names & {"twisted/__init__.py", "twisted/plugins/__init__.py"}
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "bench/", "examples/"))]
    assert "ion-deploy = ion.services.deploy.cli:main" in entry_points and "[pytest11]" in entry_points
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: PyYAML>=6" in metadata
