"""Test configuration: ioncore's own fixtures, and the reactor pytest-twisted runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ion.core.threads import BlockingPool

pytest_plugins = ["ion.testing.pytest_plugin", "ion.testing.pytest_servers"]


@pytest.fixture
def pool() -> Iterator[BlockingPool]:
    """A started blocking pool on the running reactor, stopped after the test."""
    from twisted.internet import reactor

    p = BlockingPool(reactor, maxthreads=4)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def spans() -> Iterator[Any]:
    """An OpenTelemetry SDK provider in use for the test (ion.core.trace records spans), its finished
    spans in the ``InMemorySpanExporter`` given; the API's default provider again afterwards."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ion.core import trace

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        trace.use_tracer_provider(None)
        provider.shutdown()
