"""App supervisors: OTP-style restarts, restart limits in a time window, and giving up.

These run on a :class:`ion.testing.ClockedSystem` (a container on a ``task.Clock``):
restart windows are measured with ``container.clock.seconds()``, so the tests
move time with ``advance`` and never sleep.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from ion.core.apps.supervisor import Supervisor
from ion.core.exceptions import AppError, ConfigurationError
from ion.core.lifecycle import State
from ion.core.process import ProcessDesc
from ion.testing import ClockedSystem
from tests.core import apps_fixtures as fx
from tests.core.apps_fixtures import write_app


@pytest.fixture(autouse=True)
def _clean_fixture_state():
    fx.reset()
    yield
    fx.reset()


def make_system(tmp_path: Path, *, strategy: str = "one_for_one", max_restarts: int = 3,
                restart_period: float = 5.0) -> ClockedSystem:
    """A clocked container whose app supervisors use these settings, finding apps in tmp_path/apps."""
    system = ClockedSystem(config={"ion.core.apps": {
        "restart_strategy": strategy, "max_restarts": max_restarts, "restart_period": restart_period}})
    system.container.app_manager.search_path.insert(0, tmp_path / "apps")
    return system


def start_app(system: ClockedSystem, tmp_path: Path, name: str = "w", *, mult: int = 1,
              procclass: str = "Recorder") -> Supervisor:
    """Start a processapp of ``mult`` test processes; returns its supervisor."""
    write_app(tmp_path / "apps", name, procclass=procclass)
    system.result(system.container.app_manager.start_app(name, mult=mult))
    return system.container.app_manager.running[name].state


def proc(system: ClockedSystem, pid: str):
    return system.container.proc_manager.get(pid)


def kill_with_error(system: ClockedSystem, pid: str, message: str = "boom") -> None:
    """Put a child in ERROR, as a failing hook or a lost resource would, and let the system settle."""
    p = proc(system, pid)
    p.error(RuntimeError(message))
    assert p.state is State.ERROR
    system.pump()


def teardown_system(system: ClockedSystem) -> None:
    system.result(system.container.terminate())


# ---------------------------------------------------------------------------------------------------
# one_for_one
# ---------------------------------------------------------------------------------------------------
def test_one_for_one_restarts_only_the_dead_child(tmp_path):
    """A child that goes to ERROR is restarted with a new pid; its sibling keeps running untouched."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path, mult=2)
    first, second = sup.pids
    kill_with_error(system, first)
    new_first, still_second = sup.pids
    assert new_first != first and still_second == second
    assert proc(system, new_first).state is State.ACTIVE
    assert proc(system, first) is None
    assert fx.event_pids("activate") == [first, second, new_first]
    assert fx.event_pids("terminate") == []  # the sibling was never stopped
    teardown_system(system)


def test_child_whose_hook_fails_is_restarted(tmp_path):
    """A child whose lifecycle hook fails (deactivate here) ends in ERROR and is restarted."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path)
    (pid,) = sup.pids
    child = proc(system, pid)
    child.slc_deactivate = lambda: 1 / 0
    with pytest.raises(ZeroDivisionError):
        system.result(child.deactivate())
    system.pump()
    (new_pid,) = sup.pids
    assert new_pid != pid and proc(system, new_pid).state is State.ACTIVE
    teardown_system(system)


def test_child_terminated_on_request_is_not_restarted(tmp_path):
    """A child terminated through the process manager stays down; the app keeps running."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path, mult=2)
    first, second = sup.pids
    system.result(system.container.proc_manager.terminate_process(first))
    system.pump()
    assert sup.pids == [second]
    assert fx.events("activate") == ["w", "w"]
    assert "w" in system.container.app_manager.running
    teardown_system(system)


def test_child_terminated_by_op_terminate_is_not_restarted(tmp_path):
    """A child told to terminate by message (op_terminate) is not restarted."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path)
    (pid,) = sup.pids
    client = system.spawn(fx.Recorder, {"label": "client"})
    content, _ = system.result(client.rpc_send(pid, "terminate"))
    assert content == {"terminating": pid}
    system.pump()
    assert proc(system, pid) is None
    assert sup.pids == []
    assert fx.events("activate") == ["w", "client"]
    teardown_system(system)


def test_child_failing_while_terminated_on_request_is_not_restarted(tmp_path):
    """A child asked to terminate whose terminate hook fails ends in ERROR but is not restarted."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path, procclass="BadTerminate")
    (pid,) = sup.pids
    with pytest.raises(RuntimeError, match="cannot let go"):
        system.result(system.container.proc_manager.terminate_process(pid))
    system.pump()
    assert sup.pids == []
    assert fx.events("activate") == ["w"]
    teardown_system(system)


def test_child_terminating_itself_is_not_restarted(tmp_path):
    """A child that terminates itself normally (TERMINATED, not ERROR) is not restarted."""
    system = make_system(tmp_path)
    sup = start_app(system, tmp_path)
    (pid,) = sup.pids
    system.result(proc(system, pid).terminate())
    system.pump()
    assert sup.pids == []
    assert fx.events("activate") == ["w"]
    teardown_system(system)


# ---------------------------------------------------------------------------------------------------
# restart limits
# ---------------------------------------------------------------------------------------------------
def test_too_many_restarts_stop_the_app_with_a_logged_reason(tmp_path):
    """Past max_restarts within restart_period, every process of the app stops and the reason is logged."""
    system = make_system(tmp_path, max_restarts=2, restart_period=10)
    sup = start_app(system, tmp_path, mult=2)
    pids_before = list(sup.pids)
    with capturedLogs() as events:
        for _ in range(2):
            kill_with_error(system, sup.pids[0])
            system.advance(1)
        assert len(sup.pids) == 2  # restarted twice: still within the limit
        kill_with_error(system, sup.pids[0], "boom for good")
    assert sup.failed is not None
    assert sup.pids == []
    assert not any(isinstance(p, fx.Recorder) for p in system.container.proc_manager.processes.values())
    assert "w" not in system.container.app_manager.running
    assert "keeps dying" in system.container.app_manager.failed["w"]
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert any("app w" in e and "keeps dying" in e and "boom for good" in e for e in errors), errors
    # The untouched sibling was stopped too, the last started first.
    assert pids_before[1] in fx.event_pids("terminate")
    teardown_system(system)


def test_give_up_calls_on_give_up_with_the_reason(tmp_path):
    """A supervisor with max_restarts 0 gives up on the first death and calls on_give_up once."""
    system = make_system(tmp_path)
    reasons: list[str] = []
    sup = Supervisor(system.container, "direct", max_restarts=0, on_give_up=reasons.append)
    pid = system.result(sup.start_child(ProcessDesc(name="r", cls=fx.Recorder, spawnargs={"label": "r"})))
    kill_with_error(system, pid, "fatal")
    assert len(reasons) == 1
    assert "app direct" in reasons[0] and "fatal" in reasons[0]
    assert sup.pids == [] and sup.failed == reasons[0]
    teardown_system(system)


@pytest.mark.parametrize("gap, gives_up", [(6.0, False), (4.0, True)])
def test_restarts_older_than_the_period_do_not_count(tmp_path, gap, gives_up):
    """With max_restarts 1 in 5 s, two deaths 6 s apart are both restarted; 4 s apart the app gives up."""
    system = make_system(tmp_path, max_restarts=1, restart_period=5)
    sup = start_app(system, tmp_path)
    kill_with_error(system, sup.pids[0])
    assert len(sup.pids) == 1
    system.advance(gap)
    kill_with_error(system, sup.pids[0])
    assert (sup.failed is not None) is gives_up
    assert len(sup.pids) == (0 if gives_up else 1)
    assert ("w" in system.container.app_manager.running) is not gives_up
    teardown_system(system)


def test_failed_restart_is_retried(tmp_path):
    """A restart whose new process fails to start counts as a death and is tried again."""
    system = make_system(tmp_path, max_restarts=3)
    sup = start_app(system, tmp_path, procclass="Flaky")
    fx.FAIL_INITS["count"] = 1
    kill_with_error(system, sup.pids[0])
    assert fx.FAIL_INITS["count"] == 0
    assert len(sup.pids) == 1 and proc(system, sup.pids[0]).state is State.ACTIVE
    assert len(sup.restarts) == 2
    teardown_system(system)


def test_restart_that_never_succeeds_gives_up(tmp_path):
    """A child that can never be started again takes the app down, rather than leaving it empty."""
    system = make_system(tmp_path, max_restarts=3)
    sup = start_app(system, tmp_path, procclass="Flaky")
    fx.FAIL_INITS["count"] = 100
    kill_with_error(system, sup.pids[0])
    assert sup.failed is not None and "could not be restarted" in sup.failed
    assert fx.FAIL_INITS["count"] == 100 - 3  # tried max_restarts times, then gave up
    assert "w" not in system.container.app_manager.running
    teardown_system(system)


def test_app_can_start_again_after_giving_up(tmp_path):
    """An app whose supervisor gave up can be started again (with fresh processes)."""
    system = make_system(tmp_path, max_restarts=0)
    sup = start_app(system, tmp_path)
    kill_with_error(system, sup.pids[0])
    assert "w" not in system.container.app_manager.running
    system.result(system.container.app_manager.start_app("w"))
    assert len(system.container.app_manager.running["w"].state.pids) == 1
    assert "w" not in system.container.app_manager.failed
    teardown_system(system)


# ---------------------------------------------------------------------------------------------------
# one_for_all and rest_for_one
# ---------------------------------------------------------------------------------------------------
def test_one_for_all_restarts_every_child(tmp_path):
    """one_for_all: one death restarts every child; the others stop in reverse start order first."""
    system = make_system(tmp_path, strategy="one_for_all")
    sup = start_app(system, tmp_path, mult=3)
    a, b, c = sup.pids
    kill_with_error(system, b)
    new = sup.pids
    assert len(new) == 3 and not set(new) & {a, b, c}
    assert fx.event_pids("terminate") == [c, a]
    assert fx.event_pids("activate")[3:] == new
    teardown_system(system)


def test_one_for_all_does_not_revive_a_child_terminated_on_request(tmp_path):
    """one_for_all: a child stopped on request earlier stays stopped when a sibling's death restarts the rest."""
    system = make_system(tmp_path, strategy="one_for_all")
    sup = start_app(system, tmp_path, mult=3)
    a, b, c = sup.pids
    system.result(system.container.proc_manager.terminate_process(a))
    kill_with_error(system, b)
    assert len(sup.pids) == 2 and not set(sup.pids) & {a, b, c}
    assert len(sup.children) == 2
    teardown_system(system)


def test_rest_for_one_restarts_the_dead_child_and_those_after_it(tmp_path):
    """rest_for_one: the dead child and the ones started after it restart; earlier ones stay."""
    system = make_system(tmp_path, strategy="rest_for_one")
    sup = start_app(system, tmp_path, mult=3)
    a, b, c = sup.pids
    kill_with_error(system, b)
    new_a, new_b, new_c = sup.pids
    assert new_a == a
    assert new_b not in (a, b, c) and new_c not in (a, b, c)
    assert fx.event_pids("terminate") == [c]
    teardown_system(system)


def test_rest_for_one_death_of_the_last_child_restarts_only_it(tmp_path):
    """rest_for_one: when the last child dies, the others are untouched."""
    system = make_system(tmp_path, strategy="rest_for_one")
    sup = start_app(system, tmp_path, mult=3)
    a, b, c = sup.pids
    kill_with_error(system, c)
    assert sup.pids[:2] == [a, b] and sup.pids[2] != c
    assert fx.event_pids("terminate") == []
    teardown_system(system)


def test_unknown_strategy_is_refused(tmp_path):
    """An unknown restart strategy is refused when the app starts, naming the strategy."""
    system = make_system(tmp_path, strategy="one_for_some")
    write_app(tmp_path / "apps", "w")
    with pytest.raises(AppError, match="one_for_some"):
        system.result(system.container.app_manager.start_app("w"))
    assert fx.EVENTS == []
    with pytest.raises(ConfigurationError, match="max_restarts"):
        Supervisor(system.container, "x", max_restarts=-1)
    teardown_system(system)


# ---------------------------------------------------------------------------------------------------
# stopping
# ---------------------------------------------------------------------------------------------------
def test_stop_terminates_children_in_reverse_and_ends_supervision(tmp_path):
    """Supervisor.stop terminates its children last-started first; nothing is restarted afterwards."""
    system = make_system(tmp_path)
    sup = Supervisor(system.container, "direct")
    pids = [system.result(sup.start_child(ProcessDesc(name=f"r{i}", cls=fx.Recorder))) for i in range(3)]
    survivor = system.spawn(fx.Recorder, {"label": "unsupervised"})
    system.result(sup.stop())
    assert fx.event_pids("terminate") == pids[::-1]
    assert sup.pids == []
    survivor.error(RuntimeError("not supervised"))
    system.pump()
    assert fx.events("activate").count("unsupervised") == 1
    teardown_system(system)


def test_start_child_that_fails_is_not_kept(tmp_path):
    """A child that fails to start raises to the caller and is not supervised."""
    system = make_system(tmp_path)
    sup = Supervisor(system.container, "direct")
    fx.FAIL_INITS["count"] = 1
    with pytest.raises(RuntimeError, match="flaky init"):
        system.result(sup.start_child(ProcessDesc(name="f", cls=fx.Flaky)))
    assert sup.children == [] and len(sup.restarts) == 0
    teardown_system(system)
