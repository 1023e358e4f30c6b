"""A first end-to-end check that the fixtures and the hello service work together."""

import pytest_twisted

from ion.services.hello import HelloClient, HelloService
from ion.testing import client_process


@pytest_twisted.ensureDeferred
async def test_hello_roundtrip(container):
    """A client process calls the hello service by name and gets the greeting."""
    await container.spawn(HelloService)
    proc = await client_process(container)
    assert await HelloClient(proc).hello("you there") == "Hello there, you there"


def test_clocked_system_rpc():
    """The clocked harness delivers on pump() and the reply fires synchronously."""
    from ion.testing import ClockedSystem

    system = ClockedSystem()
    system.spawn(HelloService)
    client = system.spawn(__import__("ion.core.process", fromlist=["Process"]).Process)
    content, headers = system.result(client.rpc_send("hello", "hello", "x"))
    assert content == {"value": "Hello there, x"}
    assert headers["status"] == "OK"
