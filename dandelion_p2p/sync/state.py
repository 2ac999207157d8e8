"""What the training service is doing, as a pure state machine: events in, phase out.

The phase is what ``training.status`` shows. Events come from three sides that act at the
same time: the supervisor (a worker launched, exited, could not start), the user
(``training.stop``, ``run.join``, the daemon stopping) and the worker itself (hello, its
progress reports, a round, a catch-up). Because they race (a worker can crash while the
daemon still finishes its round; a hand-started worker reports whatever it does), most events
are possible in every phase: ``TRANSITIONS`` says, in one table, where each one leads from
each phase. A pair the table does not list raises ``IllegalTransition``.

Beside the phase the machine holds the intent that steers the supervisor: whether a worker
is wanted, whether the user asked it to stop, whether it is being replaced for another run,
whether the daemon is stopping. No I/O, no clock: it is tested without processes or sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum, StrEnum, auto

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker.protocol import MAX_DETAIL


class Phase(StrEnum):
    IDLE = "idle"
    UNAVAILABLE = "unavailable"
    """This node cannot train (no torch): it still relays, stores and averages."""
    STARTING = "starting"
    TRAINING = "training"
    SYNCING = "syncing"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


class Event(Enum):
    # The supervisor.
    REST = auto()
    """No worker is wanted, and nobody asked one to stop."""
    REST_AFTER_STOP = auto()
    """No worker is wanted since the user (or the daemon) stopped it."""
    NO_TORCH = auto()
    CANNOT_START = auto()
    """No run to train, a bad run config, a missing data folder."""
    LAUNCH = auto()
    EXIT_ON_REQUEST = auto()
    EXIT_FINISHED = auto()
    EXIT_CRASHED = auto()
    # The user and the daemon.
    STOP = auto()
    """``training.stop`` while a worker runs: it ends its step first."""
    STOP_IDLE = auto()
    """``training.stop`` with no worker process to stop."""
    DRAIN = auto()
    # The worker.
    HELLO = auto()
    CATCH_UP = auto()
    ROUND_START = auto()
    ROUND_END = auto()
    REPORT_STARTING = auto()
    REPORT_TRAINING = auto()
    REPORT_SYNCING = auto()
    REPORT_STOPPING = auto()
    REPORT_STOPPED = auto()


REPORTS: dict[str, Event] = {
    "starting": Event.REPORT_STARTING,
    "training": Event.REPORT_TRAINING,
    "syncing": Event.REPORT_SYNCING,
    "stopping": Event.REPORT_STOPPING,
    "stopped": Event.REPORT_STOPPED,
}
"""The states a worker reports in ``worker.progress`` (``protocol.WORKER_STATES``)."""


def _every(target: Phase, *, keep: Iterable[Phase] = (),
           ignore: Iterable[Phase] = ()) -> dict[Phase, Phase | None]:
    """From every phase to ``target``; ``keep``: stays (its detail may change); ``ignore``:
    the event changes nothing there, not even the detail."""
    kept, ignored = set(keep), set(ignore)
    return {phase: None if phase in ignored else phase if phase in kept else target
            for phase in Phase}


TRANSITIONS: dict[Event, dict[Phase, Phase | None]] = {
    # A crash or a finished run stays on show until something new happens. A node without
    # torch rests as "idle" too, its detail saying why.
    Event.REST: _every(Phase.IDLE, keep=(Phase.STOPPED, Phase.CRASHED)),
    Event.REST_AFTER_STOP: _every(Phase.STOPPED, keep=(Phase.CRASHED,)),
    Event.NO_TORCH: _every(Phase.UNAVAILABLE),
    # A node without torch stays unavailable whatever else is missing.
    Event.CANNOT_START: _every(Phase.IDLE, keep=(Phase.UNAVAILABLE,)),
    Event.LAUNCH: _every(Phase.STARTING),
    Event.EXIT_ON_REQUEST: _every(Phase.STOPPED),
    Event.EXIT_FINISHED: _every(Phase.STOPPED),
    Event.EXIT_CRASHED: _every(Phase.CRASHED),
    Event.STOP: _every(Phase.STOPPING),
    Event.STOP_IDLE: _every(Phase.STOPPED),
    Event.DRAIN: _every(Phase.STOPPING),
    Event.HELLO: _every(Phase.STARTING),
    Event.CATCH_UP: _every(Phase.STARTING),
    # A round the daemon finishes with its group after the worker died (or was told to
    # stop) still ends in "training": the supervisor's next event corrects it.
    Event.ROUND_START: _every(Phase.SYNCING),
    Event.ROUND_END: _every(Phase.TRAINING),
    # While stopping, the user's stop stays on show until the worker says it stopped.
    Event.REPORT_STARTING: _every(Phase.STARTING, ignore=(Phase.STOPPING,)),
    Event.REPORT_TRAINING: _every(Phase.TRAINING, ignore=(Phase.STOPPING,)),
    Event.REPORT_SYNCING: _every(Phase.SYNCING, ignore=(Phase.STOPPING,)),
    Event.REPORT_STOPPING: _every(Phase.STOPPING, ignore=(Phase.STOPPING,)),
    Event.REPORT_STOPPED: _every(Phase.STOPPED),
}


class IllegalTransition(Exception):
    """A local bug: an event the state machine does not allow in the current phase or
    intent."""


class AfterExit(Enum):
    """What the supervisor does once the worker process has exited."""

    REPLACE = auto()
    """It was stopped to train another run: start the next worker now."""
    REST = auto()
    """Stopped on request, finished, or a crash a restart would only repeat."""
    RESTART = auto()
    """It crashed: start it again after a delay."""


class TrainingState:
    """The phase, its detail, and the intent behind them; see the module's docstring."""

    def __init__(self, *, wanted: bool) -> None:
        self.phase = Phase.IDLE
        self.detail = ""
        self.wanted = wanted
        """A worker should run (the daemon's ``worker`` setting, ``training.start``)."""
        self.stop_asked = False
        """The user or the daemon asked the worker to stop: it is told so in progress
        answers, and its exit is not a crash."""
        self.replacing = False
        """The running worker was asked to stop so that one for another run can start."""
        self.draining = False
        """The daemon is stopping: nothing starts again."""
        self.crashes = 0
        self.launched = False
        """A worker process started by the supervisor is running."""

    def handle(self, event: Event, detail: str | None = None) -> Phase:
        """Apply ``event``; ``detail`` (when given) says more. Returns the new phase.

        Raises:
            IllegalTransition: the table has no transition for ``event`` in this phase.
        """
        try:
            target = TRANSITIONS[event][self.phase]
        except KeyError:
            raise IllegalTransition(
                f"{event.name} is not allowed in phase {self.phase.value!r}") from None
        if target is None:
            return self.phase
        self.phase = target
        if detail is not None:
            self.detail = detail[:MAX_DETAIL]
        return self.phase

    # ------------------------------------------------------------------ the supervisor

    def rest(self) -> None:
        """Nothing to run: shown as stopped (after a stop) or idle, a crash left on show."""
        self.handle(Event.REST_AFTER_STOP if self.stop_asked else Event.REST)

    def cannot_start(self, problem: str, *, torch_missing: bool = False) -> None:
        """The worker cannot start for ``problem``: no worker is wanted until asked again."""
        self.handle(Event.NO_TORCH if torch_missing else Event.CANNOT_START, problem)
        self.wanted = False

    def launch(self) -> None:
        """Raises: IllegalTransition: no worker is wanted, or one already runs."""
        if not self.wanted or self.launched:
            raise IllegalTransition("a worker is launched only when one is wanted and none runs")
        self.launched = True
        self.handle(Event.LAUNCH, "starting the worker")

    def worker_exited(self, code: int, detail: str, restart: bool) -> AfterExit:
        """The launched worker exited with ``code`` (``detail``: why, for the user;
        ``restart``: whether starting it again may help).

        Raises:
            IllegalTransition: no worker was launched.
        """
        if not self.launched:
            raise IllegalTransition("a worker exited that was never launched")
        self.launched = False
        if self.replacing:
            self.replacing = False
            return AfterExit.REPLACE
        if self.stop_asked:
            self.handle(Event.EXIT_ON_REQUEST, "stopped on request")
            self.wanted = False
            return AfterExit.REST
        if code == 0:
            self.handle(Event.EXIT_FINISHED, detail)
            self.wanted = False
            return AfterExit.REST
        self.crashes += 1
        self.handle(Event.EXIT_CRASHED, detail)
        if not restart:
            self.wanted = False
            return AfterExit.REST
        return AfterExit.RESTART

    def restarting_in(self, seconds: float) -> None:
        self.detail += f"; restarting in {seconds:g} s"

    # ------------------------------------------------------------------ the user, the daemon

    def start(self) -> None:
        """``training.start``.

        Raises:
            ConfigError: the daemon is stopping.
        """
        if self.draining:
            raise ConfigError("the daemon is stopping")
        if self.launched and self.stop_asked:
            # The stopped worker has not exited yet: its exit must not read as the end of
            # the run, which would leave this start unanswered.
            self.replacing = True
        self.wanted, self.stop_asked = True, False

    def stop(self, *, worker_running: bool) -> None:
        """``training.stop``: a running worker ends its step and writes a checkpoint."""
        self.wanted, self.stop_asked = False, True
        if worker_running:
            self.handle(Event.STOP, "stopping after the current step")
        else:
            self.handle(Event.STOP_IDLE, "stopped on request")

    def join(self, *, replacing_worker: bool) -> None:
        """``run.join``: train the new run, replacing the running worker if there is one."""
        if replacing_worker:
            self.replacing = True
        self.wanted, self.stop_asked = True, False

    def drain(self, *, worker_running: bool) -> None:
        """The daemon is stopping: the worker ends its step, nothing starts again."""
        self.draining = True
        self.wanted, self.stop_asked = False, True
        if worker_running:
            self.handle(Event.DRAIN, "the daemon is stopping: the worker ends its step")

    # ------------------------------------------------------------------ the worker

    def hello(self) -> None:
        self.handle(Event.HELLO, "the worker is loading the model and data")

    def reported(self, state: object, detail: object) -> None:
        """A ``worker.progress`` report; a state the protocol does not name is ignored."""
        event = REPORTS.get(state) if isinstance(state, str) else None
        if event is not None:
            self.handle(event, detail if isinstance(detail, str) else None)

    def catching_up(self) -> None:
        self.handle(Event.CATCH_UP, "looking for the swarm's current state")

    def round_started(self, round_: int) -> None:
        self.handle(Event.ROUND_START, f"averaging round {round_}")

    def round_ended(self) -> None:
        self.handle(Event.ROUND_END)
