"""Services: processes that answer requests on a system-wide shared queue.

Every instance of a service, in any container of the system, consumes
``<sysname>.<service>``; requests to the service name are shared among them
round-robin. A :class:`ServiceClient` subclass gives callers typed methods.

**Cancellable requests.** A caller that gives up on a long op (a download, a
lock wait) should stop the work, not only stop waiting for it. The caller
does not know which instance took a request from the shared queue, so such
ops run in the ``request`` protocol: the op registers its work with
:meth:`ServiceProcess.cancellable`, which at once *agrees* with the instance's
pid; when the caller's Deferred is cancelled or its call times out,
:meth:`ServiceClient.cancellable_call` sends ``cancel {conv}`` to that pid,
and the instance cancels the work (only for the process that asked for it).
A cancel that arrives before the agree (the request still queued) cannot
reach the work: the op runs, and its answer is dropped as a late reply.

**Errors.** An op refuses or fails on purpose by raising an
:class:`~ion.core.exceptions.ApplicationError` subclass: the error reply
carries its class name, code, message and details. A client's ``errors``
lists the error families it raises again: an error reply naming one of
their classes fails the call with that class, rebuilt from the reply
(:func:`~ion.core.exceptions.error_from_reply`, the
:class:`~ion.core.exceptions.ReceivedError` as its ``__cause__``); any other
with :class:`~ion.core.exceptions.ReceivedApplicationError` (4xx) or
:class:`~ion.core.exceptions.ReceivedContainerError` (5xx).

**Work in flight.** A service owns the work its ops wait for: what
:meth:`ServiceProcess.cancellable` registers, and what
:meth:`ServiceProcess.track` counts (work no caller cancels, a deployment
say), is one set, :attr:`ServiceProcess.in_flight`. Terminate's first phase
(:meth:`ServiceProcess.slc_drain`) sets ``draining`` (ops refuse new work
with 503 from then on) and, for a service with a ``drain_timeout``, waits
that long for the set (0: not at all), cancels what is left and waits for the
cancelled work to clean up, all while the process's queues still consume and
its backend still delivers the replies that clean-up needs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import Any, ClassVar, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.conversation import RpcResult
from ion.core.deferreds import observe
from ion.core.exceptions import ApplicationError, ConversationTimeout, ReceivedError, error_from_reply
from ion.core.messaging.message import Protocol
from ion.core.process import Process, ProcessClient, Receiver
from ion.core.security import authorize

__all__ = ["ServiceProcess", "ServiceClient", "CANCEL_OP"]

#: The op a caller sends to the instance that agreed, to cancel its request's work.
CANCEL_OP = "cancel"

T = TypeVar("T")


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
        #: conv-id -> (the requester's broker user, the work), for requests that can be cancelled.
        self._cancellable: dict[str, tuple[str, defer.Deferred[Any]]] = {}
        #: The work in flight (see the module notes); each leaves the set when it fires.
        self._in_flight: set[defer.Deferred[Any]] = set()
        #: True from the start of terminate (slc_drain): ops refuse new work (503).
        self.draining = False

    @property
    def service_queue(self) -> str:
        """The shared queue name, ``<sysname>.<service>``."""
        return f"{self.sysname}.{type(self).service_name}"

    #: Requests handled at once by each receiver (config ``max_concurrent`` of the
    #: service's module overrides it). DESIGN §5's default is one at a time; a service
    #: whose ops wait long (a download, a lock) raises it so one slow request does not
    #: hold up the others, nor a request that would end the wait (unlock).
    max_concurrent: ClassVar[int] = 1

    #: Seconds terminate gives the work in flight before cancelling it (config ``drain_timeout``
    #: of the service's module overrides it; 0: cancel at once). None: terminate leaves it to the
    #: process's drain of its ops (``terminate_timeout``, then a 503 to their callers).
    drain_timeout: ClassVar[float | None] = None

    def receivers_to_create(self) -> list[Receiver]:
        receivers = super().receivers_to_create() + [
            Receiver(self, self.service_queue, self._receive, shared=True),
        ]
        concurrent = int(self.get_config("max_concurrent", type(self).max_concurrent))
        for receiver in receivers:
            receiver.max_concurrent = max(receiver.max_concurrent, concurrent)
        return receivers

    @property
    def in_flight(self) -> frozenset[defer.Deferred[Any]]:
        """The work in flight now: registered by :meth:`track` or :meth:`cancellable`, not fired yet."""
        return frozenset(self._in_flight)

    def refuse_if_draining(self) -> None:
        """Refuse new work once terminate has started (503): the caller sends it again and another
        instance of the service takes it. Status, cancel and the like are still answered."""
        if self.draining:
            raise ApplicationError(f"{type(self).service_name} service {self.id} is stopping and takes no new "
                                   "work; send it again (another instance of the service takes it)", 503)

    def track(self, work: defer.Deferred[T]) -> defer.Deferred[T]:
        """Count ``work`` as in flight until it fires (terminate waits for it and cancels it,
        see :meth:`slc_drain`); returns ``work``.

        Work started once terminate has begun would escape the drain: it is cancelled at once
        and the op refused (:meth:`refuse_if_draining`), whatever the service.
        """
        if self.draining:
            work.addErrback(lambda f: f.trap(defer.CancelledError))
            work.cancel()
            self.refuse_if_draining()
        self._in_flight.add(work)

        def done(result: Any) -> Any:
            self._in_flight.discard(work)
            return result

        work.addBoth(done)
        return work

    def cancellable(self, msg: Mapping[str, Any], work: defer.Deferred[T]) -> defer.Deferred[T]:
        """Let the requester of ``msg`` cancel ``work`` (see the module notes), and :meth:`track`
        it; returns ``work``.

        In the ``request`` protocol this agrees at once with ``{"pid": <this instance>}``.
        """
        self.track(work)
        conv = str(msg.get("conv-id"))
        self._cancellable[conv] = (msg.get("broker-user") or "", work)

        def done(result: Any) -> Any:
            entry = self._cancellable.get(conv)
            if entry is not None and entry[1] is work:
                del self._cancellable[conv]
            return result

        work.addBoth(done)
        if msg.get("protocol") == Protocol.REQUEST and not work.called:
            self.agree(msg, {"pid": self.id}).addErrback(
                lambda f: self._log.info("{pid}: could not agree to {conv}: {e}", pid=self.id, conv=conv,
                                         e=f.getErrorMessage()))
        return work

    def drain_time(self) -> float | None:
        """The ``drain_timeout`` of this service: its module's config, else the class's."""
        value = self.get_config("drain_timeout", type(self).drain_timeout)
        return None if value is None else float(value)

    def slc_drain(self) -> Any:
        """Terminate's first phase: ``draining`` from now on; with a :meth:`drain_time`, the work in
        flight gets that long, then is cancelled (:meth:`drain_in_flight`)."""
        self.draining = True
        timeout = self.drain_time()
        return None if timeout is None else self.drain_in_flight(timeout)

    @defer.inlineCallbacks
    def drain_in_flight(self, timeout: float, *, clock: IReactorTime | None = None,
                        what: str | None = None) -> Generator[defer.Deferred[Any], Any, None]:
        """Wait up to ``timeout`` s for the work in flight (0 or less: not at all), cancel what is still
        running, and fire once the cancelled work has fired too (its clean-up done).

        :param clock: measures ``timeout`` (default: the process's clock).
        :param what: names the work in two log lines (waiting, cancelling); None: no log.
        """
        if timeout > 0 and self._in_flight:
            if what is not None:
                self._log.info("{pid}: stopping; waiting up to {timeout:g} s for {n} {what} in progress",
                               pid=self.id, timeout=timeout, n=len(self._in_flight), what=what)
            waiting = defer.DeferredList([observe(d) for d in self._in_flight], consumeErrors=True)
            waiting.addTimeout(timeout, clock or self.clock, onTimeoutCancel=lambda result, t: None)
            yield waiting
        left = list(self._in_flight)
        if left:
            if what is not None:
                self._log.warn("{pid}: {n} {what} still in progress after {timeout:g} s: cancelling them",
                               pid=self.id, n=len(left), what=what, timeout=timeout)
            for d in left:
                d.cancel()
            yield defer.DeferredList([observe(d) for d in left], consumeErrors=True)

    def op_cancel(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{conv}``: cancel the work of that request; ``{cancelled: bool}``.

        Allowed to the broker user that made the request, and to the system's operators
        (decided on ``broker-user``, never on the forgeable ``sender``); anyone else gets a 403.
        """
        conv = content.get("conv") if isinstance(content, Mapping) else None
        if not isinstance(conv, str):
            raise ApplicationError("cancel takes {conv: <conversation id>}", 400)
        entry = self._cancellable.get(conv)
        if entry is None:
            return {"cancelled": False}
        owner, work = entry
        self.authorize_owner(msg, owner, "cancel", f"request {conv}")
        self._log.info("{pid}: broker user {user!r} ({sender}) cancelled request {conv}", pid=self.id,
                       user=msg.get("broker-user"), sender=msg.get("sender"), conv=conv)
        work.cancel()
        return {"cancelled": True}

    def authorize_owner(self, msg: Mapping[str, Any], owner: str, action: str, target: str) -> None:
        """Let ``msg`` act on something of broker user ``owner``: allowed to ``owner`` itself and
        to the system's operators (see :mod:`ion.core.security`).

        :raises UnauthorizedError: (403), logged once.
        """
        user = msg.get("broker-user")
        # A message published without user_id has no broker user: it owns nothing.
        if not (isinstance(user, str) and user and user == owner):
            authorize(self.container, msg, action, f"{target} of broker user {owner!r}")

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
    #: The error families (roots) whose classes an error reply comes back as (see the module notes).
    errors: ClassVar[tuple[type[ApplicationError], ...]] = ()

    def __init__(self, proc: Process, target: str | None = None) -> None:
        name = target or type(self).service_name
        if not name:
            raise TypeError(f"{type(self).__name__} needs a target or a service_name")
        super().__init__(proc, name)

    def _as_raised(self, failure: Failure) -> Failure:
        """An error reply naming a class of ``errors`` fails the call with that class."""
        received = failure.value
        if isinstance(received, ReceivedError):
            exc = error_from_reply(received, type(self).errors)
            if exc is not None:
                exc.__cause__ = received
                return Failure(exc)
        return failure

    def rpc_send(self, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                 timeout: float | None = None, *, target: str | None = None) -> defer.Deferred[RpcResult]:
        """Call ``op`` of the service (or of ``target``, e.g. the instance holding some state)."""
        d = self.proc.rpc_send(target or self.target, op, content, headers, timeout, trusted=self.trusted)
        return d.addErrback(self._as_raised)

    def request(self, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                timeout: float | None = None, on_agree: Callable[[Any, dict[str, Any]], Any] | None = None,
                ) -> defer.Deferred[RpcResult]:
        return super().request(op, content, headers, timeout, on_agree).addErrback(self._as_raised)

    def call(self, op: str, /, **fields: Any) -> defer.Deferred[Any]:
        """Call ``op`` with ``fields`` as its content; fires with the reply's content.

        The short way to call an op that names its fields (see the notes of
        :mod:`ion.core.process`): ``await client.call("add", by=2)``.
        """
        d = self.rpc_send(op, fields or None)
        d.addCallback(lambda result: result[0])
        return d

    def cancellable_call(self, op: str, content: Any = None, *, target: str | None = None,
                         timeout: float | None = None) -> defer.Deferred[RpcResult]:
        """Call ``op`` (``request`` protocol) so that the work stops when this call ends early.

        Cancelling the returned Deferred, or the call timing out, sends ``cancel`` to the
        instance that agreed to the request (see the module notes).
        """
        agreed: dict[str, str] = {}

        def on_agree(agree_content: Any, agree_headers: dict[str, Any]) -> None:
            pid = agree_content.get("pid") if isinstance(agree_content, Mapping) else None
            if isinstance(pid, str):
                agreed["pid"], agreed["conv"] = pid, str(agree_headers.get("conv-id"))

        call = self.proc.request(target or self.target, op, content, timeout=timeout, on_agree=on_agree,
                                 trusted=self.trusted)

        def cancel_remote() -> None:
            pid = agreed.pop("pid", None)
            if pid is not None:
                self.proc.send(pid, CANCEL_OP, {"conv": agreed["conv"]}).addErrback(
                    lambda f: _log.info("cancel of {op} at {pid} not sent: {e}", op=op, pid=pid,
                                        e=f.getErrorMessage()))

        def canceller(_: defer.Deferred[RpcResult]) -> None:
            cancel_remote()
            call.cancel()  # fires `call`, and so `result`, at once

        def timed_out(failure: Failure) -> Failure:
            if failure.check(ConversationTimeout):
                cancel_remote()
            return failure

        result: defer.Deferred[RpcResult] = defer.Deferred(canceller)
        call.addErrback(timed_out).addErrback(self._as_raised).chainDeferred(result)
        return result


_log = Logger()
