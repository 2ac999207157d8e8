"""The control protocol without I/O: its messages, and both ends as bytes in, bytes out.

``ServerConnection`` is one client connection as the daemon sees it: feed it the bytes read
from the socket, take complete ``Request`` s out, and encode each outcome with
``result_frame`` / ``error_frame`` / ``unknown_method_frame``; a frame it cannot accept raises
``ProtocolViolation``, answered with ``reject_frame`` before the connection is closed.
``request_frame`` and ``ClientConnection`` are the client's half. Time, sockets and the
handlers themselves belong to the adapters (``control.server``, ``control.client``).

Spec: protocol/control.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import field
from typing import Any

from dandelion_p2p.errors import (
    ConfigError,
    DandelionError,
    ProtocolViolation,
    RejectCode,
    RemoteRejected,
)
from dandelion_p2p.wire import (
    FrameDecoder,
    Message,
    Registry,
    Reject,
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
# The daemon's end


class ServerConnection:
    """One client connection, seen by the daemon: bytes in, requests out.

    Raises ``ProtocolViolation`` (from ``receive_data``, ``next_request`` or ``timed_out``)
    for what control.md section 3 answers with a ``Reject`` and a closed connection.
    """

    def __init__(self) -> None:
        self._decoder = FrameDecoder(MAX_FRAME)
        self.closed = False
        """The client closed its side; nothing more will come."""

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the socket; ``b""`` when the client closed its side."""
        if data:
            self._decoder.feed(data)
            return
        self.closed = True
        if self._decoder.pending:
            raise ProtocolViolation(
                RejectCode.MALFORMED,
                f"connection closed {self._decoder.pending} bytes into a frame",
            )

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive (or ever, once closed)."""
        frame = next(self._decoder.frames(), None)
        if frame is None:
            return None
        request = decode(frame, CONTROL)
        if not isinstance(request, Request):
            raise ProtocolViolation(
                RejectCode.UNEXPECTED, f"expected a Request, got {type(request).__name__}"
            )
        return request

    def timed_out(self, timeout: float) -> None:
        """The read timeout passed: a violation if part of a frame is waiting, else quiet."""
        if self._decoder.pending:
            raise ProtocolViolation(RejectCode.TIMEOUT, f"request incomplete after {timeout:g} s")


def reject_frame(exc: ProtocolViolation) -> bytes:
    return encode_frame(encode(Reject(int(exc.code), exc.detail[:512])), MAX_FRAME)


def failure_frame(error: str) -> bytes:
    if len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 3] + "..."
    return encode_frame(encode(Response(ok=False, error=error)), MAX_FRAME)


def unknown_method_frame(method: str, known: Iterable[str]) -> bytes:
    names = ", ".join(sorted(known)) or "none"
    return failure_frame(f"unknown method {method!r}; known methods: {names}")


def error_frame(method: str, exc: Exception) -> bytes:
    """The answer to a handler that raised ``exc``; logged here."""
    if isinstance(exc, DandelionError):
        # Raised on purpose with a message written for the user; no traceback needed.
        logger.warning("control method %s failed: %s", method, exc)
        return failure_frame(str(exc))
    logger.error("control method %s failed", method, exc_info=exc)
    return failure_frame(f"{method} failed: {type(exc).__name__}: {exc}")


def result_frame(method: str, result: Any) -> bytes:
    """The answer carrying a handler's ``result``, or a failure saying why it cannot be sent."""
    try:
        return _encode_result(result)
    except (TypeError, ValueError, OverflowError, ProtocolViolation) as exc:
        logger.error("control method %s returned a result that cannot be sent: %s", method, exc)
        return failure_frame(f"{method} returned a result that cannot be sent: {exc}")


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


# ---------------------------------------------------------------------------------------------
# The client's end


def request_frame(method: str, params: dict[str, Any] | None = None) -> bytes:
    """The frame asking for ``method``; raises ``ValueError`` for a request we may not send."""
    try:
        request = Request(method, dict(params or {}))
    except ProtocolViolation as exc:
        raise ValueError(f"cannot send this request: {exc.detail}") from None
    return encode_frame(encode(request), MAX_FRAME)


class ClientConnection:
    """The client's end of one exchange: bytes in, the method's result out."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._decoder = FrameDecoder(MAX_FRAME)

    def receive_data(self, data: bytes) -> dict[str, Any] | None:
        """The result once the answer is complete, else None (more bytes needed).

        Raises:
            CommandFailed: the method is unknown or failed; the message is the daemon's.
            RemoteRejected: the daemon refused the request frame.
            ProtocolViolation: the answer is malformed or not a ``Response``.
        """
        self._decoder.feed(data)
        frame = next(self._decoder.frames(), None)
        if frame is None:
            return None
        answer: Message = decode(frame, CONTROL)
        if isinstance(answer, Reject):
            raise RemoteRejected(answer.code, answer.detail)
        if not isinstance(answer, Response):
            raise ProtocolViolation(
                RejectCode.UNEXPECTED, f"expected a Response, got {type(answer).__name__}"
            )
        if not answer.ok:
            raise CommandFailed(self.method, answer.error)
        return answer.result
