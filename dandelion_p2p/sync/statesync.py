"""State transfer over libp2p: the adapter that runs ``statesync_core`` on streams.

A peer that joins a run (or comes back far behind) downloads the swarm's current training
state from peers already training it (``protocol/statesync.md``). ``StateServer`` answers
``/dandelion/state/1.0.0`` from the worker's checkpoint folder; ``fetch_state`` asks peers for
offers, downloads the chosen checkpoint's files chunk by chunk, verifies every file's blake3
against the offer, and renames the folder into the worker's checkpoint folder. Files already
downloaded and verified survive an interruption (``.download-step-N``), so a retry resumes.
``fetch_rounds`` then downloads the averaged rounds peers kept since, the same way.
The decisions (what to answer, which offer, which chunk from whom) are the core's; this
module does the streams, the files and the concurrency.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError, ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.hashing import file_digest
from dandelion_p2p.net.streams import Refuse, ViolationSink, request, serve_requests
from dandelion_p2p.sync.checkpoints import CheckpointCatalog, RoundCatalog
from dandelion_p2p.sync.partial_state import MAX_MANIFEST, held_manifest
from dandelion_p2p.sync.statesync_core import (
    MANIFEST,
    MAX_ASKED,
    MAX_FILE_SIZE,
    MAX_REPLY,
    MAX_REQUEST,
    PROTOCOL_ID,
    STATE,
    FileFetch,
    OfferRound,
    Read,
    RoundOffers,
    RoundRead,
    RoundsOffer,
    StateOffer,
    StateOffered,
    StateUnavailable,
    answer,
    answer_rounds,
)
from dandelion_p2p.wire import Message
from dandelion_p2p.worker.protocol import round_file_name

log = logging.getLogger(__name__)


MAX_READS_PER_PEER = 4
"""Requests one peer may have answered at once: a joiner reads at most 4 chunks of a file
from each source (``READS_PER_SOURCE``)."""
MAX_READS = 32
"""Requests answered at once for all peers together: eight joiners at full speed."""


OFFER_ATTEMPTS = 4
OFFER_RETRY_DELAY = 0.25
"""An offer refused as ``RATE_LIMITED`` is asked again after 0.25, 0.5 and 1 s."""


class StateServer:
    """Serves the newest checkpoint under the folder ``checkpoints()`` names, for ``run()``,
    and the averaged rounds the worker kept beside it.

    Each request costs a file open and a read of up to 1 MiB, done on a worker thread so that
    a slow disk does not hold the event loop; at most ``MAX_READS_PER_PEER`` per peer and
    ``MAX_READS`` in all are answered at once, others get ``RATE_LIMITED`` (not scored)."""

    def __init__(self, host: IHost, run: Callable[[], str],
                 checkpoints: Callable[[], Path | None], *, timeout: float = 30.0,
                 on_violation: ViolationSink | None = None,
                 is_banned: Refuse | None = None) -> None:
        self.host = host
        self.run = run
        self.catalog = CheckpointCatalog(checkpoints)
        self.rounds = RoundCatalog(checkpoints)
        self.timeout = timeout
        self.on_violation = on_violation
        self.is_banned = is_banned
        self._in_flight: dict[bytes, int] = {}

    def install(self) -> None:
        """Register the stream handler on the host (no I/O until a peer opens a stream)."""
        self.host.set_stream_handler(TProtocol(PROTOCOL_ID), serve_requests(
            STATE, self._answer, max_request=MAX_REQUEST, timeout=self.timeout,
            on_violation=self.on_violation, refuse=self.is_banned,
        ))

    async def _answer(self, peer: ID, msg: Message) -> Message:
        key = peer.to_bytes()
        if (self._in_flight.get(key, 0) >= MAX_READS_PER_PEER
                or sum(self._in_flight.values()) >= MAX_READS):
            raise ProtocolViolation(RejectCode.RATE_LIMITED, "too many state requests at once")
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return await trio.to_thread.run_sync(self._answer_now, msg, self.run())
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    def _answer_now(self, msg: Message, run: str) -> Message:
        if isinstance(msg, (RoundsOffer, RoundRead)):
            return answer_rounds(msg, run, self.rounds)
        try:
            return answer(msg, run, self.catalog)
        except ProtocolViolation as exc:
            if isinstance(msg, StateOffer) and exc.code == RejectCode.INVALID_FIELD:
                # Our own checkpoint does not fit the offer's rules: our problem, not the
                # asker's, so it is told we have none rather than scored.
                log.warning("cannot offer the newest checkpoint: %s", exc.detail)
                return StateOffered(run=msg.run, step=-1)
            raise


@dataclass
class DownloadProgress:
    """What a download under way has chosen and written, for ``worker.catch_up_status``."""

    step: int = -1
    """The step being downloaded (-1: offers not chosen yet)."""
    total: int = 0
    done: int = 0


async def fetch_state(
    host: IHost,
    peers: list[ID],
    run: str,
    have_step: int,
    destination: Path,
    *,
    timeout: float = 30.0,
    connect: Callable[[ID], Awaitable[None]] | None = None,
    progress: DownloadProgress | None = None,
    leave_out: frozenset[str] = frozenset(),
) -> tuple[int, list[str]]:
    """Download the newest checkpoint newer than ``have_step`` into ``destination/step-N``;
    returns (N, peers it came from). ``progress`` learns the step chosen and the bytes
    written as they are. ``leave_out``: files not to download (``partial_state``); the
    folder's manifest then lists only the others.

    Raises:
        StateUnavailable: no peer offers a newer state, or the offers disagree, or every
            source failed; a partial download is kept for the next try.
        OSError: a local file error (a full disk).
    """
    offers: OfferRound[ID] = OfferRound(run, have_step, leave_out)
    await _ask_offers(host, peers, offers.request(), offers.received, timeout, connect)
    chosen = offers.choose(asked=len(peers))
    step = chosen.step
    listed = chosen.files()
    files = {name: entry for name, entry in listed.items() if name not in leave_out}
    if files.get(MANIFEST, (MAX_MANIFEST + 1, ""))[0] > MAX_MANIFEST:
        raise StateUnavailable(f"the state at step {step} has no manifest of at most "
                               f"{MAX_MANIFEST} bytes")
    destination.mkdir(parents=True, exist_ok=True)
    needed = sum(size for size, _ in files.values())
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise StateUnavailable(f"the state at step {step} needs {needed} bytes; "
                               f"{destination} has {free} free")
    partial = destination / f".download-step-{step:08d}"
    partial.mkdir(exist_ok=True)
    skipped = sorted(set(listed) - set(files))
    log.info("downloading the state of step %d (%d bytes%s) from %d peers", step, needed,
             f"; leaving out {', '.join(skipped)}" if skipped else "", len(chosen.offers))
    progress = progress if progress is not None else DownloadProgress()
    progress.step, progress.total, progress.done = step, needed, 0
    used: set[str] = set()
    for name, (size, digest) in files.items():
        sources = chosen.sources_of(name)
        if await _fetch_verified(host, FileFetch(run, step, name, size, sources),
                                 partial / name, digest, f"{name} from step {step}", timeout,
                                 progress):
            used.update(p.to_base58() for p in sources)
    offered = {name: digest for name, (_, digest) in listed.items() if name != MANIFEST}
    _keep_manifest(partial / MANIFEST, offered, skipped)
    for stale in set(os.listdir(partial)) - set(files):
        # Left by an earlier try that fetched files this one leaves out.
        (partial / stale).unlink(missing_ok=True)
    final = destination / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.rename(partial, final)
    log.info("downloaded the state at step %d from %s (first offer %s)", step,
             ", ".join(sorted(used)), chosen.reference)
    return step, sorted(used)


def _keep_manifest(manifest: Path, offered: dict[str, str], skipped: list[str]) -> None:
    """Check the downloaded ``manifest`` against the offer, and rewrite it to list only the
    files downloaded when some were ``skipped`` (atomically: a crash leaves it as it came,
    and the next try checks it again)."""
    try:
        rewritten = held_manifest(manifest.read_bytes(), offered, skipped)
    except ValueError as exc:
        manifest.unlink(missing_ok=True)
        raise StateUnavailable(f"the state's manifest cannot be used: {exc}") from None
    if rewritten is not None:
        tmp = manifest.with_name(".manifest.tmp")
        tmp.write_bytes(rewritten)
        os.replace(tmp, manifest)


async def _ask_offers(host: IHost, peers: list[ID], asked: Message,
                      received: Callable[[ID, Message | None], None], timeout: float,
                      connect: Callable[[ID], Awaitable[None]] | None) -> None:
    """Send ``asked`` to ``MAX_ASKED`` of ``peers`` at once, handing each reply (None: none)
    to ``received``."""

    async def ask(peer: ID) -> None:
        if connect is not None:
            try:
                await connect(peer)
            except DandelionError:
                return
        reply: Message | None = None
        for attempt in range(OFFER_ATTEMPTS):
            try:
                reply = await request(host, peer, PROTOCOL_ID, asked, STATE,
                                      max_reply=MAX_REPLY, timeout=timeout)
                break
            except DandelionError as exc:
                log.debug("state offer from %s: %s", peer, exc)
                # A server still finishing reads of an interrupted download of ours refuses
                # for a moment; anything but that busy answer is final.
                busy = isinstance(exc, RemoteRejected) and exc.code == RejectCode.RATE_LIMITED
                if not busy or attempt == OFFER_ATTEMPTS - 1:
                    break
                await trio.sleep(OFFER_RETRY_DELAY * 2**attempt)
        received(peer, reply)

    # A random sample, so that which peers are asked is not up to the order of a list that
    # others fill (member records, connections).
    async with trio.open_nursery() as nursery:
        for peer in random.sample(peers, min(len(peers), MAX_ASKED)):
            nursery.start_soon(ask, peer)


async def fetch_rounds(
    host: IHost,
    peers: list[ID],
    run: str,
    after: int,
    destination: Path,
    *,
    timeout: float = 30.0,
    connect: Callable[[ID], Awaitable[None]] | None = None,
    progress: DownloadProgress | None = None,
    max_size: int = MAX_FILE_SIZE,
) -> tuple[list[int], int]:
    """Download the averaged rounds that peers keep after round ``after``, in order and
    without a gap, into ``destination/round-RRRRRRRR-M.bin``. Returns the rounds downloaded
    and the newest round any peer keeps (``after`` if none): newer than the last downloaded,
    the chain broke there (a round no peer keeps after a gap, or that peers disagree on).
    A round offered larger than ``max_size`` bytes is ignored.

    Raises:
        StateUnavailable: every source of a round failed or its bytes do not match the hash
            offered (``retry``); the rounds downloaded before it are kept.
        OSError: a local file error (a full disk).
    """
    offers: RoundOffers[ID] = RoundOffers(run, after, max_size)
    await _ask_offers(host, peers, offers.request(), offers.received, timeout, connect)
    chain = offers.chain()
    destination.mkdir(parents=True, exist_ok=True)
    needed, free = sum(c.size for c in chain), shutil.disk_usage(destination).free
    if needed > free:
        raise StateUnavailable(f"the rounds after round {after} need {needed} bytes; "
                               f"{destination} has {free} free")
    progress = progress if progress is not None else DownloadProgress()
    progress.step, progress.total, progress.done = -1, needed, 0
    got: list[int] = []
    for kept in chain:
        name = round_file_name(kept.round, kept.members)
        await _fetch_verified(host, FileFetch(run, -1, name, kept.size, kept.sources,
                                              round_=kept.round),
                              destination / name, kept.digest, f"round {kept.round}", timeout,
                              progress)
        got.append(kept.round)
    if got:
        log.info("downloaded the averaged rounds %d-%d", got[0], got[-1])
    return got, offers.newest


async def _fetch_verified(host: IHost, fetch: FileFetch[ID], target: Path, digest: str,
                          label: str, timeout: float, progress: DownloadProgress) -> bool:
    """``fetch``'s file at ``target`` with the BLAKE3 ``digest``: kept when it is there
    already (an interrupted download resumes), else downloaded and checked. Returns whether
    it was downloaded.

    Raises:
        StateUnavailable: the bytes downloaded do not match ``digest`` (``retry``; the file
            is deleted), or every source failed.
    """
    if target.is_file() and target.stat().st_size == fetch.size and file_digest(target) == digest:
        progress.done += fetch.size
        return False
    await _download(host, fetch, target, timeout, progress)
    if file_digest(target) != digest:
        target.unlink(missing_ok=True)
        raise StateUnavailable(f"{label} does not match its hash", retry=True)
    return True


JOURNAL_EVERY = 16
"""Chunks written between two syncs of a ``.part`` file and its journal of durable chunks."""


def _journaled(journal: Path) -> list[int]:
    """The chunk offsets a ``.part.done`` journal lists (8-byte little-endian each; a torn
    last entry is ignored)."""
    try:
        data = journal.read_bytes()
    except OSError:
        return []
    return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - 7, 8)]


async def _download(host: IHost, fetch: FileFetch[ID], target: Path, timeout: float,
                    progress: DownloadProgress) -> None:
    """Read ``fetch``'s file chunk by chunk as the core plans it, writing each chunk where it
    belongs in ``target``.part, then renaming it to ``target``.

    Every ``JOURNAL_EVERY`` chunks the part file is synced and the chunks written so far are
    appended to ``target``.part.done: an interrupted download resumes from the chunks that
    journal lists (the file's hash is checked at the end in any case)."""
    limit = trio.Semaphore(fetch.in_flight)
    tmp = target.with_name(target.name + ".part")
    journal = target.with_name(target.name + ".part.done")
    if tmp.is_file() and tmp.stat().st_size == fetch.size and journal.is_file():
        fd = os.open(tmp, os.O_RDWR)
        resumed = fetch.resume(_journaled(journal))
        progress.done += resumed
        if resumed:
            log.info("resuming %s of step %d: %d of %d bytes already here", fetch.name,
                     fetch.step, resumed, fetch.size)
    else:
        journal.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    written: list[int] = []

    def make_durable() -> None:
        os.fdatasync(fd)
        with journal.open("ab") as f:
            f.write(b"".join(o.to_bytes(8, "little") for o in written))
        written.clear()

    try:
        os.ftruncate(fd, fetch.size)

        async def read(peer: ID, asked: Read) -> None:
            async with limit:
                try:
                    reply = await request(host, peer, PROTOCOL_ID, asked, STATE,
                                          max_reply=MAX_REPLY, timeout=timeout)
                except DandelionError as exc:
                    log.info("chunk %s@%d from %s failed: %s", fetch.name, asked.offset,
                             peer, exc)
                    fetch.failed(peer)
                    return
            data = fetch.received(asked, reply)
            if data is not None:
                os.pwrite(fd, data, asked.offset)
                progress.done += len(data)
                written.append(asked.offset)
                if len(written) >= JOURNAL_EVERY:
                    make_durable()

        try:
            while reads := fetch.next_pass():
                async with trio.open_nursery() as nursery:
                    for peer, asked in reads:
                        nursery.start_soon(read, peer, asked)
        finally:
            # Interrupted or not, what was written is kept for the next try.
            if written:
                make_durable()
        if not fetch.complete:
            raise StateUnavailable(f"could not download {fetch.name}: every source failed",
                                   retry=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    journal.unlink(missing_ok=True)
