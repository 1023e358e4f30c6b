"""Ops that take what they use: the content's fields by name, the message only when asked.

The service below (two ops, state) and its client take 16 lines; written the classic way
(``op_x(self, content, headers, msg)`` reading its fields by hand, and a client method per op)
the same takes 27.
"""

from __future__ import annotations

from typing import Any

import pytest

from ion.core.exceptions import ReceivedApplicationError
from ion.core.process import Process
from ion.core.service import ServiceClient, ServiceProcess
from ion.testing import ClockedSystem
from tests.core.support import failure_of


class Counter(ServiceProcess):
    service_name = "counter"

    def slc_init(self) -> None:
        self.total = 0

    def op_add(self, by: int = 1) -> int:
        self.total += by
        return self.total

    def op_get(self) -> int:
        return self.total


class CounterClient(ServiceClient):
    service_name = "counter"


class Fields(Process):
    """Each way an op can name what it takes."""

    name = "fields"

    def op_greet(self, text: str) -> str:
        return f"hi {text}"

    def op_both(self, a: int, b: int, msg: dict[str, Any]) -> dict[str, Any]:
        return {"sum": a + b, "from": msg["sender"]}

    def op_whole(self, content: Any) -> Any:
        return {"got": content}

    def op_open(self, a: int, **rest: Any) -> dict[str, Any]:
        return {"a": a, "rest": rest}


def test_a_service_written_with_named_fields() -> None:
    """The fields of the content reach the op by name; defaults apply; ``call`` gives the content."""
    system = ClockedSystem()
    system.spawn(Counter)
    client = CounterClient(system.spawn(Process, name="caller"))
    assert system.result(client.call("add")) == 1
    assert system.result(client.call("add", by=41)) == 42
    assert system.result(client.call("get")) == 42


@pytest.mark.parametrize(("op", "content", "expected"), [
    ("greet", "you", "hi you"),                 # one field: the value may come bare
    ("greet", {"text": "you"}, "hi you"),
    ("whole", [1, 2], {"got": [1, 2]}),
    ("open", {"a": 1, "b": 2}, {"a": 1, "rest": {"b": 2}}),
])
def test_ops_get_what_they_name(op: str, content: Any, expected: Any) -> None:
    system = ClockedSystem()
    proc = system.spawn(Fields)
    caller = system.spawn(Process, name="caller")
    assert system.result(caller.rpc_send(proc.id, op, content))[0] == expected


def test_the_message_only_when_asked() -> None:
    system = ClockedSystem()
    proc = system.spawn(Fields)
    caller = system.spawn(Process, name="caller")
    content, _ = system.result(caller.rpc_send(proc.id, "both", {"a": 1, "b": 2}))
    assert content == {"sum": 3, "from": caller.backend_name}


@pytest.mark.parametrize(("op", "content", "message"), [
    ("both", {"a": 1}, "both needs the field 'b'"),
    ("both", {"a": 1, "b": 2, "c": 3}, "both takes no field 'c' (its fields: a, b)"),
    ("both", [1, 2], "both takes a dict of fields (a, b), not list"),
])
def test_bad_fields_are_400s_naming_the_field(op: str, content: Any, message: str) -> None:
    system = ClockedSystem()
    proc = system.spawn(Fields)
    caller = system.spawn(Process, name="caller")
    d = caller.rpc_send(proc.id, op, content)
    system.pump()
    error = failure_of(d, ReceivedApplicationError)
    assert error.response_code == 400 and message in error.message
