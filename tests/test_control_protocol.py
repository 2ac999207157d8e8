"""The control protocol's core without a socket: both ends pushed bytes by hand."""

from __future__ import annotations

import logging

import pytest

from dandelion_p2p.control.protocol import (
    MAX_ERROR_LENGTH,
    MAX_FRAME,
    ClientConnection,
    CommandFailed,
    Request,
    Response,
    ServerConnection,
    error_frame,
    failure_frame,
    reject_frame,
    request_frame,
    result_frame,
    unknown_method_frame,
)
from dandelion_p2p.errors import ConfigError, ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.wire import encode, encode_frame
from dandelion_p2p.wire.framing import HEADER


def requests_from(data: bytes, piece: int = 3) -> list[Request]:
    """Everything a server end makes of ``data`` arriving in ``piece``-byte reads, then EOF."""
    server = ServerConnection()
    found = []
    for start in range(0, len(data), piece):
        server.receive_data(data[start:start + piece])
        while (request := server.next_request()) is not None:
            found.append(request)
    server.receive_data(b"")
    assert server.closed and server.next_request() is None
    return found


def test_requests_cut_anywhere_come_out_whole_and_in_order() -> None:
    data = b"".join(request_frame("echo", {"i": i}) for i in range(3))
    for piece in (1, 3, 7, len(data)):
        assert requests_from(data, piece) == [Request("echo", {"i": i}) for i in range(3)]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (HEADER.pack(MAX_FRAME + 1), RejectCode.TOO_LARGE),
        (HEADER.pack(0), RejectCode.MALFORMED),
        (encode_frame(encode(Response(ok=True)), MAX_FRAME), RejectCode.UNEXPECTED),
        (encode_frame(b"\x93\x01\x01\x80", MAX_FRAME), RejectCode.INVALID_FIELD),
        (request_frame("echo")[:-1], RejectCode.MALFORMED),  # then the client hangs up
    ],
)
def test_what_the_server_end_refuses(data: bytes, code: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        requests_from(data, piece=len(data))
    assert exc.value.code == code


def test_a_timeout_is_a_violation_only_in_the_middle_of_a_frame() -> None:
    server = ServerConnection()
    server.timed_out(10.0)  # idle: closed quietly
    server.receive_data(request_frame("status")[:5])
    assert server.next_request() is None
    with pytest.raises(ProtocolViolation) as exc:
        server.timed_out(10.0)
    assert exc.value.code == RejectCode.TIMEOUT


def answer_to(method: str, frame: bytes, piece: int = 5) -> dict[str, object]:
    """The client end's reading of the server's ``frame``, in ``piece``-byte reads."""
    client = ClientConnection(method)
    for start in range(0, len(frame), piece):
        result = client.receive_data(frame[start:start + piece])
        if result is not None:
            assert start + piece >= len(frame)
            return result
    raise AssertionError("no answer")


def test_answers_reach_the_client_as_results_or_errors() -> None:
    assert answer_to("echo", result_frame("echo", {"a": [1, "b"]})) == {"a": [1, "b"]}
    with pytest.raises(CommandFailed, match="unknown method 'stauts'; known methods: a, b"):
        answer_to("stauts", unknown_method_frame("stauts", ["b", "a"]))
    with pytest.raises(CommandFailed, match=r"^no run named 'x'$") as failed:
        answer_to("refuse", error_frame("refuse", ConfigError("no run named 'x'")))
    assert failed.value.method == "refuse"
    with pytest.raises(RemoteRejected) as rejected:
        answer_to("x", reject_frame(ProtocolViolation(RejectCode.TIMEOUT, "slow")))
    assert rejected.value.code == RejectCode.TIMEOUT
    with pytest.raises(ProtocolViolation) as unexpected:
        answer_to("x", request_frame("x"))
    assert unexpected.value.code == RejectCode.UNEXPECTED


def test_a_crashing_handler_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        crash = exc
    with caplog.at_level(logging.ERROR, logger="dandelion_p2p.control"):
        frame = error_frame("explode", crash)
    with pytest.raises(CommandFailed, match=r"^explode failed: RuntimeError: boom$"):
        answer_to("explode", frame)
    assert any("explode" in r.getMessage() and r.exc_info for r in caplog.records)


def test_results_that_cannot_be_sent_become_errors() -> None:
    cases = {
        "not a map": ([1, 2], "returned list, not a dict"),
        "int keys": ({"by_rank": {0: "a"}}, "cannot be sent"),
        "too big": ({"blob": b"x" * MAX_FRAME}, "over the 1048576-byte limit"),
    }
    for method, (result, why) in cases.items():
        with pytest.raises(CommandFailed, match=why):
            answer_to(method, result_frame(method, result))


def test_long_errors_are_cut() -> None:
    with pytest.raises(CommandFailed) as exc:
        answer_to("m", failure_frame("e" * (2 * MAX_ERROR_LENGTH)))
    assert len(exc.value.error) == MAX_ERROR_LENGTH and exc.value.error.endswith("...")


def test_requests_the_client_may_not_send() -> None:
    for method, params in (("", {}), ("x" * 65, {}), ("m", {"blob": b"x" * MAX_FRAME})):
        with pytest.raises(ValueError):
            request_frame(method, params)
