"""Deployment files: Umpire's JSON, read unchanged, validated all at once (DESIGN §8).

A deployment file is an array of repositories, each ``{"url": ..., "items":
[...]}``. Every problem in the file is collected, so the user fixes them in one
go; each names the file, the repository and item, and the key::

    deployment.json: repository #1 (file:repo), item #2 (zlib): 'link' must be
    true or false (a JSON boolean), not the string "false"

Repository URLs: ``s3://bucket[/prefix]``, ``file:///abs/path`` or
``file:relative/path`` (against the deployment file's folder) and
``http(s)://host/path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ion.core.exceptions import IonError
from ion.services.records.deployer import (
    ITEM_KEYS,
    REQUIRED_KEYS,
    DeploymentItem,
    RepositoryURL,
    check_fields,
    check_sha256,
    describe_value,
    parse_repository_url,
)

__all__ = [
    "DeploymentError",
    "RepositoryURL",
    "DeploymentItem",
    "Deployment",
    "parse_repository_url",
    "parse_deployment",
    "load_deployment",
    "item_from_dict",
    "ITEM_KEYS",
    "DEFAULT_MAX_DEPLOYMENT_BYTES",
    "MAX_BYTES_KEY",
]

#: Largest deployment file (or request) read, in bytes, unless configured (``max_deployment_bytes``).
DEFAULT_MAX_DEPLOYMENT_BYTES = 64 << 20
#: The config key of that limit, in ``ion.services.deploy``.
MAX_BYTES_KEY = "max_deployment_bytes"

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class DeploymentError(IonError):
    """The deployment file cannot be used; ``problems`` lists every reason found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problems) if problems else f"{source}: unusable deployment")


@dataclass
class Deployment:
    """A validated deployment: its items in file order, and warnings (unknown keys).

    ``file`` and ``file_sha256``: the deployment file's resolved path and the sha256 of its
    bytes, when it was read from a file (:func:`load_deployment`): what names its generations
    (:mod:`ion.services.deploy.generations`) and what each generation records of it.
    """

    source: str
    items: list[DeploymentItem]
    warnings: list[str] = field(default_factory=list)
    file: str | None = None
    file_sha256: str | None = None


def _expand(value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        var = m.group(1) or m.group(2)
        if var not in environ:
            missing.append(var)
            return m.group(0)
        return environ[var]

    return _VAR.sub(sub, value), missing


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys it was given more than once (json keeps the last)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


def _check_duplicates(obj: Any, where: str, problems: list[str]) -> None:
    for key in getattr(obj, "duplicates", ()):
        problems.append(f"{where}: {key!r} is given more than once (which one would count?)")


def parse_deployment(data: Any, *, source: str = "<deployment>", base_dir: Path | None = None,
                     cwd: Path | None = None, environ: Mapping[str, str] | None = None,
                     expand: bool = True) -> Deployment:
    """Validate a decoded deployment (the JSON array).

    :param source: the file name used in messages.
    :param base_dir: the folder ``file:relative`` URLs are resolved against.
    :param cwd: the folder relative destinations are resolved against.
    :param environ: variables for ``$VAR`` in destinations (default: ``os.environ``).
    :param expand: false to take destinations literally (already expanded, as in a request).
    :raises DeploymentError: listing every problem found.
    """
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    warnings: list[str] = []
    items: list[DeploymentItem] = []
    if not isinstance(data, list):
        raise DeploymentError(source, [f"{source}: the deployment must be a JSON array of "
                                       f'{{"url": ..., "items": [...]}}, not {describe_value(data)}'])
    if not data:
        raise DeploymentError(source, [f"{source}: the deployment lists no repository"])
    for r, repo in enumerate(data, 1):
        rwhere = f"{source}: repository #{r}"
        if not isinstance(repo, dict):
            problems.append(f"{rwhere}: must be an object with 'url' and 'items'")
            continue
        _check_duplicates(repo, rwhere, problems)
        for key in repo:
            if key not in ("url", "items"):
                warnings.append(f"{rwhere}: unknown key {key!r} ignored")
        repository = None
        if "url" not in repo:
            problems.append(f"{rwhere}: missing 'url'")
        else:
            try:
                repository = parse_repository_url(repo["url"], base_dir)
                rwhere = f"{source}: repository #{r} ({repo['url']})"
            except ValueError as exc:
                problems.append(f"{rwhere}: {exc}")
        repo_items = repo.get("items")
        if not isinstance(repo_items, list):
            problems.append(f"{rwhere}: 'items' must be an array of items, not {describe_value(repo_items)}")
            continue
        for i, item in enumerate(repo_items, 1):
            label = item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None
            if label is not None and (not label.isprintable() or len(label) > 200):
                label = repr(label[:200])  # a NUL or a control character is shown escaped, never raw
            where = f"{rwhere}, item #{i}" + (f" ({label})" if label else "")
            if not isinstance(item, dict):
                problems.append(f"{where}: must be an object")
                continue
            before = len(problems)
            _check_duplicates(item, where, problems)
            for key in item:
                if key not in ITEM_KEYS:
                    warnings.append(f"{where}: unknown key {key!r} ignored")
            for key in REQUIRED_KEYS:
                if key not in item:
                    problems.append(f"{where}: missing {key!r}")
            # name, version, platform and the flags: the checks of every item (records.deployer)
            checked = check_fields(item, where, problems, sha256=False)
            destination: Path | None = None
            if "destination" in item:
                raw = item["destination"]
                if not isinstance(raw, str) or not raw.strip():
                    problems.append(f"{where}: 'destination' must be a non-empty string, not {describe_value(raw)}")
                elif "\x00" in raw:
                    problems.append(f"{where}: 'destination' must not contain a NUL byte, not {raw!r}")
                else:
                    expanded, missing = _expand(raw, environ) if expand else (raw, [])
                    if missing:
                        problems.append(f"{where}: 'destination' {raw!r} uses unset variable(s) "
                                        + ", ".join(f"${v}" for v in missing))
                    else:
                        dest = Path(os.path.expanduser(expanded))
                        destination = Path(os.path.normpath(dest if dest.is_absolute() else cwd / dest))
            sha = check_sha256(item.get("sha256"), where, problems)
            if len(problems) > before or repository is None:
                continue
            assert destination is not None
            items.append(DeploymentItem(
                repository=repository, name=checked["name"], version=checked["version"],
                platform=checked["platform"], destination=destination, link=checked["link"],
                unpack=checked["unpack"], keep_updated=checked["keep_updated"], sha256=sha,
                position=f"repository #{r}, item #{i}"))
    if problems:
        raise DeploymentError(source, problems)
    return Deployment(source, items, warnings)


def item_from_dict(data: Any, source: str = "<request>") -> DeploymentItem:
    """Read one item of a Deploy request (:meth:`DeploymentItem.to_dict`).

    Its destination must be absolute (the caller expanded variables and
    resolved relative paths where it runs).

    :raises DeploymentError: naming the problem.
    """
    if not isinstance(data, dict) or "url" not in data:
        raise DeploymentError(source, [f"{source}: an item must be an object with a 'url'"])
    fields = {k: v for k, v in data.items() if k in ITEM_KEYS}
    destination = fields.get("destination")
    if not isinstance(destination, str) or not os.path.isabs(destination):
        raise DeploymentError(source, [f"{source}: item {data.get('name')!r}: 'destination' must be an "
                                       f"absolute path in a request, not {destination!r}"])
    # Expanded by the caller: a '$' left in the path is literal (a variable's value may hold one).
    deployment = parse_deployment([{"url": data["url"], "items": [fields]}], source=source, expand=False)
    item = deployment.items[0]
    position = data.get("position")
    if isinstance(position, str) and position:
        item = replace(item, position=position)
    return item


def _limit_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit and limit % (1 << 20) == 0 else f"{limit} bytes"


def _too_big(source: str, limit: int, size: int | None, what: str = "deployment file") -> DeploymentError:
    how = f"is {size} bytes, more than" if size is not None else "holds more than"
    return DeploymentError(source, [f"{source}: the {what} {how} the {_limit_text(limit)} allowed "
                                    f"({MAX_BYTES_KEY} of ion.services.deploy)"])


def read_deployment_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_DEPLOYMENT_BYTES) -> bytes:
    """The bytes of a deployment file, at most ``max_bytes``.

    A regular file larger than that is refused from its size, before it is read;
    anything else (a FIFO, ``/dev/zero``, a file growing meanwhile) is read up to
    ``max_bytes + 1`` bytes and refused if it holds more.

    :raises DeploymentError: for an unreadable or too large file.
    """
    source = str(path)
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
            raise _too_big(source, max_bytes, st.st_size)
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DeploymentError(source, [f"{source}: cannot read the deployment file: {reason}"]) from None
    if len(data) > max_bytes:
        raise _too_big(source, max_bytes, None)
    return data


def load_deployment(path: str | Path, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None,
                    max_bytes: int = DEFAULT_MAX_DEPLOYMENT_BYTES) -> Deployment:
    """Read and validate a deployment file (at most ``max_bytes``: :func:`read_deployment_bytes`).

    :raises DeploymentError: for an unreadable or too large file, invalid JSON (with
        line and column where json gives them) or any invalid entry (all of them listed).
    """
    path = Path(path)
    source = str(path)
    raw = read_deployment_bytes(path, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeploymentError(source, [f"{source}: cannot read the deployment file: {exc}"]) from None
    try:
        data = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise DeploymentError(source, [f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                                       f"{exc.msg}"]) from None
    except (ValueError, RecursionError) as exc:
        # json raises these outside JSONDecodeError: a number too long to convert, arrays or
        # objects nested too deeply.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DeploymentError(source, [f"{source}: invalid JSON: {reason}"]) from None
    real = path.resolve()
    deployment = parse_deployment(data, source=source, base_dir=real.parent, cwd=cwd, environ=environ)
    deployment.file, deployment.file_sha256 = str(real), hashlib.sha256(raw).hexdigest()
    return deployment
