"""Catch-up: the daemon's answer to ``worker.catch_up``.

A worker that starts, or learns from a round that it is behind, asks its daemon to put the
swarm's newest state into its checkpoint folder. The daemon lists the peers that may hold it
and runs state transfer (``statesync``), trying again while no peer is known yet (just
started) or while a download can be retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError
from dandelion_p2p.sync.ports import StatePeers
from dandelion_p2p.sync.statesync import DownloadProgress, fetch_rounds, fetch_state
from dandelion_p2p.sync.statesync_core import StateUnavailable

log = logging.getLogger(__name__)

CATCH_UP_TRIES = 10


class CatchUp:
    def __init__(self, peers: StatePeers, *, wait_for_peers: float,
                 admitted: Callable[[], frozenset[bytes] | None] = lambda: None) -> None:
        """``wait_for_peers``: seconds a ``wait`` call keeps looking while no peer is known
        (the daemon's ``catch_up_wait``), spread over the tries so that a shorter wait still
        looks as many times. ``admitted``: the peers a closed run admits, the only ones asked
        (None: an open run)."""
        self.peers = peers
        self.admitted = admitted
        self.pause = wait_for_peers / (CATCH_UP_TRIES - 1)
        self.progress: DownloadProgress | None = None
        """The download under way (None: none), for ``worker.catch_up_status``."""

    def status(self) -> dict[str, int]:
        """The step being downloaded (-1: none chosen yet, or no download) and its bytes."""
        p = self.progress
        if p is None:
            return {"step": -1, "done": 0, "total": 0}
        return {"step": p.step, "done": p.done, "total": p.total}

    async def run(self, run: str, have: int, folder: Path, *, wait: bool,
                  leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Download the newest state of ``run`` newer than step ``have`` into ``folder``,
        without the files ``leave_out`` names (``partial_state``).
        Answers ``step`` (the step now there, -1: nothing newer found) and ``peers`` it came
        from, or ``detail`` saying why not. ``wait``: ask again while no peer is known.

        A local file error (a full disk) is raised as it is (``OSError``).
        """
        self.progress = DownloadProgress()
        try:
            return await self._run(run, have, folder, wait=wait, leave_out=leave_out)
        finally:
            self.progress = None

    async def _run(self, run: str, have: int, folder: Path, *, wait: bool,
                   leave_out: frozenset[str]) -> dict[str, Any]:
        assert self.progress is not None
        for attempt in range(CATCH_UP_TRIES):
            peers = await self.training_peers()
            if not peers:
                if not wait or attempt + 1 == CATCH_UP_TRIES:
                    return {"step": -1, "detail": "no peers to ask"}
                # Just started: the bootstrap connection or member records may not be up yet.
                await trio.sleep(self.pause)
                continue
            try:
                step, sources = await fetch_state(
                    self.peers.host, peers, run, have, folder,
                    connect=self.peers.connect_peer, progress=self.progress,
                    leave_out=leave_out,
                )
                break
            except StateUnavailable as exc:
                log.info("state transfer: %s", exc)
                if not exc.retry or attempt + 1 == CATCH_UP_TRIES:
                    return {"step": -1, "detail": str(exc)}
        else:
            return {"step": -1, "detail": "no peers to ask"}
        return {"step": step, "peers": sources}

    async def rounds(self, run: str, after: int, folder: Path,
                     max_size: int) -> dict[str, Any]:
        """Download the averaged rounds peers keep after round ``after`` into ``folder``
        (none larger than ``max_size`` bytes).
        Answers ``rounds`` (those now there, in order), ``newest`` (the newest round a peer
        keeps) and, when a download failed, ``detail``."""
        peers = await self.training_peers()
        if not peers:
            return {"rounds": [], "newest": after, "detail": "no peers to ask"}
        self.progress = DownloadProgress()
        try:
            got, newest = await fetch_rounds(self.peers.host, peers, run, after, folder,
                                             connect=self.peers.connect_peer,
                                             progress=self.progress, max_size=max_size)
        except StateUnavailable as exc:
            log.info("averaged rounds: %s", exc)
            return {"rounds": [], "newest": after, "detail": str(exc)}
        finally:
            self.progress = None
        return {"rounds": got, "newest": newest}

    async def training_peers(self) -> list[ID]:
        """Peers that may hold the run's state: the swarm's members and whoever we are
        connected to (a member record may not have spread yet)."""
        me = self.peers.peer_id
        found = set(self.peers.host.get_network().get_connections_map())
        try:
            found.update(ID.from_base58(peer) for peer in await self.peers.members())
        except DandelionError as exc:
            log.info("cannot list the swarm's members: %s", exc)
        admitted = self.admitted()
        return [peer for peer in found
                if peer != me and (admitted is None or peer.to_bytes() in admitted)]
