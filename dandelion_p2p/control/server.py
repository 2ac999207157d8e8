"""The daemon's end of the control socket: a Unix socket served with trio.

The socket lives in the data directory (mode 0600, so only the daemon's user may connect).
What is said on it is decided in ``control.protocol``; this module binds the socket, reads
and writes it, times it, and runs the handlers. Nothing a client sends can stop the server.

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
from collections.abc import Mapping
from pathlib import Path

import trio

from dandelion_p2p.config import check_socket_path
from dandelion_p2p.control.protocol import (
    READ_TIMEOUT,
    AlreadyRunning,
    Handler,
    Request,
    ServerConnection,
    error_frame,
    reject_frame,
    result_frame,
    unknown_method_frame,
)
from dandelion_p2p.errors import ConfigError, ProtocolViolation

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
REJECT_SEND_TIMEOUT = 1.0
RECEIVE_CHUNK = 64 * 1024
BACKLOG = 64


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
            connection = ServerConnection()
            while True:
                try:
                    request = await _next_request(stream, connection, read_timeout)
                except ProtocolViolation as exc:
                    await _reject(stream, exc)
                    return
                if request is None:
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


async def _next_request(
    stream: trio.SocketStream, connection: ServerConnection, timeout: float
) -> Request | None:
    """The next request, or None when the client is done or idle for ``timeout``.

    Raises:
        ProtocolViolation: a bad frame, a truncated frame, or a frame still incomplete after
            ``timeout``.
    """
    with trio.move_on_after(timeout):
        while True:
            request = connection.next_request()
            if request is not None or connection.closed:
                return request
            connection.receive_data(await stream.receive_some(RECEIVE_CHUNK))
    connection.timed_out(timeout)
    return None


async def _reject(stream: trio.SocketStream, exc: ProtocolViolation) -> None:
    logger.warning("rejected control client: %s", exc)
    # Best effort: a client that sent garbage may not read the answer, and must not hold us.
    with trio.move_on_after(REJECT_SEND_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(reject_frame(exc))


async def _answer(request: Request, handlers: Mapping[str, Handler]) -> bytes:
    """Run the request's handler and encode its outcome as one response frame."""
    handler = handlers.get(request.method)
    if handler is None:
        return unknown_method_frame(request.method, handlers)
    try:
        result = await handler(dict(request.params))
    except Exception as exc:
        return error_frame(request.method, exc)
    return result_frame(request.method, result)
