"""The generic one-process app: spawns one process class (``mult`` instances) under a supervisor.

App file usage::

    "mod": ("ion.core.apps.processapp", ["hello", "ion.services.hello", "HelloService"], {"k": "v"})

The args are the process name, module and class; the kwargs become its spawnargs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from ion.core.apps.supervisor import Supervisor
from ion.core.process import ProcessDesc
from ion.core.settings import AppsSettings

if TYPE_CHECKING:
    from ion.core.apps.appfile import AppDefinition
    from ion.core.container import Container

__all__ = ["start", "stop", "process_desc"]


def process_desc(app: AppDefinition, kwargs: dict[str, Any] | None = None) -> ProcessDesc:
    """The process an app of this kind runs."""
    args = list(app.args)
    name = args[0] if args else app.name
    module = args[1] if len(args) > 1 else None
    procclass = args[2] if len(args) > 2 else None
    return ProcessDesc(name=name, module=module, procclass=procclass,
                       spawnargs=dict(app.kwargs if kwargs is None else kwargs))


@defer.inlineCallbacks
def start(container: Container, app: AppDefinition, *args: Any, **kwargs: Any) -> Any:
    """Start the app's process(es); returns the supervisor as the app's state."""
    desc = process_desc(app.with_overrides(args=args), kwargs)
    desc.process_class()  # fail before spawning (or supervising) anything if the class cannot be loaded
    settings = container.config.settings(AppsSettings)
    supervisor = Supervisor(
        container, app.name,
        strategy=settings.restart_strategy, max_restarts=settings.max_restarts,
        restart_period=settings.restart_period,
        # The app is down once its supervisor gives up: the app manager forgets it.
        on_give_up=lambda reason: container.app_manager.app_failed(app.name, reason),
    )
    try:
        for _ in range(app.mult):
            yield supervisor.start_child(desc)
    except Exception:
        yield supervisor.stop()
        raise
    return supervisor


def stop(container: Container, state: Supervisor) -> defer.Deferred[None]:
    """Terminate the app's processes in reverse start order."""
    return state.stop()
