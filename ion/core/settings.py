"""The typed settings of the core's config sections (see :class:`ion.core.config.Settings`).

Each default is declared here once; ``res/config/ion.config`` documents the same values
(``tests/core/test_settings.py`` keeps the two equal). Read through
:meth:`ion.core.config.Config.settings`, once per state of the config's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ion.core.config import Settings, setting
from ion.core.exceptions import ConfigurationError

__all__ = ["ProcessSettings", "MessagingSettings", "ContainerSettings", "AppsSettings", "TraceSettings"]


@dataclass(frozen=True)
class ProcessSettings(Settings):
    """``ion.core.process``: every process's defaults.

    :ivar rpc_timeout: seconds an ``rpc_send``/``request`` waits for its reply unless told otherwise.
    :ivar terminate_timeout: seconds a terminating process waits for the messages it is handling.
    :ivar prefetch: the broker's delivery window of a receiver, unless the process's spawnargs or
        module section set their own (:meth:`ion.core.process.Process.receiver_prefetch`).
    """

    SECTION: ClassVar[str] = "ion.core.process"

    rpc_timeout: float = 15.0
    terminate_timeout: float = 10.0
    prefetch: int = setting(16, minimum=1)


@dataclass(frozen=True)
class MessagingSettings(Settings):
    """``ion.core.messaging``: the wire and the transports.

    :ivar max_message_size: largest encoded message accepted or sent, in bytes.
    :ivar memory_user: the broker login the embedded broker stamps on messages.
    :ivar brokers: the broker URLs of a container whose command line names none (``--broker``,
        ``-h``): empty = the embedded broker; several = the nodes of one cluster, tried in turn.
    :ivar publisher_confirms: AMQP: one-way sends and events ask the broker for a confirm unless
        they say otherwise (requests and replies of conversations never do).
    :ivar reconnect_initial: AMQP: seconds before the first reconnection attempt (doubled after each).
    :ivar reconnect_max: AMQP: the longest wait between two attempts.
    :ivar reconnect_jitter: AMQP: the share of each wait (0-1) drawn at random, so that containers
        do not all reconnect in the same instant after a broker restart; 0: the exact doubling.
    :ivar heartbeat: AMQP heartbeat in seconds (5: a silent host is dropped by the broker, and its
        cache locks freed, within seconds); 0: none; None: what the broker proposes (RabbitMQ: 60).
    :ivar service_queue_type: AMQP: the type of the shared service queues (``<sysname>.<service>``,
        the reaper election's): ``classic`` or ``quorum`` (replicated on the nodes of a cluster, so
        what waits in them survives the loss of a node); None: quorum when the container has more
        than one broker address, else classic. Process-own queues are always classic.
    :ivar quorum_delivery_limit: deliveries of one message from a quorum service queue (its first
        and its redeliveries after a consumer left it unacknowledged) before the broker drops it.
    """

    SECTION: ClassVar[str] = "ion.core.messaging"

    max_message_size: int = setting(16 * 1024 * 1024, minimum=1)
    memory_user: str = "ion"
    brokers: list[str] = field(default_factory=list)
    publisher_confirms: bool = True
    reconnect_initial: float = setting(0.5, positive=True, unit="seconds")
    reconnect_max: float = setting(10.0, positive=True, unit="seconds")
    reconnect_jitter: float = setting(0.5, finite=True)
    heartbeat: float | None = setting(5.0, unit="seconds")
    service_queue_type: str | None = setting(None, choices=("classic", "quorum"))
    quorum_delivery_limit: int = setting(20, minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reconnect_jitter > 1:
            raise ConfigurationError(f"{self.SECTION}: reconnect_jitter must be a number from 0 to 1, "
                                     f"not {self.reconnect_jitter!r}")


@dataclass(frozen=True)
class ContainerSettings(Settings):
    """``ion.core.container``.

    :ivar heartbeat_interval: seconds between the agent's heartbeats.
    :ivar max_threads: threads of the container's blocking pool.
    :ivar agent: whether the container runs its agent (:mod:`ion.core.agent`).
    """

    SECTION: ClassVar[str] = "ion.core.container"

    heartbeat_interval: float = setting(5.0, positive=True, unit="seconds")
    max_threads: int = setting(8, minimum=1)
    agent: bool = True


@dataclass(frozen=True)
class AppsSettings(Settings):
    """``ion.core.apps``: supervision of each app's processes (checked by
    :class:`~ion.core.apps.supervisor.Supervisor`, which names the app).

    :ivar restart_strategy: ``one_for_one``, ``one_for_all`` or ``rest_for_one``.
    :ivar max_restarts: restarts allowed within ``restart_period`` seconds.
    """

    SECTION: ClassVar[str] = "ion.core.apps"

    restart_strategy: str = "one_for_one"
    max_restarts: int = setting(3, minimum=None)
    restart_period: float = setting(5.0, minimum=None)


@dataclass(frozen=True)
class TraceSettings(Settings):
    """``ion.core.trace``: exporting spans.

    :ivar otlp_endpoint: the OTLP/HTTP traces endpoint (``http://collector:4318/v1/traces``);
        None: nothing is exported (and, unless the application set an SDK provider itself,
        no span is made).
    :ivar service_name: the ``service.name`` resource attribute of the exported spans;
        None: ``ion-<sysname>``.
    """

    SECTION: ClassVar[str] = "ion.core.trace"

    otlp_endpoint: str | None = None
    service_name: str | None = None
