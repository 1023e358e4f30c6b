# The observer: one log line per message of the system (a debugging aid).
# A request to a name nobody serves then times out instead of failing at once
# with 404, since the observer's queue takes a copy of it.
{
    "type": "application",
    "name": "observer",
    "description": "Logs one line per message of the system",
    "version": "0.1",
    "mod": ("ion.core.apps.processapp", ["observer", "ion.core.observer", "ObserverProcess"], {}),
    "applications": [],
    "config": {"ion.core.observer": {"events": False}},
}
