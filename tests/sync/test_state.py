"""The training service's state machine, without processes or sockets: events in, phase
out."""

from __future__ import annotations

import pytest

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.sync.state import (
    TRANSITIONS,
    AfterExit,
    Event,
    IllegalTransition,
    Phase,
    TrainingState,
)


def launched(wanted: bool = True) -> TrainingState:
    state = TrainingState(wanted=wanted)
    state.launch()
    return state


def test_every_event_is_decided_in_every_phase() -> None:
    # The worker, the user and the supervisor race: each event must have an answer in each
    # phase, so that adding a phase forces a decision for every event.
    assert set(TRANSITIONS) == set(Event)
    for event, row in TRANSITIONS.items():
        assert set(row) == set(Phase), event


def test_a_pair_missing_from_the_table_raises() -> None:
    state = TrainingState(wanted=True)
    saved = TRANSITIONS[Event.LAUNCH].pop(Phase.IDLE)
    try:
        with pytest.raises(IllegalTransition, match=r"LAUNCH.*'idle'"):
            state.handle(Event.LAUNCH)
    finally:
        TRANSITIONS[Event.LAUNCH][Phase.IDLE] = saved
    assert state.phase is Phase.IDLE


def test_a_worker_runs_its_course_and_finishes() -> None:
    state = launched()
    assert (state.phase, state.detail) == (Phase.STARTING, "starting the worker")
    state.hello()
    state.reported("training", "chunk 3 of 8")
    assert (state.phase, state.detail) == (Phase.TRAINING, "chunk 3 of 8")
    state.round_started(4)
    assert (state.phase, state.detail) == (Phase.SYNCING, "averaging round 4")
    state.round_ended()
    assert (state.phase, state.detail) == (Phase.TRAINING, "averaging round 4")
    assert state.worker_exited(0, "the worker finished", restart=False) is AfterExit.REST
    assert (state.phase, state.detail, state.wanted) == (
        Phase.STOPPED, "the worker finished", False)
    state.rest()
    assert state.phase is Phase.STOPPED, "a finished run stays on show"


def test_a_crash_is_restarted_unless_a_restart_would_repeat_it() -> None:
    state = launched()
    assert state.worker_exited(-9, "killed by SIGKILL", restart=True) is AfterExit.RESTART
    assert (state.phase, state.crashes, state.wanted) == (Phase.CRASHED, 1, True)
    state.restarting_in(2.0)
    assert state.detail == "killed by SIGKILL; restarting in 2 s"
    state.launch()
    assert state.worker_exited(2, "configuration problem", restart=False) is AfterExit.REST
    assert (state.phase, state.crashes, state.wanted) == (Phase.CRASHED, 2, False)
    state.rest()
    assert state.phase is Phase.CRASHED


def test_a_stop_shows_until_the_worker_says_it_stopped() -> None:
    state = launched()
    state.reported("training", None)
    state.stop(worker_running=True)
    assert (state.phase, state.detail) == (Phase.STOPPING, "stopping after the current step")
    state.reported("training", "step 7")
    state.reported("stopping", "saving")
    assert (state.phase, state.detail) == (Phase.STOPPING, "stopping after the current step")
    state.reported("stopped", "saved")
    assert state.phase is Phase.STOPPED
    assert state.worker_exited(0, "the worker finished", restart=False) is AfterExit.REST
    assert (state.phase, state.detail) == (Phase.STOPPED, "stopped on request")


def test_a_stop_without_a_worker_and_a_start_again() -> None:
    state = TrainingState(wanted=False)
    state.rest()
    assert state.phase is Phase.IDLE
    state.stop(worker_running=False)
    assert (state.phase, state.detail) == (Phase.STOPPED, "stopped on request")
    state.start()
    assert (state.wanted, state.stop_asked) == (True, False)
    state.launch()
    assert state.phase is Phase.STARTING


def test_a_start_while_the_stopped_worker_exits_starts_a_new_one() -> None:
    state = launched()
    state.stop(worker_running=True)
    state.reported("stopped", "saved")
    state.start()
    assert state.worker_exited(0, "the worker finished", restart=False) is AfterExit.REPLACE
    assert state.wanted and not state.stop_asked
    state.launch()


def test_joining_another_run_replaces_the_worker_without_a_crash() -> None:
    state = launched()
    state.join(replacing_worker=True)
    assert state.worker_exited(0, "the worker finished", restart=False) is AfterExit.REPLACE
    assert (state.phase, state.wanted, state.crashes) == (Phase.STARTING, True, 0)
    state.launch()


def test_what_cannot_start_rests_and_a_node_without_torch_says_why() -> None:
    state = TrainingState(wanted=True)
    state.cannot_start("no run to train")
    assert (state.phase, state.detail, state.wanted) == (Phase.IDLE, "no run to train", False)
    state.wanted = True
    state.cannot_start("torch is not installed", torch_missing=True)
    assert state.phase is Phase.UNAVAILABLE
    state.cannot_start("no run to train")
    assert (state.phase, state.detail) == (Phase.UNAVAILABLE, "no run to train")
    state.rest()
    assert (state.phase, state.detail) == (Phase.IDLE, "no run to train")


def test_draining_stops_the_worker_and_refuses_a_start() -> None:
    state = launched()
    state.drain(worker_running=True)
    assert (state.phase, state.draining, state.wanted, state.stop_asked) == (
        Phase.STOPPING, True, False, True)
    with pytest.raises(ConfigError, match="stopping"):
        state.start()
    assert state.worker_exited(0, "the worker finished", restart=False) is AfterExit.REST
    assert (state.phase, state.detail) == (Phase.STOPPED, "stopped on request")


def test_the_supervisor_cannot_launch_what_is_not_wanted_nor_see_a_ghost_exit() -> None:
    with pytest.raises(IllegalTransition, match="wanted"):
        TrainingState(wanted=False).launch()
    with pytest.raises(IllegalTransition, match="none runs"):
        launched().launch()
    with pytest.raises(IllegalTransition, match="never launched"):
        TrainingState(wanted=True).worker_exited(1, "crashed", restart=True)


def test_reports_of_unknown_states_are_ignored_and_details_bounded() -> None:
    state = launched()
    state.reported("dancing", "x")
    state.reported(["training"], "x")
    assert (state.phase, state.detail) == (Phase.STARTING, "starting the worker")
    state.reported("syncing", "y" * 5000)
    assert state.phase is Phase.SYNCING and len(state.detail) == 2000
