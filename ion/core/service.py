"""Services: processes that answer requests on a system-wide shared queue.

Every instance of a service, in any container of the system, consumes
``<sysname>.<service>``; requests to the service name are shared among them
round-robin. A :class:`ServiceClient` subclass gives callers typed methods.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ion.core.process import Process, ProcessClient, Receiver

__all__ = ["ServiceProcess", "ServiceClient"]


class ServiceProcess(Process):
    """A process that also consumes its service's shared queue.

    Subclasses set ``service_name`` (and may set ``version``) and add ``op_*``.
    """

    #: The service name; requests to ``<sysname>.<service_name>`` reach an instance.
    service_name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not type(self).service_name:
            raise TypeError(f"{type(self).__name__} must set service_name")

    @property
    def service_queue(self) -> str:
        """The shared queue name, ``<sysname>.<service>``."""
        return f"{self.sysname}.{type(self).service_name}"

    #: Requests handled at once by each receiver (config ``max_concurrent`` of the
    #: service's module overrides it). DESIGN §5's default is one at a time; a service
    #: whose ops wait long (a download, a lock) raises it so one slow request does not
    #: hold up the others, nor a request that would end the wait (unlock).
    max_concurrent: ClassVar[int] = 1

    def receivers_to_create(self) -> list[Receiver]:
        receivers = super().receivers_to_create() + [
            Receiver(self, self.service_queue, self._receive, shared=True),
        ]
        concurrent = int(self.get_config("max_concurrent", type(self).max_concurrent))
        for receiver in receivers:
            receiver.max_concurrent = max(receiver.max_concurrent, concurrent)
        return receivers

    def op_ping(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        result = super().op_ping(content, headers, msg)
        result["service"] = type(self).service_name
        result["version"] = type(self).version
        return result


class ServiceClient(ProcessClient):
    """Client of a service, reached by name through ``proc``.

    Subclasses set ``service_name`` and wrap each op in a method, e.g.::

        class HelloClient(ServiceClient):
            service_name = "hello"

            async def hello(self, text):
                content, headers = await self.rpc_send("hello", text)
                return content
    """

    service_name: ClassVar[str] = ""

    def __init__(self, proc: Process, target: str | None = None) -> None:
        name = target or type(self).service_name
        if not name:
            raise TypeError(f"{type(self).__name__} needs a target or a service_name")
        super().__init__(proc, name)
