"""Test configuration: ioncore's own fixtures, and the reactor pytest-twisted runs."""

pytest_plugins = ["ion.testing.pytest_plugin", "ion.testing.pytest_servers"]
