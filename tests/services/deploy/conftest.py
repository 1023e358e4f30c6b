"""The deploy tests' shared fixtures, from :mod:`tests.services.deploy.scenario_support` (where they
live beside the helpers the scenarios use; the cache and hostile suites take them from there too)."""

from tests.services.deploy.scenario_support import deploy_system, downloads, http_servers, make_repo

__all__ = ["deploy_system", "downloads", "http_servers", "make_repo"]
