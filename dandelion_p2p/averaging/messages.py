"""Messages of the ``averaging`` protocol family (spec: protocol/averaging.md).

Two kinds of things live here:

* ``AveragingAnnouncement``: the DHT record value a peer publishes to say it is ready for a
  round. It travels inside a ``SignedRecord`` whose publisher signature covers it, so it
  carries no signature of its own.
* The data-plane frames: ``ChunkHeader`` (a sender's slice of a span, to its reducer) and
  ``ResultHeader`` (a reducer's aggregate, to every member), each followed by raw payload
  bytes, and ``Reject`` (type 0, no payload).

A data-plane frame is ``uint32 BE header length || header envelope || payload``. The header is
an ordinary msgpack envelope (wire.md); the payload, often MiBs, is never run through msgpack,
so it is neither copied into nor parsed by the msgpack decoder. ``pack_frame`` returns the
pieces for a vectored write and ``unpack_frame`` bounds every length before decoding anything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import MAX_PEER_ID_SIZE, MIN_PEER_ID_SIZE, verify_by_peer
from dandelion_p2p.wire import Message, Registry, Reject, RejectCode, decode, encode, invalid
from dandelion_p2p.wire.framing import ABSOLUTE_MAX_FRAME
from dandelion_p2p.wire.signed import SignedMessage

AVERAGING = Registry("averaging")

CHUNK_DOMAIN = b"dandelion/avg-chunk/v1"
RESULT_DOMAIN = b"dandelion/avg-result/v1"

DIGEST_SIZE = 32
SIGNATURE_SIZE = 64
UNSIGNED = bytes(SIGNATURE_SIZE)
"""The signature a header is built with before ``signed_with`` replaces it."""
GROUP_ID_SIZE = 32
MAX_RUN_ID = 64
MAX_CODEC_NAME = 32
MAX_ENDPOINT = 300
MAX_LISTED_BANS = 32
MAX_GROUP_SIZE = 256
MAX_ROUND = 2**63 - 1
# 2**48 float32 elements is 1 PiB: far beyond any model, yet small enough that offsets stay
# exact in float64 arithmetic anywhere downstream.
MAX_ELEMENTS = 2**48
MAX_CHUNK_INDEX = 2**32 - 1
# A result header with MAX_GROUP_SIZE contributors of MAX_PEER_ID_SIZE bytes and their weights is
# about 19 KiB; 64 KiB leaves room without letting a header claim real memory.
MAX_HEADER = 64 * 1024
MAX_FRAME = ABSOLUTE_MAX_FRAME
MAX_HELLO = 256

FRAME_PREFIX = struct.Struct(">I")

Buffer = bytes | bytearray | memoryview
Signer = Callable[[bytes], bytes]


def check_peer_id(peer_id: bytes, where: str) -> None:
    if not MIN_PEER_ID_SIZE <= len(peer_id) <= MAX_PEER_ID_SIZE:
        raise invalid(f"{where}: peer id of {len(peer_id)} bytes")


def check_run(run: bytes, where: str) -> None:
    if not 0 < len(run) <= MAX_RUN_ID:
        raise invalid(f"{where}: run id must be 1..{MAX_RUN_ID} bytes")


def check_round(round_: int, where: str) -> None:
    if not 0 <= round_ <= MAX_ROUND:
        raise invalid(f"{where}: round out of range")


def _check_common(
    where: str,
    run: bytes,
    round_: int,
    group_id: bytes,
    span_index: int,
    chunk_index: int,
    start: int,
    end: int,
    codec: str,
    digest: bytes,
    signature: bytes,
) -> None:
    check_run(run, where)
    check_round(round_, where)
    if len(group_id) != GROUP_ID_SIZE:
        raise invalid(f"{where}.group_id must be {GROUP_ID_SIZE} bytes")
    if not 0 <= span_index < MAX_GROUP_SIZE:
        raise invalid(f"{where}.span_index out of range")
    if not 0 <= chunk_index <= MAX_CHUNK_INDEX:
        raise invalid(f"{where}.chunk_index out of range")
    if not 0 <= start < end <= MAX_ELEMENTS:
        raise invalid(f"{where}: element range [{start}, {end}) is empty or out of range")
    if not 0 < len(codec) <= MAX_CODEC_NAME:
        raise invalid(f"{where}.codec: empty or longer than {MAX_CODEC_NAME} characters")
    if len(digest) != DIGEST_SIZE:
        raise invalid(f"{where}.digest must be {DIGEST_SIZE} bytes")
    if len(signature) != SIGNATURE_SIZE:
        raise invalid(f"{where}.signature must be {SIGNATURE_SIZE} bytes")


@AVERAGING.message(1)
class AveragingAnnouncement(Message):
    """A peer's readiness for round ``round`` of run ``run``: the DHT record value.

    ``weight`` is the number of samples behind the peer's contribution, ``bandwidth_mbps`` its
    measured bandwidth, ``accepts_connections`` whether others can dial it directly (only such
    peers reduce a span unless nobody can), ``endpoint`` a hint for the data plane (empty when
    the peer is only reachable through the control plane), ``expires_at_ms`` Unix time in ms
    after which the announcement no longer counts.
    """

    run: bytes
    round: int
    weight: float
    bandwidth_mbps: float
    accepts_connections: bool
    endpoint: str
    expires_at_ms: int
    banned: tuple[bytes, ...] = ()
    """Peers the announcer has banned (its worst offenders first, at most MAX_LISTED_BANS):
    a peer banned by more than half of a round's other announcers is left out of every group
    (``group.consensus_bans``), so all members agree on the groups."""
    finished: bool = False
    """Set when the announcer republishes the announcement after its group finished the round:
    a peer that forms a group with it now is late for the round."""
    leaving: bool = False
    """Set by a peer that stops (its daemon shuts down): it takes no part in the round, and
    the peers that expected it stop waiting for it. Only the publisher signs its record, so
    only a peer itself can say it is leaving."""

    def check(self) -> None:
        if len(self.banned) > MAX_LISTED_BANS:
            raise invalid(f"AveragingAnnouncement.banned lists over {MAX_LISTED_BANS} peers")
        if any(not 0 < len(p) <= MAX_PEER_ID_SIZE for p in self.banned):
            raise invalid("AveragingAnnouncement.banned holds a malformed peer id")
        check_run(self.run, "AveragingAnnouncement")
        check_round(self.round, "AveragingAnnouncement")
        if not self.weight > 0.0:
            raise invalid("AveragingAnnouncement.weight must be > 0")
        if not self.bandwidth_mbps >= 0.0:
            raise invalid("AveragingAnnouncement.bandwidth_mbps must be >= 0")
        if len(self.endpoint) > MAX_ENDPOINT:
            raise invalid(f"AveragingAnnouncement.endpoint longer than {MAX_ENDPOINT} characters")
        if not 0 < self.expires_at_ms < 2**53:
            raise invalid("AveragingAnnouncement.expires_at_ms out of range")


@AVERAGING.message(2)
class ChunkHeader(SignedMessage):
    """Elements ``[start, end)`` of ``sender``'s vector, for the reducer of span
    ``span_index``; the payload is ``codec``'s encoding of them. ``sender`` signs every
    other field (protocol/averaging.md section 6.5)."""

    SIGNING_DOMAIN = CHUNK_DOMAIN

    run: bytes
    round: int
    group_id: bytes
    span_index: int
    chunk_index: int
    start: int
    end: int
    sender: bytes
    recipient: bytes
    codec: str
    weight: float
    digest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        # Signed as float64 whatever number the caller passed, as the receiver decodes it:
        # an int weight would otherwise be signed as an int and never verify.
        object.__setattr__(self, "weight", float(self.weight))
        self.check()

    def check(self) -> None:
        _check_common(
            "ChunkHeader",
            self.run,
            self.round,
            self.group_id,
            self.span_index,
            self.chunk_index,
            self.start,
            self.end,
            self.codec,
            self.digest,
            self.signature,
        )
        check_peer_id(self.sender, "ChunkHeader.sender")
        check_peer_id(self.recipient, "ChunkHeader.recipient")
        if self.sender == self.recipient:
            raise invalid("ChunkHeader: sender and recipient are the same peer")
        if not self.weight > 0.0:
            raise invalid("ChunkHeader.weight must be > 0")


@AVERAGING.message(3)
class ResultHeader(SignedMessage):
    """The aggregate of elements ``[start, end)`` over ``contributors`` (in group order, with
    the weights each was counted with); ``reducer`` signs every other field."""

    SIGNING_DOMAIN = RESULT_DOMAIN

    run: bytes
    round: int
    group_id: bytes
    span_index: int
    chunk_index: int
    start: int
    end: int
    reducer: bytes
    contributors: tuple[bytes, ...]
    weights: tuple[float, ...]
    codec: str
    digest: bytes
    signature: bytes

    def __post_init__(self) -> None:
        # Float64 whatever the caller passed, as for ChunkHeader.weight.
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        self.check()

    def check(self) -> None:
        _check_common(
            "ResultHeader",
            self.run,
            self.round,
            self.group_id,
            self.span_index,
            self.chunk_index,
            self.start,
            self.end,
            self.codec,
            self.digest,
            self.signature,
        )
        check_peer_id(self.reducer, "ResultHeader.reducer")
        if not 0 < len(self.contributors) <= MAX_GROUP_SIZE:
            raise invalid(f"ResultHeader: 1..{MAX_GROUP_SIZE} contributors required")
        for peer in self.contributors:
            check_peer_id(peer, "ResultHeader.contributors")
        if len(set(self.contributors)) != len(self.contributors):
            raise invalid("ResultHeader: duplicate contributor")
        if self.reducer not in self.contributors:
            raise invalid("ResultHeader: the reducer is not among the contributors")
        if len(self.weights) != len(self.contributors):
            raise invalid("ResultHeader: one weight per contributor required")
        if not all(w > 0.0 for w in self.weights):
            raise invalid("ResultHeader.weights must be > 0")


@AVERAGING.message(4)
class ChannelHello(Message):
    """The first frame on an averaging channel: the round (and the opener's view of the group)
    the channel is for."""

    run: bytes
    round: int
    group_id: bytes

    def check(self) -> None:
        check_run(self.run, "ChannelHello.run")
        check_round(self.round, "ChannelHello.round")
        if len(self.group_id) != GROUP_ID_SIZE:
            raise invalid(f"ChannelHello.group_id must be {GROUP_ID_SIZE} bytes")


@AVERAGING.message(6)
class ResultEcho(Message):
    """A member's copy, to the other members, of a result header it applied (the encoded
    ``ResultHeader`` is the frame's payload), or with ``final`` and no payload: it has
    settled every chunk and echoes nothing more this round."""

    run: bytes
    round: int
    group_id: bytes
    final: bool

    def check(self) -> None:
        check_run(self.run, "ResultEcho.run")
        check_round(self.round, "ResultEcho.round")
        if len(self.group_id) != GROUP_ID_SIZE:
            raise invalid(f"ResultEcho.group_id must be {GROUP_ID_SIZE} bytes")


@AVERAGING.message(7)
class ChannelIdle(Message):
    """On a channel kept from round to round (purpose ``averaging/2``): the sender sends
    nothing more for ``round`` on it. Once both ends said so the channel is idle, and the
    opener may begin a later round on it with a new ``ChannelHello`` (section 6.6)."""

    run: bytes
    round: int

    def check(self) -> None:
        check_run(self.run, "ChannelIdle.run")
        check_round(self.round, "ChannelIdle.round")


def payload_digest(payload: Buffer) -> bytes:
    """BLAKE3-256 of the payload bytes."""
    return blake3.blake3(payload).digest()


def verify_chunk(header: ChunkHeader) -> bool:
    """Whether ``header.signature`` is ``header.sender``'s signature over the chunk fields."""
    return verify_by_peer(header.sender, header.signed_bytes(), header.signature)


def verify_result(header: ResultHeader) -> bool:
    """Whether ``header.signature`` is ``header.reducer``'s signature over the result fields."""
    return verify_by_peer(header.reducer, header.signed_bytes(), header.signature)


def pack_frame(header: Message, payload: Buffer = b"") -> list[Buffer]:
    """The frame as buffers for a vectored write: the length-prefixed header, then the payload
    (left out when empty). The payload object is passed through, never copied.

    Raises ``ValueError`` when the header or the whole frame is over its limit (a local bug:
    the receiver would refuse it).
    """
    head = encode(header)
    if len(head) > MAX_HEADER:
        raise ValueError(f"header of {len(head)} bytes exceeds the limit of {MAX_HEADER}")
    size = FRAME_PREFIX.size + len(head) + memoryview(payload).nbytes
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME}")
    prefix = FRAME_PREFIX.pack(len(head)) + head
    return [prefix, payload] if memoryview(payload).nbytes else [prefix]


def join_frame(buffers: list[Buffer]) -> bytes:
    return b"".join(buffers)


def frame_size(buffers: list[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def unpack_frame(frame: Buffer) -> tuple[Message, memoryview]:
    """Split a data-plane frame into its decoded header and a view of its payload.

    Checks, before decoding anything: the frame holds the 4-byte prefix, the header length is
    non-zero, at most ``MAX_HEADER`` and within the frame. A ``Reject`` must carry no payload;
    an ``AveragingAnnouncement`` is a DHT value, not a frame. Raises ``ProtocolViolation``
    (``MALFORMED``, ``TOO_LARGE``, ``UNSUPPORTED_VERSION``, ``UNKNOWN_TYPE``,
    ``INVALID_FIELD``).
    """
    view = memoryview(frame).cast("B")
    if view.nbytes > MAX_FRAME:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"frame of {view.nbytes} bytes")
    if view.nbytes < FRAME_PREFIX.size:
        raise ProtocolViolation(RejectCode.MALFORMED, "frame shorter than its length prefix")
    (head_len,) = FRAME_PREFIX.unpack_from(view)
    if head_len == 0:
        raise ProtocolViolation(RejectCode.MALFORMED, "zero-length header")
    if head_len > MAX_HEADER:
        raise ProtocolViolation(
            RejectCode.TOO_LARGE, f"header of {head_len} bytes exceeds the limit of {MAX_HEADER}"
        )
    body_start = FRAME_PREFIX.size + head_len
    if body_start > view.nbytes:
        raise ProtocolViolation(
            RejectCode.MALFORMED,
            f"header of {head_len} bytes but only {view.nbytes - FRAME_PREFIX.size} follow",
        )
    header = decode(bytes(view[FRAME_PREFIX.size : body_start]), AVERAGING)
    payload = view[body_start:]
    if isinstance(header, Reject):
        if payload.nbytes:
            raise ProtocolViolation(RejectCode.MALFORMED, "a Reject carries no payload")
    elif isinstance(header, ResultEcho):
        if header.final != (payload.nbytes == 0) or payload.nbytes > MAX_HEADER:
            raise ProtocolViolation(
                RejectCode.MALFORMED, "an echo carries one result header, a final one none"
            )
    elif not isinstance(header, ChunkHeader | ResultHeader):
        raise ProtocolViolation(
            RejectCode.UNKNOWN_TYPE, f"{type(header).__name__} is not a data-plane frame"
        )
    return header, payload


def encode_hello(hello: ChannelHello) -> bytes:
    return join_frame(pack_frame(hello))


def decode_hello(frame: Buffer) -> ChannelHello:
    """The ``ChannelHello`` a channel's first frame holds (protocol/averaging.md 6.6).

    Its size is checked before anything is decoded. Raises ``ProtocolViolation``
    (``TOO_LARGE``, ``MALFORMED``, ``UNSUPPORTED_VERSION``, ``UNKNOWN_TYPE``, ``INVALID_FIELD``).
    """
    hello = _decode_bare(frame)
    if not isinstance(hello, ChannelHello):
        raise ProtocolViolation(
            RejectCode.UNKNOWN_TYPE, f"{type(hello).__name__} is not a ChannelHello"
        )
    return hello


def encode_idle(idle: ChannelIdle) -> bytes:
    return join_frame(pack_frame(idle))


def idle_in(frame: Buffer) -> ChannelIdle | None:
    """The ``ChannelIdle`` ``frame`` holds, or None for any other frame (a chunk, a result,
    or a frame that is no frame at all: the state machine judges those)."""
    if memoryview(frame).nbytes > MAX_HELLO:
        return None
    try:
        idle = _decode_bare(frame, "ChannelIdle")
    except ProtocolViolation:
        return None
    return idle if isinstance(idle, ChannelIdle) else None


def _decode_bare(frame: Buffer, kind: str = "ChannelHello") -> Message:
    """The header of a frame that carries no payload (a ``kind``: what the errors name), its
    size checked before decoding."""
    view = memoryview(frame).cast("B")
    if view.nbytes > MAX_HELLO:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"{kind} of {view.nbytes} bytes")
    if view.nbytes < FRAME_PREFIX.size:
        raise ProtocolViolation(RejectCode.MALFORMED, f"{kind} shorter than its length prefix")
    (head_len,) = FRAME_PREFIX.unpack_from(view)
    if FRAME_PREFIX.size + head_len > view.nbytes:
        raise ProtocolViolation(RejectCode.MALFORMED, f"{kind} header longer than the frame")
    if FRAME_PREFIX.size + head_len < view.nbytes:
        raise ProtocolViolation(RejectCode.MALFORMED, f"a {kind} carries no payload")
    return decode(bytes(view[FRAME_PREFIX.size :]), AVERAGING)


def encode_announcement(announcement: AveragingAnnouncement) -> bytes:
    """The DHT record value for ``announcement``."""
    return encode(announcement)


def decode_announcement(value: bytes) -> AveragingAnnouncement:
    """Decode a DHT record value; raises ``ProtocolViolation`` unless it is an announcement."""
    msg = decode(value, AVERAGING)
    if not isinstance(msg, AveragingAnnouncement):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not an AveragingAnnouncement")
    return msg
