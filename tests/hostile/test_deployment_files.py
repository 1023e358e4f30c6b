"""Every hostile deployment file of ``deployment_files.py``, through the parser and through ``ion-deploy``.

The parser (``load_deployment``) must list every problem at once, each naming the
file, or accept the file with its items and warnings. ``ion-deploy`` (``main`` in
process) must refuse each refused file with exit status 2, one ``Error:`` line per
problem on stderr, nothing on stdout and no traceback. (An accepted file would start
a deployment, so only refused files go through ``ion-deploy``.)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from ion.services.deploy.cli import main
from ion.services.deploy.spec import DeploymentError, load_deployment
from tests.hostile.deployment_files import CASES, UNSET_VARS, Case


def _param(case: Case, reason: str) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture
def deployment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the case is written; the run happens in its folder, with UNSET_VARS unset."""
    for var in UNSET_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "deployment.json"


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [_param(case, case.xfail) for case in CASES])
def test_parser(case: Case, deployment_file: Path) -> None:
    deployment_file.write_bytes(case.content())
    if case.errors:
        with pytest.raises(DeploymentError) as info:
            load_deployment(deployment_file, cwd=deployment_file.parent, environ={})
        problems = info.value.problems
        assert len(problems) == len(case.errors), problems
        for problem, fragment in zip(problems, case.errors, strict=True):
            assert problem.startswith(f"{deployment_file}: "), problem
            assert fragment in problem, problems
    else:
        deployment = load_deployment(deployment_file, cwd=deployment_file.parent, environ={})
        assert len(deployment.items) == case.items
        assert len(deployment.warnings) == len(case.warnings), deployment.warnings
        for warning, fragment in zip(deployment.warnings, case.warnings, strict=True):
            assert warning.startswith(f"{deployment_file}: ") and fragment in warning, deployment.warnings


@pytest.mark.parametrize("case", [_param(case, case.xfail or case.xfail_cli) for case in CASES if case.errors])
def test_cli(case: Case, deployment_file: Path) -> None:
    deployment_file.write_bytes(case.content())
    try:
        load_deployment(deployment_file)
    except DeploymentError:
        pass
    else:  # ion-deploy would start deploying it
        pytest.fail("the parser accepts the file")
    out, err = io.StringIO(), io.StringIO()
    code = main([str(deployment_file)], stdout=out, stderr=err)
    assert code == 2 and out.getvalue() == ""
    lines = err.getvalue().splitlines()
    assert "Traceback" not in err.getvalue()
    assert len(lines) == len(case.errors), lines
    for line, fragment in zip(lines, case.errors, strict=True):
        assert line.startswith(f"Error: {deployment_file}: "), lines
        assert fragment in line, lines
