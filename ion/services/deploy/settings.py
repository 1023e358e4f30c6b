"""The ``ion.services.deploy`` config section as typed settings (see :class:`ion.core.config.Settings`).

The security bounds of the section (``allowed_destinations``, ``allowed_file_repositories``,
``max_deployment_bytes``) are not here: the service reads them with ``bounded_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ion.core.config import Settings, setting

__all__ = ["DeploySettings"]


@dataclass(frozen=True)
class DeploySettings(Settings):
    """``ion.services.deploy``.

    :ivar max_parallel: items fetched at once.
    :ivar job_retention: seconds a finished async job's record is kept.
    :ivar fetch_timeout: seconds the service waits for one fetch.
    :ivar drain_timeout: seconds the deployments in progress get when the service stops (None: 0).
    :ivar job_dir: folder of the durable job records; None: ``<cache root>/jobs``; False: memory only.
    :ivar max_concurrent: requests the service handles at once.
    :ivar takeover_interval: seconds between two scans of the job records for jobs whose owner died
        (taken over by this instance); 0 or None: this instance takes no job over.
    :ivar takeover_grace: seconds an owner must stay judged gone (on two scans that far apart at
        least) before its jobs are taken over; None: ``takeover_interval``. A live owner whose
        broker node died reconnects to another node within this, or loses its jobs (it then stops
        its part): raise it where reconnections are slow.
    :ivar max_takeovers: takeovers an async job may have; its owner dying once more ends it REMOTE_ERROR.
    :ivar takeover_settle: seconds this container's connection to the broker must have been up before
        an owner whose process queue has no consumer counts as gone (None: ``reconnect_max`` of
        ``ion.core.messaging`` plus 10 s): after a broker restart or a blip of our own, live owners
        may still be reconnecting, and taking their jobs would run each twice.
    :ivar keep_generations: generations kept per deployment file (``<cache root>/generations``),
        whose cache entries the reaper never evicts; at least 1.
    """

    SECTION: ClassVar[str] = "ion.services.deploy"

    max_parallel: int = 8
    job_retention: float = 3600.0
    fetch_timeout: float = 3600.0
    drain_timeout: float | None = 30.0
    job_dir: str | bool | None = None
    max_concurrent: int = 16
    takeover_interval: float | None = 2.0
    takeover_grace: float | None = None
    max_takeovers: int = 3
    takeover_settle: float | None = None
    keep_generations: int = setting(3, positive=True)
