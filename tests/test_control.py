from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from dandelion_p2p.control.client import call, call_sync
from dandelion_p2p.control.protocol import (
    CONTROL,
    MAX_FRAME,
    AlreadyRunning,
    CommandFailed,
    Handler,
    Request,
    Response,
)
from dandelion_p2p.control.server import serve_control
from dandelion_p2p.errors import (
    ConfigError,
    PeerUnavailable,
    ProtocolViolation,
    RemoteRejected,
)
from dandelion_p2p.wire import (
    FrameDecoder,
    Message,
    Reject,
    RejectCode,
    decode,
    encode,
    encode_frame,
)
from dandelion_p2p.wire.framing import HEADER


async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return {"echo": params}


async def explode(params: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


async def refuse(params: dict[str, Any]) -> dict[str, Any]:
    raise ConfigError("no training run named 'x'")


async def unencodable(params: dict[str, Any]) -> dict[str, Any]:
    return {"path": Path("/x")}


async def int_keys(params: dict[str, Any]) -> dict[str, Any]:
    return {"by_rank": {0: "a", 1: "b"}}


async def not_a_map(params: dict[str, Any]) -> dict[str, Any]:
    return [1, 2]  # type: ignore[return-value]


async def hang(params: dict[str, Any]) -> dict[str, Any]:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


HANDLERS: dict[str, Handler] = {
    "echo": echo,
    "explode": explode,
    "refuse": refuse,
    "unencodable": unencodable,
    "not_a_map": not_a_map,
    "int_keys": int_keys,
    "hang": hang,
}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


async def start(
    nursery: trio.Nursery, path: Path, handlers: dict[str, Handler] | None = None, **kw: Any
) -> None:
    await nursery.start(functools.partial(serve_control, path, handlers or HANDLERS, **kw))


def frame(msg: Message) -> bytes:
    return encode_frame(encode(msg), MAX_FRAME)


def packed(obj: Any) -> bytes:
    return encode_frame(msgpack.packb(obj), MAX_FRAME)


async def exchange(path: Path, data: bytes, *, eof: bool = False) -> list[Message]:
    """Send raw bytes, then collect every message until the server closes the connection."""
    messages: list[Message] = []
    decoder = FrameDecoder(MAX_FRAME)
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(data)
        if eof:
            await stream.send_eof()
        with trio.fail_after(5):
            while True:
                try:
                    chunk = await stream.receive_some()
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                decoder.feed(chunk)
                messages.extend(decode(f, CONTROL) for f in decoder.frames())
    return messages


# --- wire messages -------------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    for msg in (
        Request("status", {"verbose": True, "n": [1, 2]}),
        Request("status"),
        Response(ok=True, result={"peers": 3}),
        Response(ok=False, error="no"),
        Reject(int(RejectCode.MALFORMED), "bad"),
    ):
        assert decode(encode(msg), CONTROL) == msg


@pytest.mark.parametrize(
    "build",
    [
        lambda: Request(""),
        lambda: Request("x" * 65),
        lambda: Request("m", {1: 2}),
        lambda: Response(ok=True, error="but"),
        lambda: Response(ok=False),
        lambda: Response(ok=True, result=[]),  # type: ignore[arg-type]
    ],
)
def test_invalid_messages_refused(build: Any) -> None:
    with pytest.raises(ProtocolViolation):
        build()


# --- requests and answers ------------------------------------------------------------------------


async def test_call_returns_result(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        assert await call(sock_path, "echo", {"a": [1, "b"]}) == {"echo": {"a": [1, "b"]}}
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_several_requests_on_one_connection(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        data = b"".join(frame(Request("echo", {"i": i})) for i in range(3))
        answers = await exchange(sock_path, data, eof=True)
        assert answers == [Response(ok=True, result={"echo": {"i": i}}) for i in range(3)]
        nursery.cancel_scope.cancel()


async def test_unknown_method_names_known_methods(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, {"status": echo, "peers": echo})
        known = "unknown method 'stauts'; known methods: peers, status"
        with pytest.raises(CommandFailed, match=known):
            await call(sock_path, "stauts")
        nursery.cancel_scope.cancel()


async def test_handler_exception_is_reported_and_logged(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        with (
            caplog.at_level(logging.ERROR, logger="dandelion_p2p.control"),
            pytest.raises(CommandFailed, match="explode failed: RuntimeError: boom"),
        ):
            await call(sock_path, "explode")
        assert any("explode" in r.getMessage() and r.exc_info for r in caplog.records)
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("refuse", "^no training run named 'x'$"),
        ("unencodable", "unencodable returned a result that cannot be sent: can not serial"),
        ("int_keys", "int_keys returned a result that cannot be sent"),
        ("not_a_map", "not_a_map returned a result .* returned list, not a dict"),
    ],
)
async def test_handler_failures_become_errors(sock_path: Path, method: str, message: str) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        with pytest.raises(CommandFailed, match=message) as info:
            await call(sock_path, method)
        assert info.value.method == method
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_oversized_result_becomes_error(sock_path: Path) -> None:
    async def huge(params: dict[str, Any]) -> dict[str, Any]:
        return {"blob": b"x" * MAX_FRAME}

    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, {"huge": huge})
        with pytest.raises(CommandFailed, match=r"huge returned .* over the 1048576-byte limit"):
            await call(sock_path, "huge")
        nursery.cancel_scope.cancel()


async def test_concurrent_clients(sock_path: Path) -> None:
    n = 8
    arrived = 0
    all_here = trio.Event()

    # Every caller waits until all have arrived: this only finishes if served concurrently.
    async def gather(params: dict[str, Any]) -> dict[str, Any]:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_here.set()
        await all_here.wait()
        return {"i": params["i"]}

    results: dict[int, dict[str, Any]] = {}

    async def one(i: int) -> None:
        results[i] = await call(sock_path, "gather", {"i": i})

    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, {"gather": gather})
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                for i in range(n):
                    clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert results == {i: {"i": i} for i in range(n)}


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (HEADER.pack(5) + b"hello", RejectCode.MALFORMED),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", RejectCode.TOO_LARGE),
        (HEADER.pack(0), RejectCode.MALFORMED),
        (HEADER.pack(MAX_FRAME + 1), RejectCode.TOO_LARGE),
        (encode_frame(b"\x93\x01\x07\x80", MAX_FRAME), RejectCode.UNKNOWN_TYPE),
        (encode_frame(b"\x93\x02\x01\x80", MAX_FRAME), RejectCode.UNSUPPORTED_VERSION),
        (frame(Response(ok=True)), RejectCode.UNEXPECTED),
        (packed([1, 1, {"method": "echo", "params": {}, "extra": 1}]), RejectCode.INVALID_FIELD),
        (packed([1, 1, {"method": "echo", "params": []}]), RejectCode.INVALID_FIELD),
        (packed([1, 1, {"method": ""}]), RejectCode.INVALID_FIELD),
        (packed({"method": "echo"}), RejectCode.MALFORMED),
    ],
)
async def test_bad_input_is_rejected_and_server_survives(
    sock_path: Path, data: bytes, code: RejectCode
) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        answers = await exchange(sock_path, data)
        assert len(answers) == 1
        assert isinstance(answers[0], Reject)
        assert answers[0].code == code
        assert await call(sock_path, "echo", {"after": 1}) == {"echo": {"after": 1}}
        nursery.cancel_scope.cancel()


async def test_random_garbage_does_not_kill_server(sock_path: Path) -> None:
    rng = random.Random(7)
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, read_timeout=0.2)
        for size in (1, 3, 4, 100, 5000):
            # Garbage whose first 4 bytes read as a plausible length ends in a TIMEOUT reject.
            answers = await exchange(sock_path, rng.randbytes(size))
            assert all(isinstance(a, Reject) for a in answers)
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_oversized_frame_is_refused_before_its_payload(sock_path: Path) -> None:
    got: list[object] = []

    async def send(stream: trio.SocketStream) -> None:
        # The server stops reading after the header, so this send ends broken.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(HEADER.pack(2 * MAX_FRAME) + b"x" * 500_000)

    async def receive(stream: trio.SocketStream) -> None:
        decoder = FrameDecoder(MAX_FRAME)
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                decoder.feed(chunk)
                got.extend(decode(f, CONTROL) for f in decoder.frames())

    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        async with await trio.open_unix_socket(str(sock_path)) as stream:
            with trio.fail_after(5):
                async with trio.open_nursery() as io:
                    io.start_soon(send, stream)
                    io.start_soon(receive, stream)
        assert [getattr(m, "code", None) for m in got] == [RejectCode.TOO_LARGE]
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_truncated_frame_is_rejected(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        answers = await exchange(sock_path, frame(Request("echo"))[:-2], eof=True)
        assert [type(a) for a in answers] == [Reject]
        nursery.cancel_scope.cancel()


async def test_slow_request_times_out(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, read_timeout=0.2)
        answers = await exchange(sock_path, frame(Request("echo"))[:-2])
        assert answers == [Reject(int(RejectCode.TIMEOUT), "request incomplete after 0.2 s")]
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed_quietly(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path, read_timeout=0.2)
        assert await exchange(sock_path, frame(Request("echo"))) == [
            Response(ok=True, result={"echo": {}})
        ]
        nursery.cancel_scope.cancel()


# --- the socket file -----------------------------------------------------------------------------


async def test_socket_mode_and_cleanup(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not sock_path.exists()


async def test_creates_missing_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "new" / "control.sock"
    async with trio.open_nursery() as nursery:
        await start(nursery, path)
        assert await call(path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    assert sock_path.exists()
    with pytest.raises(PeerUnavailable):
        await call(sock_path, "echo")
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_live_socket_is_refused(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        with pytest.raises(AlreadyRunning, match="another daemon is already running"):
            await serve_control(sock_path, HANDLERS)
        # The refused second server must not have touched the first one's socket.
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def test_non_socket_file_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await serve_control(sock_path, HANDLERS)
    assert sock_path.read_text() == "precious"


async def test_replaced_socket_file_is_not_removed(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        sock_path.unlink()
        sock_path.write_text("someone else's")
        nursery.cancel_scope.cancel()
    assert sock_path.read_text() == "someone else's"


async def test_too_long_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(ConfigError, match="byte limit for Unix socket paths"):
        await serve_control(path, HANDLERS)
    with pytest.raises(ConfigError, match="byte limit for Unix socket paths"):
        await call(path, "echo")


# --- the client ----------------------------------------------------------------------------------


async def test_call_without_daemon(sock_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="no daemon is running") as info:
        await call(sock_path, "echo")
    assert str(sock_path) in str(info.value)


async def test_call_times_out(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        with pytest.raises(PeerUnavailable, match=r"did not answer 'hang' within 0.2 s"):
            await call(sock_path, "hang", timeout=0.2)
        assert await call(sock_path, "echo") == {"echo": {}}
        nursery.cancel_scope.cancel()


async def fake_daemon(path: Path, answer: bytes, task_status: Any) -> None:
    """A listener that answers every connection with fixed bytes, then closes."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()

    async def reply(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            if answer:
                await stream.send_all(answer)

    await trio.serve_listeners(reply, [trio.SocketListener(listener)], task_status=task_status)


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (frame(Reject(int(RejectCode.RATE_LIMITED), "slow down")), RemoteRejected, "slow down"),
        (HEADER.pack(3) + b"xyz", ProtocolViolation, "MALFORMED"),
        (frame(Request("echo")), ProtocolViolation, "expected a Response"),
        (b"", PeerUnavailable, "closed the connection without answering"),
    ],
)
async def test_call_bad_answers(
    sock_path: Path, answer: bytes, error: type[Exception], message: str
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_daemon, sock_path, answer)
        with pytest.raises(error, match=message):
            await call(sock_path, "echo")
        nursery.cancel_scope.cancel()


async def test_call_sync(sock_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        await start(nursery, sock_path)
        # call_sync runs its own event loop, so it must run outside this one.
        result = await trio.to_thread.run_sync(call_sync, sock_path, "echo", {"x": 1})
        assert result == {"echo": {"x": 1}}
        nursery.cancel_scope.cancel()


def test_call_sync_without_daemon(sock_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="no daemon is running"):
        call_sync(sock_path, "status")
