"""yamux keeps reading while both ends stream data and answer pings (net/yamux_control.py)."""

from __future__ import annotations

import hashlib
import os

import libp2p.stream_muxer.yamux.yamux as yamux
import pytest
import trio
from libp2p.custom_types import TProtocol

from dandelion_p2p.net import yamux_control
from tests.swarm import swarm

MiB = 1024 * 1024
PROTOCOL = TProtocol("/dandelion-test/two-way/1.0.0")
EACH_WAY = 48 * MiB
PIECE = MiB


async def two_way(stream: object, payload: bytes) -> str:
    """Write ``payload`` while reading as many bytes; the digest of what was read."""
    h = hashlib.sha256()

    async def write() -> None:
        for start in range(0, len(payload), PIECE):
            await stream.write(payload[start:start + PIECE])  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        got = 0
        while got < len(payload):
            data = await stream.read(PIECE)  # type: ignore[attr-defined]
            assert data, "stream ended early"
            h.update(data)
            got += len(data)
    return h.hexdigest()


async def test_pings_during_a_two_way_transfer_do_not_deadlock_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ping every 5 ms makes each reader answer pings while its writer holds the write lock;
    # without the control-frame hand-off about half of these transfers hung for good.
    monkeypatch.setattr(yamux, "RTT_MEASURE_INTERVAL", 0.005)
    to_b, to_a = os.urandom(EACH_WAY), os.urandom(EACH_WAY)
    served: dict[str, str] = {}

    async with swarm(2) as (a, b):
        async def handler(stream: object) -> None:
            served["b"] = await two_way(stream, to_a)

        b.host.set_stream_handler(PROTOCOL, handler)  # type: ignore[arg-type]
        with trio.fail_after(60):
            for _ in range(3):
                served.clear()
                stream = await a.host.new_stream(b.peer_id, [PROTOCOL])
                assert await two_way(stream, to_b) == hashlib.sha256(to_a).hexdigest()
                while "b" not in served:
                    await trio.sleep(0.01)
                assert served["b"] == hashlib.sha256(to_b).hexdigest()
                await stream.close()


def test_install_is_idempotent() -> None:
    patched = yamux.Yamux._write_frame
    yamux_control.install()
    assert yamux.Yamux._write_frame is patched



async def test_writes_cancelled_mid_frame_leave_the_connection_and_other_streams_whole() -> None:
    # Each write is cancelled at once, before or inside its socket send: noise has already
    # advanced its nonce by then, so a cut write used to make the other end close the
    # connection, and the next stream failed ("fail to read from multiselect communicator").
    sink = TProtocol("/dandelion-test/sink/1.0.0")

    async def sink_handler(stream: object) -> None:
        try:
            while await stream.read(MiB):  # type: ignore[attr-defined]
                pass
        except Exception:  # the reset the writer sends; our own handlers catch it likewise
            pass

    async with swarm(2) as (a, b):
        b.host.set_stream_handler(sink, sink_handler)  # type: ignore[arg-type]
        connection = a.host.get_network().get_connections(b.peer_id)[0]
        payload = os.urandom(4 * MiB)
        with trio.fail_after(60):
            for round_ in range(30):
                stream = await a.host.new_stream(b.peer_id, [sink])
                # Cancelled a little later each time: in the window wait, in the lock, or in
                # the middle of a frame's socket send.
                with trio.move_on_after(0.0002 * round_):
                    await stream.write(payload)
                await stream.reset()
                answer = await a.send_note(b.peer_id, f"round {round_}")
                assert answer == f"received: round {round_}"
        assert a.host.get_network().get_connections(b.peer_id) == [connection]
