"""The hello service: the smallest complete example of a service, its client and app file.

``res/apps/hello.app`` starts it. From any process::

    client = HelloClient(proc)
    text = yield client.hello("you there")      # "Hello there, you there"

``sleep`` is a deliberately slow request (it waits on the reactor clock, so
other messages of the container go on meanwhile): demos and tests use it to
hold a request in an instance, e.g. to watch it redelivered to another
instance when the first one dies before answering.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from ion.core.exceptions import ApplicationError
from ion.core.service import ServiceClient, ServiceProcess

__all__ = ["HelloService", "HelloClient", "MAX_SLEEP"]

#: The longest ``sleep`` (seconds) the service accepts.
MAX_SLEEP = 3600.0


class HelloService(ServiceProcess):
    """Answers ``hello`` with a greeting (config ``ion.services.hello: greeting``)."""

    service_name = "hello"
    version = "0.1.0"
    _log = Logger()

    def op_hello(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, str]:
        """Greet the caller: ``{'value': 'Hello there, <content>'}``."""
        greeting = self.get_config("greeting", "Hello there")
        return {"value": f"{greeting}, {content}"}

    def op_whoami(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """Who is calling: the claimed ``user-id`` and the broker-validated ``broker-user``."""
        return {"user-id": headers.get("user-id"), "broker-user": headers.get("broker-user")}

    def op_sleep(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        """Wait, then answer who waited: ``{slept, pid, container, redelivered, label}``.

        ``content`` is the number of seconds, or ``{"seconds": s, "if_redelivered": s2,
        "label": text}``: ``s2`` seconds instead when the broker redelivers the request
        (the instance that took it first stopped before answering); ``label`` is echoed
        in the log line and the answer. At most :data:`MAX_SLEEP` seconds.
        """
        spec = content if isinstance(content, dict) else {"seconds": content}
        redelivered = bool(headers.get("redelivered"))
        seconds = spec.get("if_redelivered") if redelivered and "if_redelivered" in spec else spec.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SLEEP:
            raise ApplicationError(f"sleep needs a number of seconds from 0 to {MAX_SLEEP:g}, not {seconds!r}", 400)
        label = str(spec.get("label", ""))
        self._log.info("{pid}: sleeping {seconds} s{again} [{label}]", pid=self.id, seconds=seconds, label=label,
                       again=" (redelivered)" if redelivered else "")
        answer = {"slept": seconds, "pid": self.id, "container": self.container.id, "redelivered": redelivered,
                  "label": label}
        return task.deferLater(self.clock, seconds, lambda: answer)


class HelloClient(ServiceClient):
    """Calls the hello service."""

    service_name = "hello"

    @defer.inlineCallbacks
    def hello(self, text: str) -> Any:
        """The greeting for ``text``."""
        content, _headers = yield self.rpc_send("hello", text)
        return content["value"]
