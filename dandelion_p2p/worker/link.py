"""The worker's connection to its daemon, or to nobody when it trains alone.

With a daemon, control messages are methods on the daemon's control socket
(``protocol/worker.md``) and the vector to average lies in a ``SharedVector`` both map.
Alone, ``SoloLink`` plays the daemon's part: every sync is a round of one.

Either way the link holds the versions of the run's config the worker knows
(``run_configs``); the daemon adds new ones to its answers, and the trainer switches to the
version in force at a round boundary and says which it trains under (``round_config``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dandelion_p2p.control.client import call_sync
from dandelion_p2p.errors import ConfigError, PeerUnavailable
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.runconfig.timeline import ConfigTimeline
from dandelion_p2p.worker import protocol
from dandelion_p2p.worker.protocol import ConfigVersion
from dandelion_p2p.worker.shm import SharedVector

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
CALL_MARGIN = 30.0
CHUNK_FETCH_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    round: int
    averaged: bool
    """False when no other peer joined (the buffer holds this peer's own values)."""
    fraction_averaged: float
    members: int
    seconds: float
    behind: bool = False
    """The swarm trained this round under a config version this worker did not have: it is
    behind, and catches up."""
    stopping: bool = False
    """The daemon is stopping and cut the round short: nothing was averaged."""
    left_behind: bool = False
    """The others finished this round without this peer: they took a step it did not, and
    it waits for their state (``joining.catch_up_and_join``)."""


class Link(Protocol):
    run: str
    run_config_toml: str
    run_configs: ConfigTimeline[ConfigVersion]
    """The versions of the run's config this worker knows."""

    def round_config(self, version: int, first_step: int) -> None:
        """The config version the rounds from global step ``first_step`` train under (told
        to the daemon with each sync, which averages only with peers on the same version)."""
        ...

    def buffer(self, elements: int) -> np.ndarray: ...

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        """Average the shared buffer (``span``: only its elements [start, stop), a streaming
        fragment) with the swarm's round ``round_``."""
        ...

    def progress(self, fields: dict[str, Any], force: bool = False) -> bool:
        """Report progress; True when the daemon asks the worker to stop."""
        ...

    def catch_up(self, have_step: int, checkpoints: Path, wait: bool = False,
                 leave_out: Sequence[str] = ()) -> int:
        """Have the swarm's state put into ``checkpoints`` when peers are ahead of
        ``have_step``; returns the step downloaded, or -1. ``wait``: give a daemon that just
        started a few seconds to find its peers. ``leave_out``: the checkpoint's files this
        worker can do without (``sync/partial_state``)."""
        ...

    def close(self) -> None: ...


class SoloLink:
    """Training with no swarm: the run config comes from a file, rounds have one member."""

    def __init__(self, run_config: Path) -> None:
        try:
            self.run_config_toml = Path(run_config).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read run config {run_config}: {exc.strerror}") from None
        self.run = ""
        self.run_configs: ConfigTimeline[ConfigVersion] = ConfigTimeline()
        self.run_configs.add(ConfigVersion(0, 0, self.run_config_toml,
                                           loads(self.run_config_toml)))
        self._buffer = np.empty(0, dtype=np.float32)

    def round_config(self, version: int, first_step: int) -> None:
        pass

    def buffer(self, elements: int) -> np.ndarray:
        self._buffer = np.zeros(elements, dtype=np.float32)
        return self._buffer

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        return SyncOutcome(round_, False, 0.0, 1, 0.0)

    def progress(self, fields: dict[str, Any], force: bool = False) -> bool:
        return False

    def catch_up(self, have_step: int, checkpoints: Path, wait: bool = False,
                 leave_out: Sequence[str] = ()) -> int:
        return -1

    def close(self) -> None:
        pass


class DaemonLink:
    """Talks to the daemon on ``socket``.

    Raises (from the constructor and every method):
        PeerUnavailable: the daemon is not running or went away.
        CommandFailed: the daemon refused (another worker holds the session, no run, ...).
    """

    def __init__(self, socket: Path, sync_timeout: float = 3600.0,
                 connect_timeout: float = 30.0) -> None:
        self.socket = Path(socket)
        self.sync_timeout = sync_timeout
        hello = self._hello(connect_timeout)
        if hello.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ConfigError(
                f"the daemon speaks worker protocol {hello.get('protocol')}, this worker "
                f"{protocol.PROTOCOL_VERSION}: update one of them"
            )
        self.session: str = hello["session"]
        self.run: str = hello["run"]
        self.peer: str = hello.get("peer", "")
        self.run_config_toml: str = hello["run_config"]
        self.run_configs: ConfigTimeline[ConfigVersion] = ConfigTimeline()
        self._learn(hello.get("run_configs"))
        self._round_config = (0, 0)
        self._unlearned: list[Any] = []
        self._shared: SharedVector | None = None
        self._last_progress = 0.0

    def _learn(self, run_configs: Any) -> None:
        for entry in protocol.decode_run_configs(run_configs):
            refused = self.run_configs.add(entry)
            if refused is not None:
                log.warning("run config version %d refused: %s", entry.version, refused)

    def round_config(self, version: int, first_step: int) -> None:
        self._round_config = (version, first_step)

    def _hello(self, connect_timeout: float) -> dict[str, Any]:
        """Say hello, waiting a while for a daemon that is still starting."""
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                return call_sync(self.socket, protocol.HELLO,
                                 {"protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid()})
            except PeerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def buffer(self, elements: int) -> np.ndarray:
        answer = call_sync(self.socket, protocol.BUFFER,
                           {"session": self.session, "elements": elements})
        self._shared = SharedVector(Path(answer["path"]), elements, create=False)
        return self._shared.array

    def sync(self, round_: int, weight: float, kind: str, *,
             config: tuple[int, int] | None = None, learn: bool = True,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        """``config``: the (version, first step) the round trained under, when not the last
        ``round_config`` (a round averaged while the next one trains, ``overlap``).
        ``learn=False``: keep the answer's new versions for ``learn_pending``, so that a round
        on another thread never changes ``run_configs`` while the trainer reads it."""
        started = time.monotonic()
        version, first_step = config if config is not None else self._round_config
        newest = self.run_configs.newest()
        answer = call_sync(
            self.socket,
            protocol.SYNC,
            {"session": self.session, "round": round_, "weight": float(weight), "kind": kind,
             "config_version": version, "step": first_step,
             "known_version": newest.version if newest is not None else 0,
             **({"span": list(span)} if span is not None else {})},
            timeout=self.sync_timeout,
        )
        # A daemon that is stopping answers before looking at versions: nothing new then.
        if learn:
            self._learn(answer.get("run_configs", []))
        else:
            self._unlearned.append(answer.get("run_configs", []))
        return SyncOutcome(
            round=round_,
            averaged=bool(answer["averaged"]),
            fraction_averaged=float(answer["fraction_averaged"]),
            members=int(answer["members"]),
            seconds=time.monotonic() - started,
            behind=answer.get("behind") is True,
            stopping=answer.get("stopping") is True,
            left_behind=answer.get("left_behind") is True,
        )

    def round_config_now(self) -> tuple[int, int]:
        """The (version, first step) the next ``sync`` would send."""
        return self._round_config

    def learn_pending(self) -> None:
        """Take the versions that ``sync(learn=False)`` answers brought."""
        while self._unlearned:
            self._learn(self._unlearned.pop(0))

    def progress(self, fields: dict[str, Any], force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return False
        self._last_progress = now
        answer = call_sync(self.socket, protocol.PROGRESS, {"session": self.session, **fields})
        return bool(answer.get("stop", False))

    def catch_up(self, have_step: int, checkpoints: Path, wait: bool = False,
                 leave_out: Sequence[str] = ()) -> int:
        answer = call_sync(
            self.socket, protocol.CATCH_UP,
            {"session": self.session, "step": have_step, "wait": wait,
             "checkpoints": str(Path(checkpoints).absolute()),
             "leave_out": sorted(leave_out)},
            timeout=self.sync_timeout,
        )
        return int(answer["step"])

    def fetch_rounds(self, after: int, folder: Path, max_size: int) -> tuple[list[int], int]:
        """Have the averaged rounds that peers keep after round ``after`` put into
        ``folder`` (``round-RRRRRRRR-M.bin``, in order, without a gap; none larger than
        ``max_size`` bytes). Returns the rounds now there and the newest round peers keep."""
        answer = call_sync(
            self.socket, protocol.FETCH_ROUNDS,
            {"session": self.session, "round": after, "max_size": max_size,
             "folder": str(Path(folder).absolute())},
            timeout=self.sync_timeout,
        )
        if answer.get("detail"):
            log.info("averaged rounds after round %d: %s", after, answer["detail"])
        return [int(r) for r in answer.get("rounds", [])], int(answer.get("newest", after))

    # ---- chunks of the run's dataset, leased through the daemon (protocol/worker.md)

    def lease_chunk(self, wait: float, resume: int | None = None) -> dict[str, Any] | None:
        """A lease on a chunk (``lease_id``, ``chunk``, ``samples``, ``size``, ``epoch``), or
        None when none was free within ``wait`` seconds. ``resume``: a lease id from before a
        restart (or -1): the daemon hands back a lease it holds open, that one if it can."""
        params: dict[str, Any] = {"run": self.run, "wait": wait}
        if resume is not None:
            params["resume"] = resume
        answer = call_sync(self.socket, "dataset.lease", params, timeout=wait + CALL_MARGIN)
        return answer if answer.get("chunk") else None

    def fetch_chunk(self, chunk: str, size: int) -> Path:
        """The daemon's verified copy of ``chunk``."""
        answer = call_sync(self.socket, "dataset.fetch",
                           {"run": self.run, "chunk": chunk, "size": size},
                           timeout=CHUNK_FETCH_TIMEOUT)
        if not answer.get("path"):
            raise PeerUnavailable(f"the daemon fetched chunk {chunk[:12]} but kept no copy")
        return Path(answer["path"])

    def complete_chunk(self, lease_id: int, samples: int) -> dict[str, Any]:
        """Hand in the receipt; the server's count of the epoch's chunks done."""
        return call_sync(self.socket, "dataset.complete",
                         {"lease_id": lease_id, "samples": samples}, timeout=CALL_MARGIN * 4)

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
