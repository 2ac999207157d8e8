"""State transfer's core (``/dandelion/state/1.0.0``, ``protocol/statesync.md``): the
messages, what a server answers from its checkpoints, and the joiner's decisions (which offer
to take, which source reads which chunk, what counts as a chunk received). No I/O: no trio,
no libp2p, no sockets; ``statesync`` runs it over libp2p streams.

The state is a worker checkpoint (``worker/checkpoint.py``): after every averaging round all
peers hold the same weights and outer-optimizer state, so any of them can serve it. A joiner
asks several peers for their newest checkpoint (``StateOffer``), takes the state (a step and
the hashes of the files that must be identical across the swarm, ``SHARED_FILES``) that the
most peers offer, the newest among equals, then reads each file in chunks (``StateRead``)
spread over all peers that hold the same bytes.

Peers also keep the averaged pseudo-gradients of their last rounds (``RoundsOffer``,
``RoundRead``): a joiner whose download took several rounds brings the state it loaded up to
the swarm's by applying those rounds' outer steps in order, as every peer applied them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from dandelion_p2p.errors import DandelionError, ProtocolViolation
from dandelion_p2p.wire import Message, Registry, RejectCode, invalid

STATE = Registry("state")
PROTOCOL_ID = "/dandelion/state/1.0.0"
CHUNK = 1 << 20
MAX_REQUEST = 4096
MAX_REPLY = CHUNK + 4096
MAX_FILES = 64
MAX_NAME = 128
MAX_ASKED = 16
"""Peers a joiner asks for offers."""
READS_PER_SOURCE = 4
"""Chunk reads of one file in flight, per source of that file."""
PASSES = 3
"""Passes over a file's missing chunks before the download is given up (and retried)."""
SHARED_FILES = ("trainable.safetensors", "outer.safetensors")
"""Files identical on every peer after a round: their hashes must agree across offers."""
MANIFEST = "manifest.json"
MAX_FILE_SIZE = 1 << 40
"""Largest file an offer may list (1 TiB): far above any checkpoint, far below what makes a
sparse file or a size sum misbehave."""
MAX_STATE_SIZE = 1 << 42
"""Largest sum of the files of one offer."""
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""A plain file name: never ``.``, ``..`` or hidden, never a path."""
STEP_DIR = re.compile(r"step-(\d{8,})")
"""A checkpoint folder's name; others (``.tmp-step-…``, ``.download-step-…``) are never
offered."""


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
        if not all(FILE_NAME.fullmatch(n) for n in self.names):
            raise invalid("StateOffered: bad file name")
        if len(set(self.names)) != len(self.names):
            raise invalid("StateOffered: a file is listed twice")
        if not all(0 <= s <= MAX_FILE_SIZE for s in self.sizes) or sum(self.sizes) > MAX_STATE_SIZE:
            raise invalid("StateOffered: a size below 0 or above 1 TiB, or 4 TiB in all")
        if not -1 <= self.step < 2**53:
            raise invalid("StateOffered: a step outside -1 .. 2^53 - 1")

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
        if not FILE_NAME.fullmatch(self.name):
            raise invalid("StateRead.name is not a file name")
        if self.offset < 0 or not 0 < self.length <= CHUNK:
            raise invalid(f"StateRead: offset >= 0 and length 1-{CHUNK}")


@STATE.message(4)
class StateChunk(Message):
    data: bytes


MAX_ROUNDS = 64
"""Rounds one ``RoundsOffered`` lists."""
MAX_ROUND = 2**53 - 1


@STATE.message(5)
class RoundsOffer(Message):
    """Which averaged rounds of ``run`` after round ``after`` do you keep?"""

    run: str
    after: int

    def check(self) -> None:
        if not 0 < len(self.run) <= 128:
            raise invalid("RoundsOffer.run must be 1-128 characters")
        if not -1 <= self.after <= MAX_ROUND:
            raise invalid("RoundsOffer.after outside -1 .. 2^53 - 1")


@STATE.message(6)
class RoundsOffered(Message):
    """The rounds kept after the one asked for, oldest first: per round the members that
    averaged it, the size of its file and the file's blake3 hash."""

    run: str
    rounds: tuple[int, ...] = ()
    members: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    hashes: tuple[str, ...] = ()

    def check(self) -> None:
        if not (len(self.rounds) == len(self.members) == len(self.sizes) == len(self.hashes)
                <= MAX_ROUNDS):
            raise invalid("RoundsOffered: rounds, members, sizes and hashes must pair up "
                          f"(at most {MAX_ROUNDS})")
        if any(not 0 <= r <= MAX_ROUND for r in self.rounds) or any(
                a >= b for a, b in zip(self.rounds, self.rounds[1:], strict=False)):
            raise invalid("RoundsOffered: rounds must increase, each 0 .. 2^53 - 1")
        if not all(2 <= m <= 1 << 16 for m in self.members):
            raise invalid("RoundsOffered: members must be 2 .. 65536")
        if not all(0 < s <= MAX_FILE_SIZE for s in self.sizes):
            raise invalid("RoundsOffered: a size outside 1 byte .. 1 TiB")

    def listed(self) -> dict[int, tuple[int, int, str]]:
        """Round -> (members, size, hash)."""
        return {r: (m, s, h) for r, m, s, h in
                zip(self.rounds, self.members, self.sizes, self.hashes, strict=True)}


@STATE.message(7)
class RoundRead(Message):
    run: str
    round: int
    offset: int
    length: int

    def check(self) -> None:
        if self.offset < 0 or not 0 < self.length <= CHUNK:
            raise invalid(f"RoundRead: offset >= 0 and length 1-{CHUNK}")


class StateUnavailable(DandelionError):
    """No peer offered a usable state newer than ours, or its download failed."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        """True when asking again may help (the offered checkpoint went away meanwhile)."""


# ---------------------------------------------------------------------- the server


class Listing(Protocol):
    """One checkpoint as a server offers it: its step, and per file its size and hash."""

    @property
    def step(self) -> int: ...

    @property
    def files(self) -> Mapping[str, tuple[int, str]]: ...


L = TypeVar("L", bound=Listing)


class CheckpointSource(Protocol[L]):
    """The checkpoints a server holds (``sync.checkpoints`` reads them from the worker's
    folder)."""

    def newest(self) -> L | None: ...

    def at_step(self, step: int) -> L | None: ...

    def read(self, listing: L, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the file ``name`` of ``listing`` from ``offset``."""
        ...


class KeptRound(Protocol):
    """One averaged round as a server keeps it."""

    @property
    def round(self) -> int: ...

    @property
    def members(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def digest(self) -> str: ...


R = TypeVar("R", bound=KeptRound)


class RoundSource(Protocol[R]):
    """The averaged rounds a server keeps (``sync.checkpoints`` reads them from the worker's
    folder)."""

    def after(self, round_: int) -> list[R]:
        """The kept rounds after ``round_``, oldest first."""
        ...

    def at_round(self, round_: int) -> R | None: ...

    def read(self, kept: R, offset: int, length: int) -> bytes: ...


def rounds_offer_of(run: str, kept: list[KeptRound]) -> RoundsOffered:
    kept = kept[:MAX_ROUNDS]
    return RoundsOffered(run=run, rounds=tuple(k.round for k in kept),
                         members=tuple(k.members for k in kept),
                         sizes=tuple(k.size for k in kept),
                         hashes=tuple(k.digest for k in kept))


def answer_rounds(request: Message, run: str, rounds: RoundSource[R]) -> Message:
    """The server's reply to ``RoundsOffer`` and ``RoundRead`` (as ``answer`` for the state).

    Raises:
        ProtocolViolation: ``NOT_FOUND`` (the round is not kept here), ``INVALID_FIELD`` (an
            offset beyond the file), ``UNKNOWN_TYPE`` (not one of those requests).
    """
    if isinstance(request, RoundsOffer):
        kept = rounds.after(request.after) if request.run == run else []
        return rounds_offer_of(request.run, list(kept))
    if isinstance(request, RoundRead):
        found = rounds.at_round(request.round) if request.run == run else None
        if found is None:
            raise ProtocolViolation(RejectCode.NOT_FOUND, "round not kept here")
        if request.offset >= found.size:
            raise ProtocolViolation(RejectCode.INVALID_FIELD, "offset beyond the file")
        return StateChunk(data=rounds.read(found, request.offset, request.length))
    raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a state or rounds request")


def offer_of(run: str, listing: Listing | None) -> StateOffered:
    """The ``StateOffered`` of ``listing`` (None: no checkpoint of ``run`` here)."""
    if listing is None:
        return StateOffered(run=run, step=-1)
    names = tuple(listing.files)
    return StateOffered(run=run, step=listing.step, names=names,
                        sizes=tuple(listing.files[n][0] for n in names),
                        hashes=tuple(listing.files[n][1] for n in names))


def answer(request: Message, run: str, checkpoints: CheckpointSource[L]) -> Message:
    """The server's reply to ``request``; ``run``: the run this daemon trains.

    Raises:
        ProtocolViolation: ``NOT_FOUND`` (no such checkpoint or file: not the peer's fault),
            ``INVALID_FIELD`` (an offset beyond the file), ``UNKNOWN_TYPE`` (not a request).
    """
    if isinstance(request, StateOffer):
        return offer_of(request.run, checkpoints.newest() if request.run == run else None)
    if isinstance(request, StateRead):
        # Any checkpoint still kept may be read: a joiner's download of the one offered
        # goes on while this peer writes newer ones.
        listing = checkpoints.at_step(request.step) if request.run == run else None
        if listing is None or request.name not in listing.files:
            raise ProtocolViolation(RejectCode.NOT_FOUND, "no such checkpoint file")
        size = listing.files[request.name][0]
        if request.offset >= size:
            raise ProtocolViolation(RejectCode.INVALID_FIELD, "offset beyond the file")
        return StateChunk(data=checkpoints.read(listing, request.name, request.offset,
                                                request.length))
    raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected a state or rounds request")


# ---------------------------------------------------------------------- the joiner

P = TypeVar("P")
"""A peer, as the adapter names it (any hashable id)."""


@dataclass(frozen=True)
class Selection(Generic[P]):
    """The state to download: ``step``, offered by ``offers`` (the sources), whose files are
    those of the first to have answered (``reference``)."""

    step: int
    reference: P
    offers: dict[P, StateOffered]

    def files(self) -> dict[str, tuple[int, str]]:
        """The files to fetch, name: (size, hash), in the reference's order."""
        return self.offers[self.reference].files()

    def sources_of(self, name: str) -> list[P]:
        """The sources whose offer lists ``name`` with the reference's size and hash."""
        wanted = self.files()[name]
        return [p for p, o in self.offers.items() if o.files().get(name) == wanted]


class OfferRound(Generic[P]):
    """The offers of one download: collects the replies to ``StateOffer`` and chooses the
    newest state, if the peers offering it agree on the shared files."""

    def __init__(self, run: str, have_step: int,
                 leave_out: frozenset[str] = frozenset()) -> None:
        self.run = run
        self.have_step = have_step
        self.compared = tuple(name for name in SHARED_FILES if name not in leave_out)
        """The shared files whose hashes tell states apart: those the joiner downloads (a
        peer that joined without the others offers none of them)."""
        self.offers: dict[P, StateOffered] = {}
        """Offers newer than ``have_step``, in the order they arrived."""
        self.holders = 0
        """Peers that hold some checkpoint of the run, newer or not."""

    def request(self) -> StateOffer:
        return StateOffer(run=self.run)

    def received(self, peer: P, reply: Message | None) -> None:
        """``peer``'s reply (None: none came, or it failed); anything but a ``StateOffered``
        of this run is ignored, and nothing is scored."""
        if not isinstance(reply, StateOffered) or reply.run != self.run:
            return
        if reply.step >= 0:
            self.holders += 1
        if reply.step > self.have_step:
            self.offers[peer] = reply

    def choose(self, asked: int) -> Selection[P]:
        """The state offered by the most peers that agree on it, the newest among equals;
        ``asked``: how many peers there were to ask.

        A state is a step and the hashes of its ``SHARED_FILES`` that the joiner downloads
        (``compared``). Support comes first so that
        one peer claiming a far newer step, or different bytes for the step the others hold,
        is outvoted by the peers that agree; only between states of equal support does the
        newer step win.

        Raises:
            StateUnavailable: no peer offers a newer state, or equally supported offers of the
                newest such step disagree on a shared file (neither is worth retrying at once).
        """
        if not self.offers:
            raise StateUnavailable(
                f"no peer offers a state of run {self.run} newer than step {self.have_step} "
                f"({self.holders} of {asked} asked hold one)"
            )
        states: dict[tuple[int, tuple[str, ...]], dict[P, StateOffered]] = {}
        for peer, offer in self.offers.items():
            files = offer.files()
            shared = tuple(files.get(name, (0, ""))[1] for name in self.compared)
            states.setdefault((offer.step, shared), {})[peer] = offer
        best = max((len(peers), step) for (step, _), peers in states.items())
        tied = [peers for (step, _), peers in states.items() if (len(peers), step) == best]
        if len(tied) > 1:
            step = best[1]
            for name in self.compared:
                hashes = {o.files().get(name, (0, ""))[1]
                          for peers in tied for o in peers.values()}
                if len(hashes) > 1:
                    raise StateUnavailable(
                        f"peers disagree on {name} at step {step}: {len(hashes)} different "
                        f"hashes, offered by equally many peers"
                    )
        chosen = tied[0]
        return Selection(best[1], next(iter(chosen)), chosen)


Read = StateRead | RoundRead


class FileFetch(Generic[P]):
    """The chunks of one file and who reads each: chunk ``i`` of those still missing from
    source ``i mod (sources still in use)``, in up to ``PASSES`` passes.

    The file is a checkpoint's file ``name`` of ``step``, or with ``round_`` set the kept
    round ``round_`` (``name`` then only names it in logs)."""

    def __init__(self, run: str, step: int, name: str, size: int, sources: list[P], *,
                 round_: int | None = None) -> None:
        self.run = run
        self.step = step
        self.name = name
        self.round = round_
        self.size = size
        self.offsets = list(range(0, size, CHUNK))
        self.done: set[int] = set()
        self.alive = list(sources)
        """Sources still in use: one that fails is dropped, unless it is the last."""
        self.in_flight = READS_PER_SOURCE * len(sources)
        """Reads the adapter may have in flight at once."""
        self.passes = 0

    def next_pass(self) -> list[tuple[P, Read]]:
        """The reads of the next pass over the missing chunks; none when the file is
        complete or every pass is spent."""
        missing = [o for o in self.offsets if o not in self.done]
        if not missing or self.passes == PASSES:
            return []
        self.passes += 1
        return [(self.alive[i % len(self.alive)], self._read(offset))
                for i, offset in enumerate(missing)]

    def _read(self, offset: int) -> Read:
        length = min(CHUNK, self.size - offset)
        if self.round is not None:
            return RoundRead(run=self.run, round=self.round, offset=offset, length=length)
        return StateRead(run=self.run, step=self.step, name=self.name, offset=offset,
                         length=length)

    def received(self, read: Read, reply: Message) -> bytes | None:
        """The bytes to write at ``read.offset``, or None: only a ``StateChunk`` of exactly
        the length asked is taken; anything else leaves the chunk missing."""
        if isinstance(reply, StateChunk) and len(reply.data) == read.length:
            self.done.add(read.offset)
            return reply.data
        return None

    def resume(self, offsets: Iterable[int]) -> int:
        """Chunks an interrupted download already wrote (and made durable): they are not
        read again. Offsets that are not chunk starts of this file are ignored. Returns the
        bytes they hold."""
        starts = set(self.offsets)
        kept = {o for o in offsets if o in starts} - self.done
        self.done |= kept
        return sum(min(CHUNK, self.size - o) for o in kept)

    def failed(self, peer: P) -> None:
        """A read from ``peer`` failed (no stream, a timeout, a ``Reject``)."""
        if peer in self.alive and len(self.alive) > 1:
            self.alive.remove(peer)

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.offsets)


@dataclass(frozen=True)
class ChosenRound(Generic[P]):
    """A kept round to download: its members, size and hash, and the peers offering it."""

    round: int
    members: int
    size: int
    digest: str
    sources: list[P]


class RoundOffers(Generic[P]):
    """The offers of kept rounds after round ``after``: which to download, in order."""

    def __init__(self, run: str, after: int, max_size: int = MAX_FILE_SIZE) -> None:
        """``max_size``: the largest file a round of this run can take; a round offered
        larger is ignored (as if not offered)."""
        self.run = run
        self.after = after
        self.max_size = max_size
        self.offers: dict[P, RoundsOffered] = {}

    def request(self) -> RoundsOffer:
        return RoundsOffer(run=self.run, after=self.after)

    def received(self, peer: P, reply: Message | None) -> None:
        """Anything but a ``RoundsOffered`` of this run is ignored; nothing is scored."""
        if isinstance(reply, RoundsOffered) and reply.run == self.run:
            self.offers[peer] = reply

    def _listed(self) -> dict[P, dict[int, tuple[int, int, str]]]:
        listed = {peer: {r: v for r, v in offer.listed().items() if v[1] <= self.max_size}
                  for peer, offer in self.offers.items()}
        return {peer: rounds for peer, rounds in listed.items() if rounds}

    @property
    def newest(self) -> int:
        """The newest round that at least half of the peers keeping rounds keep, in any
        version (``after`` if none): one peer claiming rounds the others have not run does
        not move it."""
        listed = self._listed()
        found = self.after
        for round_ in {r for rounds in listed.values() for r in rounds}:
            keeping = sum(1 for rounds in listed.values() if round_ in rounds)
            if round_ > found and 2 * keeping >= len(listed):
                found = round_
        return found

    def chain(self) -> list[ChosenRound[P]]:
        """The rounds that follow on from ``after`` without a gap, each in the version the
        most peers offer. The chain ends at the first round whose most offered version fewer
        than half of the peers keeping rounds offer (a round only a liar claims, whether
        the others have not run it yet or pruned it already), or that another version ties
        with: a joiner cannot tell which of them the swarm applied."""
        listed = self._listed()
        chosen: list[ChosenRound[P]] = []
        round_ = self.after + 1
        while True:
            versions: dict[tuple[int, int, str], list[P]] = {}
            for peer, rounds in listed.items():
                if round_ in rounds:
                    versions.setdefault(rounds[round_], []).append(peer)
            if not versions:
                return chosen
            support = max(len(peers) for peers in versions.values())
            best = [v for v, peers in versions.items() if len(peers) == support]
            if len(best) > 1 or 2 * support < len(listed):
                return chosen
            members, size, digest = best[0]
            chosen.append(ChosenRound(round_, members, size, digest, versions[best[0]]))
            round_ += 1


def robust_step(steps: list[int]) -> int:
    """The swarm's step from what peers claim: the median (the upper one of an even count),
    so that one peer claiming a huge step cannot push a new version out of reach; -1 if no
    peer answered."""
    if not steps:
        return -1
    ordered = sorted(steps)
    return ordered[len(ordered) // 2]
