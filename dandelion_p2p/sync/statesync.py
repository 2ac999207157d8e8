"""State transfer: a peer that joins a run (or comes back far behind) downloads the swarm's
current training state from peers already training it.

The state is a worker checkpoint (``worker/checkpoint.py``): after every averaging round all
peers hold the same weights and outer-optimizer state, so any of them can serve it. A joiner
asks several peers for their newest checkpoint (``StateOffer``), takes the newest step, checks
that the peers offering it agree on the hash of every file that must be identical across the
swarm (weights, outer optimizer), then reads each file in chunks (``StateRead``) spread over
all peers that hold the same bytes, verifies every file's blake3 against the manifest, and
renames the folder into the worker's checkpoint folder. Files already downloaded and verified
survive an interruption (``.download-step-N``), so a retry resumes.

Protocol ``/dandelion/state/1.0.0``: one request and one reply per stream, every frame bounded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError, ProtocolViolation
from dandelion_p2p.hashing import file_digest
from dandelion_p2p.net.streams import ViolationSink, request, serve_requests
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid

log = logging.getLogger(__name__)

STATE = Registry("state")
PROTOCOL_ID = TProtocol("/dandelion/state/1.0.0")
CHUNK = 1 << 20
MAX_REQUEST = 4096
MAX_REPLY = CHUNK + 4096
MAX_FILES = 64
MAX_NAME = 128
SHARED_FILES = ("trainable.safetensors", "outer.safetensors")
"""Files identical on every peer after a round: their hashes must agree across offers."""
MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_STEP_DIR = re.compile(r"step-(\d{8,})")


@STATE.message(1)
class StateOffer(Message):
    """Which checkpoint of ``run`` do you hold?"""

    run: str

    def check(self) -> None:
        if not 0 < len(self.run) <= 128:
            raise invalid("StateOffer.run must be 1-128 characters")


@STATE.message(2)
class StateOffered(Message):
    """The newest checkpoint: its step (-1: none) and, per file, its size and blake3 hash."""

    run: str
    step: int
    names: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    hashes: tuple[str, ...] = ()

    def check(self) -> None:
        if not (len(self.names) == len(self.sizes) == len(self.hashes) <= MAX_FILES):
            raise invalid("StateOffered: names, sizes and hashes must pair up (at most 64)")
        if not all(_FILE_NAME.fullmatch(n) for n in self.names):
            raise invalid("StateOffered: bad file name")
        if any(s < 0 for s in self.sizes) or not -1 <= self.step < 2**53:
            raise invalid("StateOffered: negative size, or a step outside -1 .. 2^53 - 1")

    def files(self) -> dict[str, tuple[int, str]]:
        return {n: (s, h) for n, s, h in zip(self.names, self.sizes, self.hashes, strict=True)}


@STATE.message(3)
class StateRead(Message):
    run: str
    step: int
    name: str
    offset: int
    length: int

    def check(self) -> None:
        if not _FILE_NAME.fullmatch(self.name):
            raise invalid("StateRead.name is not a file name")
        if self.offset < 0 or not 0 < self.length <= CHUNK:
            raise invalid(f"StateRead: offset >= 0 and length 1-{CHUNK}")


@STATE.message(4)
class StateChunk(Message):
    data: bytes


@dataclass
class Served:
    step: int
    folder: Path
    files: dict[str, tuple[int, str]]
    manifest_identity: tuple[int, int] = (0, 0)
    """The manifest's (inode, mtime_ns): a checkpoint replaced in place under the same step
    (a damaged one, or a stop checkpoint rewritten) is read again, not offered stale."""


def _identity(manifest: Path) -> tuple[int, int]:
    stat = manifest.stat()
    return stat.st_ino, stat.st_mtime_ns


class StateServer:
    """Serves the newest checkpoint under the folder ``checkpoints()`` names, for ``run()``."""

    def __init__(self, host: IHost, run: Callable[[], str],
                 checkpoints: Callable[[], Path | None], *, timeout: float = 30.0,
                 on_violation: ViolationSink | None = None,
                 is_banned: Callable[[ID], bool] | None = None) -> None:
        self.host = host
        self.run = run
        self.checkpoints = checkpoints
        self.timeout = timeout
        self.on_violation = on_violation
        self.is_banned = is_banned
        self._served: dict[int, Served] = {}

    def install(self) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, serve_requests(
            STATE, self._answer, max_request=MAX_REQUEST, timeout=self.timeout,
            on_violation=self.on_violation, refuse=self.is_banned,
        ))

    def newest(self) -> Served | None:
        root = self.checkpoints()
        if root is None or not root.is_dir():
            return None
        found = sorted(int(m.group(1)) for p in root.iterdir()
                       if (m := _STEP_DIR.fullmatch(p.name)))
        return self.at_step(found[-1]) if found else None

    def at_step(self, step: int) -> Served | None:
        root = self.checkpoints()
        if root is None or step < 0:
            return None
        folder = root / f"step-{step:08d}"
        cached = self._served.get(step)
        try:
            identity = _identity(folder / MANIFEST)
        except OSError:
            return None
        if cached is not None and cached.folder == folder and (
            cached.manifest_identity == identity
        ):
            return cached
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = {name: ((folder / name).stat().st_size, digest)
                     for name, digest in manifest["files"].items()}
            files[MANIFEST] = ((folder / MANIFEST).stat().st_size,
                               file_digest(folder / MANIFEST))
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        served = Served(step, folder, files, identity)
        self._served = {k: v for k, v in self._served.items() if k > step - 1000}
        self._served[step] = served
        return served

    async def _answer(self, peer: ID, msg: Message) -> Message:
        if isinstance(msg, StateOffer):
            served = self.newest() if msg.run == self.run() else None
            if served is None:
                return StateOffered(run=msg.run, step=-1)
            names = tuple(served.files)
            return StateOffered(run=msg.run, step=served.step, names=names,
                                sizes=tuple(served.files[n][0] for n in names),
                                hashes=tuple(served.files[n][1] for n in names))
        if isinstance(msg, StateRead):
            # Any checkpoint still kept may be read: a joiner's download of the one offered
            # goes on while this peer writes newer ones.
            served = self.at_step(msg.step) if msg.run == self.run() else None
            if served is None or msg.name not in served.files:
                raise ProtocolViolation(RejectCode.NOT_FOUND, "no such checkpoint file")
            size = served.files[msg.name][0]
            if msg.offset >= size:
                raise ProtocolViolation(RejectCode.INVALID_FIELD, "offset beyond the file")
            with (served.folder / msg.name).open("rb") as f:
                f.seek(msg.offset)
                data = f.read(msg.length)
            return StateChunk(data=data)
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected StateOffer or StateRead")


class StateUnavailable(DandelionError):
    """No peer offered a usable state newer than ours, or its download failed."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        """True when asking again may help (the offered checkpoint went away meanwhile)."""


async def _offer(host: IHost, peer: ID, run: str, timeout: float) -> StateOffered | None:
    try:
        reply = await request(host, peer, PROTOCOL_ID, StateOffer(run=run), STATE,
                              max_reply=MAX_REPLY, timeout=timeout)
    except DandelionError as exc:
        log.debug("state offer from %s: %s", peer, exc)
        return None
    return reply if isinstance(reply, StateOffered) and reply.run == run else None


async def fetch_state(
    host: IHost,
    peers: list[ID],
    run: str,
    have_step: int,
    destination: Path,
    *,
    timeout: float = 30.0,
    connect: Callable[[ID], object] | None = None,
) -> tuple[int, list[str]]:
    """Download the newest checkpoint newer than ``have_step`` into ``destination/step-N``;
    returns (N, peers it came from).

    Raises:
        StateUnavailable: no peer offers a newer state, or the offers disagree, or every
            source failed; a partial download is kept for the next try.
    """
    offers: dict[ID, StateOffered] = {}
    seen: list[ID] = []

    async def ask(peer: ID) -> None:
        if connect is not None:
            try:
                await connect(peer)  # type: ignore[misc]
            except DandelionError:
                return
        offer = await _offer(host, peer, run, timeout)
        if offer is not None and offer.step >= 0:
            seen.append(peer)
        if offer is not None and offer.step > have_step:
            offers[peer] = offer

    async with trio.open_nursery() as nursery:
        for peer in peers[:16]:
            nursery.start_soon(ask, peer)
    if not offers:
        raise StateUnavailable(
            f"no peer offers a state of run {run} newer than step {have_step} "
            f"({len(seen)} of {len(peers)} asked hold one)"
        )
    step = max(o.step for o in offers.values())
    newest = {p: o for p, o in offers.items() if o.step == step}
    reference_peer, reference = next(iter(newest.items()))
    wanted = reference.files()
    for name in SHARED_FILES:
        hashes = {o.files().get(name, (0, ""))[1] for o in newest.values()}
        if len(hashes) > 1:
            raise StateUnavailable(
                f"peers disagree on {name} at step {step}: {len(hashes)} different hashes"
            )
    destination.mkdir(parents=True, exist_ok=True)
    partial = destination / f".download-step-{step:08d}"
    partial.mkdir(exist_ok=True)
    used: set[str] = set()
    for name, (size, digest) in wanted.items():
        target = partial / name
        if target.is_file() and target.stat().st_size == size and file_digest(target) == digest:
            continue
        sources = [p for p, o in newest.items() if o.files().get(name) == (size, digest)]
        await _download(host, sources, run, step, name, size, target, timeout)
        if file_digest(target) != digest:
            target.unlink(missing_ok=True)
            raise StateUnavailable(f"{name} from step {step} does not match its hash",
                                   retry=True)
        used.update(p.to_base58() for p in sources)
    final = destination / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.rename(partial, final)
    log.info("downloaded the state at step %d from %s (first offer %s)", step,
             ", ".join(sorted(used)), reference_peer)
    return step, sorted(used)


async def _download(host: IHost, sources: list[ID], run: str, step: int, name: str,
                    size: int, target: Path, timeout: float) -> None:
    """Read ``name`` in chunks spread over ``sources`` (a few in flight per source), writing
    each where it belongs; a failing source's chunks go to the others."""
    offsets = list(range(0, size, CHUNK))
    done: set[int] = set()
    alive = list(sources)
    limit = trio.Semaphore(4 * len(sources))
    tmp = target.with_name(target.name + ".part")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)

        async def read(peer: ID, offset: int) -> None:
            length = min(CHUNK, size - offset)
            async with limit:
                try:
                    reply = await request(
                        host, peer, PROTOCOL_ID,
                        StateRead(run=run, step=step, name=name, offset=offset, length=length),
                        STATE, max_reply=MAX_REPLY, timeout=timeout,
                    )
                except DandelionError as exc:
                    log.info("state chunk %s@%d from %s failed: %s", name, offset, peer, exc)
                    if peer in alive and len(alive) > 1:
                        alive.remove(peer)
                    return
            if isinstance(reply, StateChunk) and len(reply.data) == length:
                os.pwrite(fd, reply.data, offset)
                done.add(offset)

        for _attempt in range(3):
            missing = [o for o in offsets if o not in done]
            if not missing:
                break
            async with trio.open_nursery() as nursery:
                for i, offset in enumerate(missing):
                    nursery.start_soon(read, alive[i % len(alive)], offset)
        if len(done) != len(offsets):
            raise StateUnavailable(f"could not download {name}: every source failed", retry=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
