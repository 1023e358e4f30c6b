"""The hello service: the smallest complete example of a service, its client and app file.

``res/apps/hello.app`` starts it. From any process::

    client = HelloClient(proc)
    text = yield client.hello("you there")      # "Hello there, you there"
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from ion.core.service import ServiceClient, ServiceProcess

__all__ = ["HelloService", "HelloClient"]


class HelloService(ServiceProcess):
    """Answers ``hello`` with a greeting (config ``ion.services.hello: greeting``)."""

    service_name = "hello"
    version = "0.1.0"

    def op_hello(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, str]:
        """Greet the caller: ``{'value': 'Hello there, <content>'}``."""
        greeting = self.get_config("greeting", "Hello there")
        return {"value": f"{greeting}, {content}"}

    def op_whoami(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """Who is calling: the claimed ``user-id`` and the broker-validated ``broker-user``."""
        return {"user-id": headers.get("user-id"), "broker-user": headers.get("broker-user")}


class HelloClient(ServiceClient):
    """Calls the hello service."""

    service_name = "hello"

    @defer.inlineCallbacks
    def hello(self, text: str) -> Any:
        """The greeting for ``text``."""
        content, _headers = yield self.rpc_send("hello", text)
        return content["value"]
