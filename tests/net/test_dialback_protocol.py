"""The dial-back protocol pushed through its sans-IO core: no host, no socket."""

from __future__ import annotations

import pytest

from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.net.dht.messages import FindNode
from dandelion_p2p.net.dialback.protocol import (
    DIALBACK,
    MAX_ADDRS,
    DialBackRequest,
    DialBackResult,
    ListenerProbe,
    ProbeTarget,
    as_request,
    dial_back_request,
    dial_back_result,
    observed_ip,
    probe_targets,
    read_result,
    tcp_target,
)
from dandelion_p2p.wire import RejectCode, decode, encode

HOME = "203.0.113.7"
CIRCUIT = "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit"


def test_the_requester_asks_about_its_first_direct_addresses_only() -> None:
    direct = [f"/ip4/{HOME}/tcp/{4000 + i}" for i in range(MAX_ADDRS + 2)]
    ask = dial_back_request([CIRCUIT, *direct])
    assert ask is not None
    assert ask.addrs == tuple(direct[:MAX_ADDRS])
    assert dial_back_request([CIRCUIT]) is None
    assert dial_back_request([]) is None


def test_the_helper_probes_only_tcp_over_ipv4_at_the_observed_ip() -> None:
    ask = DialBackRequest(addrs=(
        f"/ip4/{HOME}/tcp/4001",
        "/ip4/192.0.2.1/tcp/4001",  # a third party: never dialled
        f"/ip4/{HOME}/udp/4001/quic-v1",
        "/ip6/::1/tcp/4001",
        "/dns4/example.org/tcp/4001",
        f"/ip4/{HOME}/tcp/4002/p2p-circuit",
        "not a multiaddr",
        f"/ip4/{HOME}/tcp/4003",
    ))
    assert probe_targets(ask, HOME) == [
        ProbeTarget(f"/ip4/{HOME}/tcp/4001", HOME, 4001),
        ProbeTarget(f"/ip4/{HOME}/tcp/4003", HOME, 4003),
    ]
    assert tcp_target("/ip6/::1/tcp/1") is None


def test_the_observed_ip_is_that_of_the_first_direct_connection() -> None:
    relayed = ([CIRCUIT], "198.51.100.1")
    unknown = ([f"/ip4/{HOME}/tcp/1"], None)
    direct = ([f"/ip4/{HOME}/tcp/1"], HOME)
    assert observed_ip([relayed, unknown, direct, ([], "192.0.2.9")]) == HOME
    with pytest.raises(ProtocolViolation) as info:
        observed_ip([relayed, unknown])
    assert info.value.code is RejectCode.UNEXPECTED


def test_anything_but_a_request_is_an_unknown_type() -> None:
    with pytest.raises(ProtocolViolation) as info:
        as_request(FindNode(target=bytes(32)))
    assert info.value.code is RejectCode.UNKNOWN_TYPE
    ask = DialBackRequest(addrs=("/ip4/1.2.3.4/tcp/1",))
    assert as_request(decode(encode(ask), DIALBACK)) == ask


def test_the_result_lists_the_reached_addresses_in_the_order_asked() -> None:
    addrs = tuple(f"/ip4/{HOME}/tcp/{port}" for port in (1, 2, 3))
    ask = DialBackRequest(addrs=addrs)
    result = dial_back_result(ask, HOME, [addrs[2], addrs[0]])  # as the probes finished
    assert result == DialBackResult(reachable=(addrs[0], addrs[2]), observed_ip=HOME)
    assert read_result("helper", decode(encode(result), DIALBACK)) == result


def test_a_reply_that_is_not_a_result_makes_the_helper_unavailable() -> None:
    with pytest.raises(PeerUnavailable):
        read_result("helper", DialBackRequest(addrs=("/ip4/1.2.3.4/tcp/1",)))


@pytest.mark.parametrize("addrs", [(), tuple(["/ip4/1.2.3.4/tcp/1"] * (MAX_ADDRS + 1)),
                                   ("/" + "x" * 300,)])
def test_requests_out_of_bounds_are_invalid(addrs: tuple[str, ...]) -> None:
    with pytest.raises(ProtocolViolation) as info:
        DialBackRequest(addrs=addrs)
    assert info.value.code is RejectCode.INVALID_FIELD


def test_the_probe_greets_in_multistream_and_waits_for_the_header() -> None:
    assert ListenerProbe.GREETING == b"\x13/multistream/1.0.0\n"
    probe = ListenerProbe()
    answer = ListenerProbe.GREETING
    assert probe.receive(answer[:5]) is None
    assert probe.receive(answer[5:]) is True


@pytest.mark.parametrize(
    "pieces, verdict",
    [
        ([b""], False),  # closed at once
        ([b"\x13/multistream", b""], False),  # closed before the whole header
        ([b"HTTP/1.1 400 Bad Request\r\n\r\n"], False),  # something else listens
        ([b"\x13/multistream/1.0.0", b"\n"], True),
    ],
)
def test_the_probe_verdict(pieces: list[bytes], verdict: bool) -> None:
    probe = ListenerProbe()
    results = [probe.receive(piece) for piece in pieces]
    assert results[-1] is verdict
    assert all(r is None for r in results[:-1])
