"""ioncore: a Twisted capability container and the services built on it."""

__version__ = "0.1.0"
