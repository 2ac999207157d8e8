"""Hostile peers against real swarm nodes on loopback.

An attacker speaks raw bytes to the DHT and note protocols of a running node. Every violation
must be answered with one ``Reject`` frame carrying the matching code (or, for input that
simply stops, a closed stream), be counted against the attacker, and leave the node serving
its honest peers. Records read back from a lying DHT server must be validated again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.announce import (
    ANNOUNCEMENT_TTL,
    MEMBERS_NAMESPACE,
    PEER_NAMESPACE,
    PeerAnnouncement,
    encode_announcement,
)
from dandelion_p2p.net.dht import messages as dht
from dandelion_p2p.net.dht.messages import (
    DHT,
    FindNode,
    GetRecords,
    Nodes,
    PeerRef,
    PutAck,
    PutRecord,
    Records,
    SignedRecord,
)
from dandelion_p2p.net.dht.records import node_key, routing_key, sign_record
from dandelion_p2p.net.host import build_host
from dandelion_p2p.net.node import NodeSettings, SwarmNode
from dandelion_p2p.net.notes import protocol as notes
from dandelion_p2p.net.streams import (
    NOT_A_FAULT,
    close_quietly,
    read_message,
    request,
    write_message,
)
from dandelion_p2p.wire import (
    WIRE_VERSION,
    FrameDecoder,
    Message,
    Registry,
    Reject,
    RejectCode,
    decode,
    encode,
)
from dandelion_p2p.wire.framing import HEADER

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# Short enough that a stuck exchange fails the test quickly, long enough for a loaded CI box.
TIMEOUT = 3.0
NETWORK = "robustness"


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- nodes and the attacker's host ----------------------------------------------------------


def settings_for(bootstrap: tuple[str, ...] = ()) -> NodeSettings:
    return NodeSettings(
        listen=(LOOPBACK,),
        bootstrap=bootstrap,
        network=NETWORK,
        reachability="public",
        dial_timeout=TIMEOUT,
        request_timeout=TIMEOUT,
    )


@asynccontextmanager
async def three_nodes() -> AsyncIterator[list[SwarmNode]]:
    """Three public nodes; the first seeds the network and the other two bootstrap from it."""
    async with AsyncExitStack() as stack:
        seed = SwarmNode(Identity.generate(), settings_for())
        await stack.enter_async_context(seed.running())
        nodes = [seed]
        for _ in range(2):
            node = SwarmNode(Identity.generate(), settings_for((seed.full_addrs()[0],)))
            await stack.enter_async_context(node.running())
            nodes.append(node)
        yield nodes


def host_listen_addrs(host: IHost) -> list[Multiaddr]:
    return [ma for lst in host.get_network().listeners.values() for ma in lst.get_addrs()]


@asynccontextmanager
async def raw_host(
    identity: Identity | None = None, connect_to: SwarmNode | None = None
) -> AsyncIterator[IHost]:
    """A bare libp2p host with none of our services: it sends whatever the test tells it to."""
    host = build_host(identity or Identity.generate())
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK)]):
        if connect_to is not None:
            addrs = [Multiaddr(a) for a in connect_to.listen_addrs()]
            with trio.fail_after(TIMEOUT):
                await host.connect(PeerInfo(connect_to.peer_id, addrs))
        yield host


@dataclass
class Exchange:
    """What came back on one stream: the bytes written before the node closed it."""

    data: bytes
    eof: bool

    def frames(self, max_size: int) -> list[bytes]:
        decoder = FrameDecoder(max_size)
        decoder.feed(self.data)
        frames = list(decoder.frames())
        assert decoder.pending == 0, f"{decoder.pending} bytes of an incomplete reply frame"
        return frames

    def only_reply(self, registry: Registry, max_size: int) -> Message:
        assert self.eof, "the node must close the stream after answering"
        frames = self.frames(max_size)
        assert len(frames) == 1, f"expected one reply frame, got {len(frames)}"
        return decode(frames[0], registry)


async def exchange(host: IHost, node: SwarmNode, protocol: str, data: bytes) -> Exchange:
    """Open a stream, send ``data``, half-close, and read until the node closes its side."""
    received = bytearray()
    eof = False
    with trio.fail_after(TIMEOUT * 2):
        stream = await host.new_stream(node.peer_id, [TProtocol(protocol)])
        # Half-closing is what tells the node that input ended short of a full frame.
        assert isinstance(stream, NetStream)
        try:
            if data:
                await stream.write(data)
            await stream.close_write()
            while True:
                try:
                    chunk = await stream.read(64 * 1024)
                except StreamEOF:
                    eof = True
                    break
                except StreamError:  # a reset: the node dropped the stream without a reply
                    break
                if not chunk:
                    eof = True
                    break
                received += chunk
        finally:
            await close_quietly(stream, reset=True)
    return Exchange(bytes(received), eof)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def envelope(version: object, type_id: object, body: object) -> bytes:
    return frame(msgpack.packb([version, type_id, body], use_bin_type=True))


def violations_of(node: SwarmNode, host: IHost) -> int:
    return node.violations.get(host.get_id().to_base58(), 0)


def announcement_value() -> bytes:
    return encode_announcement(PeerAnnouncement(addrs=("/ip4/10.9.9.9/tcp/1",), reachable=True))


async def assert_still_serving(victim: SwarmNode, others: list[SwarmNode]) -> None:
    """The honest peers still get answers to FindNode, GetRecords and notes from ``victim``."""
    asker, other = others
    reply = await request(
        asker.host,
        victim.peer_id,
        dht.PROTOCOL_ID,
        FindNode(target=node_key(other.identity.peer_id_bytes)),
        DHT,
        max_reply=dht.MAX_FRAME,
        timeout=TIMEOUT,
    )
    assert isinstance(reply, Nodes)
    assert other.identity.peer_id_bytes in {ref.peer_id for ref in reply.closer}

    own = victim.identity.peer_id_bytes
    reply = await request(
        other.host,
        victim.peer_id,
        dht.PROTOCOL_ID,
        GetRecords(target=routing_key(PEER_NAMESPACE, own)),
        DHT,
        max_reply=dht.MAX_FRAME,
        timeout=TIMEOUT,
    )
    assert isinstance(reply, Records)
    assert [r.publisher for r in reply.records] == [own]

    assert other.dht is not None
    records = await other.dht.get(PEER_NAMESPACE, own)
    assert {r.publisher for r in records} == {own}
    assert await asker.send_note(victim.peer_id, "still there?") == "received: still there?"


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("dandelion_p2p") and r.levelno >= logging.ERROR
    ]


# ---- malformed input on both protocols ------------------------------------------------------

_noise = random.Random(7)
# Any 4 bytes whose first is non-zero claim a frame of at least 16 MiB.
RANDOM_BYTES = b"\x9f" + _noise.randbytes(200)
# msgpack reads one object from the start and finds trailing bytes after it.
RANDOM_PAYLOAD = b"\x07" + _noise.randbytes(200)
FIND_NODE_BODY = FindNode(target=bytes(32)).to_body()
NOTE_BODY = {
    "sender": b"\x00\x01",
    "recipient": b"\x00\x01",
    "text": "hi",
    "sent_at_ms": 1,
    "nonce": bytes(16),
    "signature": bytes(64),
}


@dataclass(frozen=True)
class Protocol:
    id: str
    registry: Registry
    max_frame: int
    request_type: int
    request_body: dict[str, object]
    wrong_types: dict[str, object]


PROTOCOLS = {
    "dht": Protocol(
        dht.PROTOCOL_ID, DHT, dht.MAX_FRAME, FindNode.TYPE, FIND_NODE_BODY, {"target": "x" * 32}
    ),
    "note": Protocol(
        notes.PROTOCOL_ID,
        notes.NOTES,
        notes.MAX_FRAME,
        notes.Note.TYPE,
        NOTE_BODY,
        {**NOTE_BODY, "sent_at_ms": "yesterday", "nonce": 16},
    ),
}

MALFORMED_CASES: dict[str, tuple[Callable[[Protocol], bytes], RejectCode | None]] = {
    "random bytes": (lambda p: RANDOM_BYTES, RejectCode.TOO_LARGE),
    "random payload in a frame": (lambda p: frame(RANDOM_PAYLOAD), RejectCode.MALFORMED),
    "truncated frame": (
        lambda p: envelope(WIRE_VERSION, p.request_type, p.request_body)[:-5],
        None,
    ),
    "header only": (lambda p: HEADER.pack(100), None),
    "oversized length header": (
        lambda p: HEADER.pack(p.max_frame + 1) + b"\x00" * 64,
        RejectCode.TOO_LARGE,
    ),
    "zero length frame": (lambda p: HEADER.pack(0), RejectCode.MALFORMED),
    "wire version 2": (
        lambda p: envelope(2, p.request_type, p.request_body),
        RejectCode.UNSUPPORTED_VERSION,
    ),
    "unknown type id": (lambda p: envelope(WIRE_VERSION, 99, {}), RejectCode.UNKNOWN_TYPE),
    "a reject as request": (
        lambda p: frame(encode(Reject(code=int(RejectCode.INTERNAL)))),
        RejectCode.UNKNOWN_TYPE,
    ),
    "wrong field types": (
        lambda p: envelope(WIRE_VERSION, p.request_type, p.wrong_types),
        RejectCode.INVALID_FIELD,
    ),
    "envelope not a list": (
        lambda p: frame(msgpack.packb({"version": 1}, use_bin_type=True)),
        RejectCode.MALFORMED,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_CASES))
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
async def test_malformed_input_is_rejected_and_the_node_keeps_serving(
    protocol: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    proto = PROTOCOLS[protocol]
    build, expected = MALFORMED_CASES[case]
    async with three_nodes() as nodes:
        victim, others = nodes[1], [nodes[0], nodes[2]]
        async with raw_host(connect_to=victim) as attacker:
            before = violations_of(victim, attacker)
            result = await exchange(attacker, victim, proto.id, build(proto))
            if expected is None:
                # Input that stops short is indistinguishable from a dropped connection: the
                # node closes the stream without a reply.
                assert result.eof
                assert result.data == b""
            else:
                reply = result.only_reply(proto.registry, proto.max_frame)
                assert isinstance(reply, Reject)
                assert RejectCode(reply.code) is expected, reply.detail
                assert violations_of(victim, attacker) == before + 1
            await assert_still_serving(victim, others)
    assert internal_errors(caplog) == []


async def test_requests_in_the_name_of_someone_else_are_forbidden() -> None:
    async with three_nodes() as nodes:
        victim, others = nodes[1], [nodes[0], nodes[2]]
        impostor = PeerRef(peer_id=nodes[2].identity.peer_id_bytes, addrs=("/ip4/10.0.0.1/tcp/1",))
        async with raw_host(connect_to=victim) as attacker:
            result = await exchange(
                attacker,
                victim,
                dht.PROTOCOL_ID,
                frame(encode(FindNode(target=bytes(32), sender=impostor))),
            )
            reply = result.only_reply(DHT, dht.MAX_FRAME)
            assert isinstance(reply, Reject)
            assert reply.code == RejectCode.FORBIDDEN
            # The forged address did not replace the honest node's in the routing table.
            assert victim.dht is not None
            contact = victim.dht.table.get(nodes[2].identity.peer_id_bytes)
            assert contact is not None
            assert "/ip4/10.0.0.1/tcp/1" not in contact.addrs
            # Impersonation costs as much as a forged signature: the attacker is banned at
            # once, so what it sends next is refused unread.
            assert violations_of(victim, attacker) == 1
            assert victim.is_banned(attacker.get_id())

            note = notes.sign_note(
                Identity.generate(), victim.identity.peer_id_bytes, "not from you", bytes(16)
            )
            result = await exchange(attacker, victim, notes.PROTOCOL_ID, frame(encode(note)))
            reply = result.only_reply(notes.NOTES, notes.MAX_FRAME)
            assert isinstance(reply, Reject)
            assert reply.code == RejectCode.FORBIDDEN
            assert reply.detail == "banned"
            assert violations_of(victim, attacker) == 1
            assert list(victim.notes.received) == []
            await assert_still_serving(victim, others)


# ---- hostile records ------------------------------------------------------------------------


def forged_record(attacker: Identity, victim: SwarmNode) -> SignedRecord:
    """Signed by the attacker, but claiming the victim as publisher."""
    mine = sign_record(
        attacker, MEMBERS_NAMESPACE, NETWORK.encode(), announcement_value(), 1, now_ms() + 60_000
    )
    return SignedRecord(
        namespace=mine.namespace,
        key=mine.key,
        value=mine.value,
        publisher=victim.identity.peer_id_bytes,
        seq=mine.seq,
        expires_at_ms=mine.expires_at_ms,
        signature=mine.signature,
    )


def expired_record(attacker: Identity, victim: SwarmNode) -> SignedRecord:
    return sign_record(
        attacker, MEMBERS_NAMESPACE, NETWORK.encode(), announcement_value(), 1, now_ms() - 1000
    )


def far_future_record(attacker: Identity, victim: SwarmNode) -> SignedRecord:
    return sign_record(
        attacker, MEMBERS_NAMESPACE, NETWORK.encode(), announcement_value(), 1, 2**53 - 1
    )


def squatting_record(attacker: Identity, victim: SwarmNode) -> SignedRecord:
    """A peer record under the victim's id: only the victim may publish there."""
    key = victim.identity.peer_id_bytes
    return sign_record(
        attacker, PEER_NAMESPACE, key, announcement_value(), 2**62, now_ms() + 60_000
    )


def foreign_namespace_record(attacker: Identity, victim: SwarmNode) -> SignedRecord:
    return sign_record(attacker, "warez", b"k", b"v", 1, now_ms() + 60_000)


@pytest.mark.parametrize(
    "make, expected",
    [
        (forged_record, RejectCode.BAD_SIGNATURE),
        (expired_record, RejectCode.EXPIRED),
        (far_future_record, RejectCode.EXPIRED),
        (squatting_record, RejectCode.FORBIDDEN),
        (foreign_namespace_record, RejectCode.NOT_FOUND),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_invalid_records_are_rejected_and_not_stored(
    make: Callable[[Identity, SwarmNode], SignedRecord], expected: RejectCode
) -> None:
    async with three_nodes() as nodes:
        victim, others = nodes[1], [nodes[0], nodes[2]]
        identity = Identity.generate()
        async with raw_host(identity, connect_to=victim) as attacker:
            assert victim.dht is not None
            stored_before = len(victim.dht.store)
            bad = make(identity, victim)
            result = await exchange(
                attacker, victim, dht.PROTOCOL_ID, frame(encode(PutRecord(record=bad)))
            )
            reply = result.only_reply(DHT, dht.MAX_FRAME)
            assert isinstance(reply, Reject)
            assert RejectCode(reply.code) is expected, reply.detail
            faulty = expected not in NOT_A_FAULT
            assert violations_of(victim, attacker) == (1 if faulty else 0)
            assert len(victim.dht.store) == stored_before
            held = victim.dht.store.get(routing_key(bad.namespace, bad.key), now_ms())
            assert bad not in held
            await assert_still_serving(victim, others)


async def test_stale_sequence_number_is_rejected() -> None:
    async with three_nodes() as nodes:
        victim, others = nodes[1], [nodes[0], nodes[2]]
        identity = Identity.generate()
        async with raw_host(identity, connect_to=victim) as attacker:

            def put(seq: int, value: bytes) -> bytes:
                record = sign_record(
                    identity, MEMBERS_NAMESPACE, NETWORK.encode(), value, seq, now_ms() + 60_000
                )
                return frame(encode(PutRecord(record=record)))

            first = announcement_value()
            reply = (await exchange(attacker, victim, dht.PROTOCOL_ID, put(10, first))).only_reply(
                DHT, dht.MAX_FRAME
            )
            assert reply == PutAck(stored=True)
            older = encode_announcement(PeerAnnouncement(addrs=(), reachable=False))
            result = await exchange(attacker, victim, dht.PROTOCOL_ID, put(5, older))
            reply = result.only_reply(DHT, dht.MAX_FRAME)
            assert isinstance(reply, Reject)
            assert reply.code == RejectCode.STALE
            # A stale write is what a lost republish race looks like: refused, not scored.
            assert violations_of(victim, attacker) == 0
            # The newer record is the one others read back.
            assert others[0].dht is not None
            records = await others[0].dht.get(MEMBERS_NAMESPACE, NETWORK.encode())
            mine = [r for r in records if r.publisher == identity.peer_id_bytes]
            assert [(r.seq, r.value) for r in mine] == [(10, first)]
            await assert_still_serving(victim, others)


# ---- fuzzing --------------------------------------------------------------------------------


async def test_random_frames_never_break_the_dht_service(caplog: pytest.LogCaptureFixture) -> None:
    async with three_nodes() as nodes:
        victim, others = nodes[1], [nodes[0], nodes[2]]
        async with raw_host(connect_to=victim) as attacker:
            codes: list[int] = []

            # Hypothesis drives the examples from a worker thread; each one is sent from the
            # test's own trio loop, so the nodes stay up across all of them.
            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(payload=st.binary(min_size=1, max_size=2048))
            def one_frame(payload: bytes) -> None:
                before = violations_of(victim, attacker)
                result = trio.from_thread.run(
                    exchange, attacker, victim, dht.PROTOCOL_ID, frame(payload)
                )
                reply = result.only_reply(DHT, dht.MAX_FRAME)
                if isinstance(reply, Reject):
                    assert reply.code != RejectCode.INTERNAL, reply.detail
                    if reply.detail == "banned":
                        # Garbage gets a peer banned; from then on it is refused unread.
                        assert reply.code == RejectCode.FORBIDDEN
                        assert violations_of(victim, attacker) == before
                    else:
                        assert violations_of(victim, attacker) == before + 1
                    codes.append(reply.code)

            await trio.to_thread.run_sync(one_frame)
            assert len(codes) >= 30
            assert victim.is_banned(attacker.get_id())
            await assert_still_serving(victim, others)
    assert internal_errors(caplog) == []


# ---- records read back from a lying server -------------------------------------------------


async def serve_lies(
    host: IHost, answer: Callable[[Message], Awaitable[Message]]
) -> list[type[Message]]:
    """Run a DHT server on ``host`` that answers every request with ``answer``."""
    seen: list[type[Message]] = []

    async def handler(stream: INetStream) -> None:
        try:
            msg = await read_message(stream, DHT, dht.MAX_FRAME)
            seen.append(type(msg))
            await write_message(stream, await answer(msg))
        finally:
            await stream.close()

    host.set_stream_handler(TProtocol(dht.PROTOCOL_ID), handler)
    return seen


def tampered_value(honest: SignedRecord, _liar: Identity) -> SignedRecord:
    """An honest peer's record with its value changed (and seq raised, so it would win)."""
    return SignedRecord(
        namespace=honest.namespace,
        key=honest.key,
        value=announcement_value(),
        publisher=honest.publisher,
        seq=honest.seq + 1,
        expires_at_ms=honest.expires_at_ms,
        signature=honest.signature,
    )


def record_for_another_key(honest: SignedRecord, liar: Identity) -> SignedRecord:
    return sign_record(
        liar, MEMBERS_NAMESPACE, b"another network", announcement_value(), 1, now_ms() + 60_000
    )


def expired_by_liar(honest: SignedRecord, liar: Identity) -> SignedRecord:
    return sign_record(liar, MEMBERS_NAMESPACE, honest.key, announcement_value(), 1, now_ms() - 1)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (tampered_value, RejectCode.BAD_SIGNATURE),
        (record_for_another_key, RejectCode.INVALID_FIELD),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_records_from_a_lying_server_are_validated_again(
    tamper: Callable[[SignedRecord, Identity], SignedRecord],
    expected: RejectCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dandelion_p2p.net.node")
    async with three_nodes() as nodes:
        reader, honest_node = nodes[0], nodes[2]
        assert reader.dht is not None and honest_node.dht is not None
        network_key = NETWORK.encode()
        target = routing_key(MEMBERS_NAMESPACE, network_key)
        (honest,) = [
            r
            for r in honest_node.dht.store.get(target, now_ms())
            if r.publisher == honest_node.identity.peer_id_bytes
        ]
        liar_identity = Identity.generate()
        # A record the liar may legitimately publish: it must still be dropped with the rest of
        # a reply that contained an invalid one.
        liar_own = sign_record(
            liar_identity,
            MEMBERS_NAMESPACE,
            network_key,
            announcement_value(),
            1,
            now_ms() + int(ANNOUNCEMENT_TTL * 1000),
        )
        lie = tamper(honest, liar_identity)

        async def answer(msg: Message) -> Message:
            if isinstance(msg, GetRecords):
                return Records(records=(liar_own, lie), closer=())
            return Nodes(closer=())

        async with raw_host(liar_identity) as liar:
            seen = await serve_lies(liar, answer)
            liar_addrs = tuple(str(a) for a in host_listen_addrs(liar))
            reader.dht.table.update(liar_identity.peer_id_bytes, liar_addrs, trio.current_time())

            records = await reader.dht.get(MEMBERS_NAMESPACE, network_key)

            assert GetRecords in seen, "the lookup must have asked the lying server"
            assert lie not in records
            assert liar_identity.peer_id_bytes not in {r.publisher for r in records}
            assert {r.publisher for r in records} == {n.identity.peer_id_bytes for n in nodes}
            assert honest in records
            assert violations_of(reader, liar) == 1
            logged = f"protocol violation by {liar.get_id().to_base58()}: {expected.name}"
            assert logged in caplog.messages


async def test_expired_records_read_back_are_dropped_without_blame() -> None:
    """A server whose clock runs a little behind returns records that just expired for us:
    they are dropped, while its other records still count and it is not scored."""
    async with three_nodes() as nodes:
        reader = nodes[0]
        assert reader.dht is not None
        network_key = NETWORK.encode()
        server_identity = Identity.generate()
        fresh = sign_record(
            server_identity, MEMBERS_NAMESPACE, network_key, announcement_value(), 1,
            now_ms() + 60_000,
        )
        stale = expired_by_liar(fresh, Identity.generate())

        async def answer(msg: Message) -> Message:
            if isinstance(msg, GetRecords):
                return Records(records=(fresh, stale), closer=())
            return Nodes(closer=())

        async with raw_host(server_identity) as server:
            await serve_lies(server, answer)
            addrs = tuple(str(a) for a in host_listen_addrs(server))
            reader.dht.table.update(server_identity.peer_id_bytes, addrs, trio.current_time())
            records = await reader.dht.get(MEMBERS_NAMESPACE, network_key)
            assert fresh in records and stale not in records
            assert violations_of(reader, server) == 0
            assert server_identity.peer_id_bytes in reader.dht.table
