"""The local control socket: how command-line tools talk to a running daemon.

A Unix stream socket in the data directory (mode 0600, so only the daemon's user may connect)
carries length-prefixed msgpack frames of the ``control`` wire family. A client sends a
``Request``; the daemon answers each with one ``Response``, in order, and several requests may
follow each other on one connection. A frame the daemon cannot accept is answered with a
``Reject`` and the connection is closed; nothing a client sends can stop the server.

At start the daemon probes an existing socket file: if another daemon answers, it refuses to
start (``AlreadyRunning``); if nothing answers, the file is stale and is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

import trio

from dandelion_p2p.config import check_socket_path
from dandelion_p2p.errors import (
    ConfigError,
    DandelionError,
    PeerUnavailable,
    ProtocolViolation,
    RemoteRejected,
)
from dandelion_p2p.wire import (
    FrameDecoder,
    Message,
    Registry,
    Reject,
    RejectCode,
    decode,
    encode,
    encode_frame,
    invalid,
)

logger = logging.getLogger(__name__)

CONTROL = Registry("control")

MAX_FRAME = 1 << 20
READ_TIMEOUT = 10.0
"""Seconds a connection may take to deliver each complete request, or stay idle between them."""
MAX_METHOD_LENGTH = 64
MAX_ERROR_LENGTH = 4096
PROBE_TIMEOUT = 2.0
REJECT_SEND_TIMEOUT = 1.0
RECEIVE_CHUNK = 64 * 1024
BACKLOG = 64

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@CONTROL.message(1)
class Request(Message):
    """Run ``method`` with ``params`` in the daemon."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.method or len(self.method) > MAX_METHOD_LENGTH:
            raise invalid(f"Request.method must be 1..{MAX_METHOD_LENGTH} characters")
        _check_map(self.params, "Request.params")


@CONTROL.message(2)
class Response(Message):
    """The outcome of one request: ``result`` when ``ok``, else a human-readable ``error``."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def check(self) -> None:
        _check_map(self.result, "Response.result")
        if self.ok and self.error:
            raise invalid("Response.error must be empty when ok")
        if not self.ok and not self.error:
            raise invalid("Response.error must say what failed when not ok")


def _check_map(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise invalid(f"{where} must be a map with string keys")


class AlreadyRunning(ConfigError):
    """Another daemon answers on the control socket this one would bind."""


class CommandFailed(DandelionError):
    """The daemon received the request but the method failed or does not exist."""

    def __init__(self, method: str, error: str) -> None:
        self.method = method
        self.error = error
        super().__init__(error)


# ---------------------------------------------------------------------------------------------
# Server


async def serve_control(
    path: Path,
    handlers: Mapping[str, Handler],
    *,
    read_timeout: float = READ_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
) -> None:
    """Serve ``handlers`` on a Unix socket at ``path`` until cancelled.

    Each handler gets the request's params and returns the result map. Connections are served
    concurrently; requests on one connection in order. Signals ``task_status.started()`` once
    the socket accepts connections.

    Raises:
        AlreadyRunning: another daemon answers on ``path``.
        ConfigError: ``path`` is too long for a Unix socket, exists and is not a socket, or
            cannot be created.

    Cancellation closes the socket, cancels running handlers and removes the socket file, unless
    it was since replaced by someone else's.
    """
    path = Path(path)
    check_socket_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path.parent}: {exc.strerror}") from None
    await _clear_stale(path)
    raw, bound = _bind(path)
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        serve = functools.partial(_serve_connection, handlers=handlers, read_timeout=read_timeout)
        logger.info("control socket listening on %s", path)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, serve, [listener])
            task_status.started()
    finally:
        raw.close()
        _remove_if_ours(path, bound)


async def _clear_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    if await _answers(path):
        raise AlreadyRunning(
            f"another daemon is already running: it answers on {path}; stop it first or "
            "give this one a different data directory"
        )
    path.unlink(missing_ok=True)
    logger.info("removed stale control socket %s", path)


async def _answers(path: Path) -> bool:
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise ConfigError(f"cannot probe control socket {path}: {exc.strerror}") from None
        await trio.aclose_forcefully(stream)
        return True
    # A full backlog stalls the connect; only a live listener has a backlog to fill.
    return True


def _bind(path: Path) -> tuple[socket.socket, os.stat_result]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket file takes its mode from the umask at bind time; narrowing the umask closes
        # the window in which another user could connect before the chmod below.
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        bound = os.stat(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyRunning(
                f"another daemon bound {path} while this one was starting"
            ) from None
        raise ConfigError(f"cannot create control socket {path}: {exc.strerror}") from None
    return sock, bound


def _remove_if_ours(path: Path, bound: os.stat_result) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
        path.unlink(missing_ok=True)


async def _serve_connection(
    stream: trio.SocketStream, *, handlers: Mapping[str, Handler], read_timeout: float
) -> None:
    # Runs as a task of serve_listeners, which would crash on any exception escaping here.
    try:
        async with stream:
            decoder = FrameDecoder(MAX_FRAME)
            while True:
                try:
                    frame = await _next_frame(stream, decoder, read_timeout)
                    if frame is None:
                        return
                    request = decode(frame, CONTROL)
                    if not isinstance(request, Request):
                        raise ProtocolViolation(
                            RejectCode.UNEXPECTED,
                            f"expected a Request, got {type(request).__name__}",
                        )
                except ProtocolViolation as exc:
                    await _reject(stream, exc)
                    return
                answer = await _answer(request, handlers)
                # A client that stops reading must not pin this task for ever.
                with trio.fail_after(read_timeout):
                    await stream.send_all(answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        logger.debug("control client went away before its answer was sent")
    except trio.TooSlowError:
        logger.warning("control client did not read its answer within %g s", read_timeout)
    except Exception:
        logger.exception("control connection failed")


async def _next_frame(
    stream: trio.SocketStream, decoder: FrameDecoder, timeout: float
) -> bytes | None:
    """The next complete frame, or None when the client is done or idle for ``timeout``.

    Raises:
        ProtocolViolation: a bad length, a truncated frame, or a frame still incomplete after
            ``timeout``.
    """
    with trio.move_on_after(timeout):
        while True:
            frame = next(decoder.frames(), None)
            if frame is not None:
                return frame
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                if decoder.pending:
                    raise ProtocolViolation(
                        RejectCode.MALFORMED,
                        f"connection closed {decoder.pending} bytes into a frame",
                    )
                return None
            decoder.feed(data)
    if decoder.pending:
        raise ProtocolViolation(RejectCode.TIMEOUT, f"request incomplete after {timeout:g} s")
    return None


async def _reject(stream: trio.SocketStream, exc: ProtocolViolation) -> None:
    logger.warning("rejected control client: %s", exc)
    frame = encode_frame(encode(Reject(int(exc.code), exc.detail[:512])), MAX_FRAME)
    # Best effort: a client that sent garbage may not read the answer, and must not hold us.
    with trio.move_on_after(REJECT_SEND_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(frame)


async def _answer(request: Request, handlers: Mapping[str, Handler]) -> bytes:
    """Run the request's handler and encode its outcome as one response frame."""
    method = request.method
    handler = handlers.get(method)
    if handler is None:
        known = ", ".join(sorted(handlers)) or "none"
        return _failure(f"unknown method {method!r}; known methods: {known}")
    try:
        result = await handler(dict(request.params))
    except DandelionError as exc:
        # Raised on purpose with a message written for the user; no traceback needed.
        logger.warning("control method %s failed: %s", method, exc)
        return _failure(str(exc))
    except Exception as exc:
        logger.exception("control method %s failed", method)
        return _failure(f"{method} failed: {type(exc).__name__}: {exc}")
    try:
        return _encode_result(result)
    except (TypeError, ValueError, OverflowError, ProtocolViolation) as exc:
        logger.error("control method %s returned a result that cannot be sent: %s", method, exc)
        return _failure(f"{method} returned a result that cannot be sent: {exc}")


def _encode_result(result: Any) -> bytes:
    if not isinstance(result, dict):
        raise TypeError(f"the handler returned {type(result).__name__}, not a dict")
    payload = encode(Response(ok=True, result=result))
    if len(payload) > MAX_FRAME:
        raise ValueError(f"{len(payload)} bytes is over the {MAX_FRAME}-byte limit")
    # Encoding accepts things decoding refuses (e.g. integer map keys); find out here, where
    # the handler can be blamed, rather than in the client as a protocol violation.
    decode(payload, CONTROL)
    return encode_frame(payload, MAX_FRAME)


def _failure(error: str) -> bytes:
    if len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 3] + "..."
    return encode_frame(encode(Response(ok=False, error=error)), MAX_FRAME)


# ---------------------------------------------------------------------------------------------
# Client


async def call(
    path: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Run ``method`` in the daemon listening on ``path`` and return its result map.

    Raises:
        PeerUnavailable: no daemon is running at ``path``, it closed the connection without an
            answer, or it took longer than ``timeout`` seconds.
        CommandFailed: the method is unknown or failed; the message is the daemon's.
        RemoteRejected: the daemon refused the request frame.
        ProtocolViolation: the daemon's answer is malformed.
        ConfigError: ``path`` is too long for a Unix socket or not ours to connect to.
        ValueError: ``method`` is empty or too long, or the request exceeds ``MAX_FRAME``.

    Cancellation closes the connection; the daemon may still finish running the method.
    """
    path = Path(path)
    check_socket_path(path)
    try:
        request = Request(method, dict(params or {}))
    except ProtocolViolation as exc:
        raise ValueError(f"cannot send this request: {exc.detail}") from None
    frame = encode_frame(encode(request), MAX_FRAME)
    try:
        with trio.fail_after(timeout):
            stream = await _connect(path)
            async with stream:
                await stream.send_all(frame)
                answer = await _read_answer(stream, path)
    except trio.TooSlowError:
        raise PeerUnavailable(
            f"the daemon on {path} did not answer {method!r} within {timeout:g} s"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise PeerUnavailable(
            f"the daemon on {path} closed the connection without answering {method!r}"
        ) from None
    if isinstance(answer, Reject):
        raise RemoteRejected(answer.code, answer.detail)
    if not isinstance(answer, Response):
        raise ProtocolViolation(
            RejectCode.UNEXPECTED, f"expected a Response, got {type(answer).__name__}"
        )
    if not answer.ok:
        raise CommandFailed(method, answer.error)
    return answer.result


def call_sync(
    path: Path, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """``call`` for synchronous code such as the CLI; must not be used inside a trio run."""
    return trio.run(call, path, method, params, timeout)


async def _connect(path: Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise PeerUnavailable(
            f"no daemon is running: nothing answers on the control socket {path}"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"permission denied on control socket {path}; is the daemon run by another user?"
        ) from None
    except OSError as exc:
        raise PeerUnavailable(f"cannot reach the daemon on {path}: {exc.strerror}") from None


async def _read_answer(stream: trio.SocketStream, path: Path) -> Message:
    decoder = FrameDecoder(MAX_FRAME)
    while True:
        frame = next(decoder.frames(), None)
        if frame is not None:
            return decode(frame, CONTROL)
        data = await stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise PeerUnavailable(f"the daemon on {path} closed the connection without answering")
        decoder.feed(data)
