"""The deploy tests' shared fixtures, from :mod:`tests.services.deploy.scenario_support` (where they
live beside the helpers the scenarios use; the cache and hostile suites take them from there too), and
the one that keeps every deploy test out of the user's cache."""

from pathlib import Path

import pytest

from tests.services.deploy.scenario_support import deploy_system, downloads, http_servers, make_repo

__all__ = ["deploy_system", "downloads", "http_servers", "make_repo"]


@pytest.fixture(autouse=True)
def _cache_dir_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Deploy service or ion-deploy without a configured cache root keeps its job records and cache in
    the test's folder, not in the user's cache (``$ION_CACHE_DIR`` is the default root)."""
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "env-cache"))
