"""The client's end of the control socket: ask a running daemon to run one method."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from dandelion_p2p.config import check_socket_path
from dandelion_p2p.control.protocol import ClientConnection, request_frame
from dandelion_p2p.errors import ConfigError, PeerUnavailable

RECEIVE_CHUNK = 64 * 1024


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
    frame = request_frame(method, params)
    connection = ClientConnection(method)
    try:
        with trio.fail_after(timeout):
            stream = await _connect(path)
            async with stream:
                await stream.send_all(frame)
                while True:
                    data = await stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        raise PeerUnavailable(
                            f"the daemon on {path} closed the connection without answering"
                        )
                    result = connection.receive_data(data)
                    if result is not None:
                        return result
    except trio.TooSlowError:
        raise PeerUnavailable(
            f"the daemon on {path} did not answer {method!r} within {timeout:g} s"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise PeerUnavailable(
            f"the daemon on {path} closed the connection without answering {method!r}"
        ) from None


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
