"""Rebuild examples/repo/, the sample repository README's deploy command uses.

Layout: <platform>/<name>/<version>/<files> — a .tgz, a .zip and one plain file.
Run from anywhere: ``python examples/make_repo.py``. The archives are built
deterministically (fixed mtimes and order), so rebuilding changes nothing.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent / "repo"
MTIME = 1_700_000_000


def tgz(path: Path, files: dict[str, str]) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=MTIME, filename="") as gz:
        gz.write(raw.getvalue())


def zipped(path: Path, files: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(files.items()):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2023, 11, 14, 22, 13, 20)), text)


def main() -> None:
    tgz(REPO / "noarch" / "hello-tools" / "1.0" / "hello-tools-1.0.tgz", {
        "hello-tools/bin/hello.sh": "#!/bin/sh\necho \"Hello from hello-tools 1.0\"\n",
        "hello-tools/README": "hello-tools 1.0: a sample dependency shipped as a .tgz\n",
    })
    zipped(REPO / "noarch" / "greetings" / "2.1" / "greetings-2.1.zip", {
        "greetings/en.txt": "Hello\n",
        "greetings/fr.txt": "Bonjour\n",
        "greetings/es.txt": "Hola\n",
    })
    motd = REPO / "noarch" / "motd" / "1.0" / "motd.txt"
    motd.parent.mkdir(parents=True, exist_ok=True)
    motd.write_text("Deployed by ion-deploy from the sample repository.\n")


if __name__ == "__main__":
    main()
