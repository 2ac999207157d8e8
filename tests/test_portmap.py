"""Port mapping: wire formats without sockets, then real mappings through lab gateways.

The lab tests run a TCP listener on a private host, map its port through the router with one
method, connect to the router's WAN address from a public host, and check that after removal
the port is closed again. Gateways: ``tests/support/portmap_gateway.py`` (always) and Debian's
miniupnpd when installed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.errors import (
    ConfigError,
    PeerUnavailable,
    ProtocolViolation,
    RejectCode,
    RemoteRejected,
)
from dandelion_p2p.net.portmap import client, http, natpmp, pcp, upnp
from dandelion_p2p.net.portmap.route import parse_default_gateway
from dandelion_p2p.netlab import Host, NatRouter, NetLab

GATEWAY_SCRIPT = Path(__file__).parent / "support" / "portmap_gateway.py"
MINIUPNPD = "/usr/sbin/miniupnpd"
NONCE = bytes(range(1, 13))


# -- NAT-PMP ---------------------------------------------------------------------------------


def test_natpmp_requests_have_the_rfc_layout() -> None:
    assert natpmp.encode_public_address_request() == b"\x00\x00"
    assert natpmp.encode_map_request("TCP", 7000, 7001, 7200).hex() == \
        "0002" "0000" "1b58" "1b59" "00001c20"
    assert natpmp.encode_map_request("UDP", 7000, 0, 0).hex() == "0001" "0000" "1b58" "0000" \
        "00000000"


def test_natpmp_request_guards() -> None:
    with pytest.raises(ValueError):
        natpmp.encode_map_request("TCP", 7000, 7000, 0)  # a deletion suggests port 0
    with pytest.raises(ValueError):
        natpmp.encode_map_request("TCP", 0, 0, 0)  # would delete every mapping
    with pytest.raises(ValueError):
        natpmp.encode_map_request("SCTP", 7000, 0, 60)


def test_natpmp_replies_decode() -> None:
    reply = bytes([0, 128, 0, 0]) + (42).to_bytes(4, "big") + bytes([10, 200, 0, 2])
    assert natpmp.decode_public_address_reply(reply) == natpmp.PublicAddressReply(42, "10.200.0.2")
    mapped = struct.pack(">BBHIHHI", 0, 130, 0, 43, 7000, 40000, 3600)
    assert natpmp.decode_map_reply(mapped, "TCP", 7000) == natpmp.MapReply(
        "TCP", 43, 7000, 40000, 3600)


@pytest.mark.parametrize(("data", "expected"), [
    (b"\x00\x80", RejectCode.MALFORMED),
    (struct.pack(">BBHI", 1, 128, 0, 0), RejectCode.UNSUPPORTED_VERSION),
    (struct.pack(">BBHIHHI", 0, 129, 0, 1, 7000, 7000, 60), RejectCode.UNEXPECTED),  # UDP reply
    (struct.pack(">BBHIHHI", 0, 130, 0, 1, 7001, 7000, 60), RejectCode.UNEXPECTED),  # other port
    (struct.pack(">BBHIHH", 0, 130, 0, 1, 7000, 7000), RejectCode.MALFORMED),  # truncated
    (struct.pack(">BBHIHHI", 0, 130, 0, 1, 7000, 0, 60), RejectCode.INVALID_FIELD),
])
def test_natpmp_bad_map_replies(data: bytes, expected: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        natpmp.decode_map_reply(data, "TCP", 7000)
    assert caught.value.code == expected


def test_natpmp_error_result_is_a_rejection() -> None:
    with pytest.raises(RemoteRejected) as caught:
        natpmp.decode_map_reply(struct.pack(">BBHI", 0, 130, 2, 9), "TCP", 7000)
    assert caught.value.code == natpmp.ResultCode.NOT_AUTHORIZED


# -- PCP -------------------------------------------------------------------------------------


def pcp_reply(*, result: int = 0, lifetime: int = 600, nonce: bytes = NONCE, protocol: int = 6,
              internal: int = 7000, external: int = 40000, ext_ip: str = "10.200.0.2",
              version: int = 2, opcode: int = 0x81, extra: bytes = b"") -> bytes:
    header = struct.pack(">BBBBII12x", version, opcode, 0, result, lifetime, 77)
    body = struct.pack(">12sB3xHH16s", nonce, protocol, internal, external,
                       pcp.encode_address(ext_ip))
    return header + body + extra


def test_pcp_map_request_has_the_rfc_layout() -> None:
    data = pcp.encode_map_request(nonce=NONCE, protocol="TCP", internal_port=7000,
                                  client_ip="10.201.1.2", lifetime=600, external_port=7001)
    assert len(data) == 60
    assert data[0] == 2 and data[1] == 1 and data[2:4] == b"\0\0"
    assert int.from_bytes(data[4:8], "big") == 600
    assert ipaddress.IPv6Address(data[8:24]).ipv4_mapped == ipaddress.IPv4Address("10.201.1.2")
    assert data[24:36] == NONCE
    assert data[36] == 6 and data[37:40] == b"\0\0\0"
    assert int.from_bytes(data[40:42], "big") == 7000
    assert int.from_bytes(data[42:44], "big") == 7001
    # No preferred external address: the IPv4-mapped form of 0.0.0.0 (RFC 6887 section 11.1).
    assert data[44:60] == bytes(10) + b"\xff\xff" + bytes(4)


def test_pcp_reply_decodes() -> None:
    reply = pcp.decode_map_reply(pcp_reply(), nonce=NONCE, protocol="TCP", internal_port=7000)
    assert reply == pcp.MapReply(600, 77, NONCE, "TCP", 7000, 40000, "10.200.0.2")


def test_pcp_reply_with_options_decodes() -> None:
    option = struct.pack(">BBH", 130, 0, 5) + b"abcde" + b"\0\0\0"  # padded to 8 bytes
    reply = pcp.decode_map_reply(pcp_reply(extra=option), nonce=NONCE, protocol="TCP",
                                 internal_port=7000)
    assert reply.external_port == 40000


@pytest.mark.parametrize(("data", "expected"), [
    (b"\x02\x81", RejectCode.MALFORMED),
    (pcp_reply()[:58], RejectCode.MALFORMED),  # not a multiple of 4
    (pcp_reply()[:56], RejectCode.MALFORMED),  # success without all MAP data
    (pcp_reply() + bytes(1100), RejectCode.TOO_LARGE),
    (pcp_reply(nonce=bytes(12)), RejectCode.UNEXPECTED),
    (pcp_reply(internal=7001), RejectCode.UNEXPECTED),
    (pcp_reply(protocol=17), RejectCode.UNEXPECTED),
    (pcp_reply(opcode=0x82), RejectCode.UNEXPECTED),
    (pcp_reply(version=3), RejectCode.UNSUPPORTED_VERSION),
    (pcp_reply(external=0), RejectCode.INVALID_FIELD),
    (pcp_reply(ext_ip="0.0.0.0"), RejectCode.INVALID_FIELD),
    (pcp_reply(extra=struct.pack(">BBH", 130, 0, 12)), RejectCode.MALFORMED),  # option overruns
    (struct.pack(">BBHI", 0, 129, 0, 0), RejectCode.UNEXPECTED),
])
def test_pcp_bad_replies(data: bytes, expected: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        pcp.decode_map_reply(data, nonce=NONCE, protocol="TCP", internal_port=7000)
    assert caught.value.code == expected


def test_pcp_rejections() -> None:
    with pytest.raises(RemoteRejected) as caught:
        pcp.decode_map_reply(pcp_reply(result=2, lifetime=30), nonce=NONCE, protocol="TCP",
                             internal_port=7000)
    assert caught.value.code == pcp.ResultCode.NOT_AUTHORIZED
    # What a NAT-PMP-only gateway answers to a PCP request (RFC 6886 section 3.5).
    with pytest.raises(RemoteRejected) as caught:
        pcp.decode_map_reply(struct.pack(">BBHI", 0, 129, 1, 5), nonce=NONCE, protocol="TCP",
                             internal_port=7000)
    assert caught.value.code == pcp.ResultCode.UNSUPP_VERSION


# -- HTTP, SSDP, description, SOAP --------------------------------------------------------------


def test_http_url_checks() -> None:
    assert http.parse_url("/ctl/IPConn", "http://10.0.0.1:5000/rootDesc.xml") == \
        http.HttpUrl("10.0.0.1", 5000, "/ctl/IPConn")
    assert str(http.parse_url("http://10.0.0.1/a?b=c")) == "http://10.0.0.1:80/a?b=c"
    for bad in ("https://10.0.0.1/", "http://router.local/", "ftp://10.0.0.1/",
                "http://10.0.0.1:99999/", "http://10.0.0.1/a b"):
        with pytest.raises(ProtocolViolation):
            http.parse_url(bad)


def test_http_request_encoding() -> None:
    raw = http.encode_request("POST", http.HttpUrl("10.0.0.1", 5000, "/ctl"), {"X": "1"}, b"ab")
    assert raw == (b"POST /ctl HTTP/1.1\r\nHost: 10.0.0.1:5000\r\nConnection: close\r\n"
                   b"User-Agent: dandelion-p2p UPnP/1.1\r\nX: 1\r\nContent-Length: 2\r\n\r\nab")
    with pytest.raises(ValueError):
        http.encode_request("GET", http.HttpUrl("10.0.0.1", 80, "/"), {"X": "a\r\nEvil: 1"})


def test_http_response_framing() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert http.parse_response(head + b"abc", eof=False) is None
    assert http.parse_response(head + b"abcde", eof=False) == http.HttpResponse(
        200, "OK", {"content-length": "5"}, b"abcde")
    with pytest.raises(ProtocolViolation):
        http.parse_response(head + b"abc", eof=True)
    chunked = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n"
    assert http.parse_response(chunked, eof=False) is None
    response = http.parse_response(chunked + b"0\r\n\r\n", eof=False)
    assert response is not None and response.status == 500 and response.body == b"abcde"
    until_eof = http.parse_response(b"HTTP/1.0 200 OK\r\n\r\nxyz", eof=True)
    assert until_eof is not None and until_eof.body == b"xyz"
    for bad in (b"SSH-2.0-x\r\n\r\n", b"HTTP/1.1 2xx OK\r\n\r\n",
                b"HTTP/1.1 200\r\nnocolon\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with pytest.raises(ProtocolViolation):
            http.parse_response(bad, eof=True)
    with pytest.raises(ProtocolViolation) as caught:
        http.parse_response(b"x" * (http.MAX_RESPONSE + 1), eof=False)
    assert caught.value.code == RejectCode.TOO_LARGE


def test_msearch_and_its_answer() -> None:
    search = upnp.encode_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1")
    assert search.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n' in search and search.endswith(b"\r\n\r\n")
    # As miniupnpd 2.3.1 answers.
    answer = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
              b"ST: urn:schemas-upnp-org:service:WANIPConnection:1\r\n"
              b"USN: uuid:3d3cec3a::urn:schemas-upnp-org:service:WANIPConnection:1\r\nEXT:\r\n"
              b"SERVER: Debian/6 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
              b"LOCATION: http://10.201.1.1:38445/rootDesc.xml\r\n"
              b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n\r\n')
    parsed = upnp.parse_ssdp_response(answer)
    assert parsed.location == "http://10.201.1.1:38445/rootDesc.xml"
    assert parsed.st == "urn:schemas-upnp-org:service:WANIPConnection:1"
    for bad in (b"NOTIFY * HTTP/1.1\r\nLOCATION: http://10.0.0.1/\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"A" * 5000):
        with pytest.raises(ProtocolViolation):
            upnp.parse_ssdp_response(bad)


DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
<controlURL>/ctl/PPP</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>http://10.201.1.1:5000/ctl/IP1</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<controlURL>/ctl/IP2</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"""


def test_description_lists_wan_services_best_first() -> None:
    services = upnp.parse_description(DESCRIPTION, "http://10.201.1.1:5000/rootDesc.xml")
    assert [(s.service_type.rsplit(":", 2)[1:], s.control_url.target) for s in services] == [
        (["WANIPConnection", "2"], "/ctl/IP2"),
        (["WANIPConnection", "1"], "/ctl/IP1"),
        (["WANPPPConnection", "1"], "/ctl/PPP"),
    ]


def test_description_urlbase_and_foreign_hosts() -> None:
    with_base = DESCRIPTION.replace(b"<device>", b"<URLBase>http://10.201.1.1:6000/</URLBase>"
                                    b"<device>", 1)
    services = upnp.parse_description(with_base, "http://10.201.1.1:5000/rootDesc.xml")
    assert services[0].control_url == http.HttpUrl("10.201.1.1", 6000, "/ctl/IP2")
    # A description must not send our SOAP calls to some other host.
    elsewhere = b"""<root><device><serviceList><service>
        <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
        <controlURL>http://10.9.9.9/ctl</controlURL></service></serviceList></device></root>"""
    with pytest.raises(ProtocolViolation) as caught:
        upnp.parse_description(elsewhere, "http://10.201.1.1:5000/rootDesc.xml")
    assert caught.value.code == RejectCode.NOT_FOUND


def test_hostile_or_broken_xml_is_refused() -> None:
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              b'<!ENTITY lol2 "&lol;&lol;&lol;">]><root>&lol2;</root>')
    for bad in (laughs, b"<root><unclosed></root>", b"", b"x" * (upnp.MAX_XML + 1)):
        with pytest.raises(ProtocolViolation):
            upnp.parse_description(bad, "http://10.201.1.1/rootDesc.xml")


def test_soap_request_round_trips_through_a_parser() -> None:
    headers, body = upnp.encode_soap("urn:schemas-upnp-org:service:WANIPConnection:1",
                                     "AddPortMapping",
                                     [("NewExternalPort", 7000), ("NewPortMappingDescription",
                                                                  "a<b&c")])
    assert headers["SOAPAction"] == \
        '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
    root = upnp.parse_xml(body)
    call = root[0][0]
    assert call.tag == "{urn:schemas-upnp-org:service:WANIPConnection:1}AddPortMapping"
    assert [(c.tag, c.text) for c in call] == [("NewExternalPort", "7000"),
                                               ("NewPortMappingDescription", "a<b&c")]


def soap_envelope(inner: str) -> bytes:
    return ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            f"<s:Body>{inner}</s:Body></s:Envelope>").encode()


def test_soap_responses() -> None:
    ok = soap_envelope('<u:GetExternalIPAddressResponse xmlns:u="urn:x">'
                       "<NewExternalIPAddress>10.200.0.2</NewExternalIPAddress>"
                       "</u:GetExternalIPAddressResponse>")
    assert upnp.parse_soap_response(200, ok, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "10.200.0.2"}
    fault = soap_envelope("<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError"
                          '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:'
                          "control-1-0\"><errorCode>718</errorCode><errorDescription>"
                          "ConflictInMappingEntry</errorDescription></UPnPError></detail>"
                          "</s:Fault>")
    with pytest.raises(RemoteRejected) as caught:
        upnp.parse_soap_response(500, fault, "AddPortMapping")
    assert caught.value.code == upnp.ERROR_CONFLICT
    with pytest.raises(ProtocolViolation):
        upnp.parse_soap_response(200, ok, "AddPortMapping")  # answer to another action
    with pytest.raises(ProtocolViolation):
        upnp.parse_soap_response(500, soap_envelope("<x/>"), "AddPortMapping")
    with pytest.raises(ProtocolViolation):
        upnp.parse_soap_response(200, b"<html>router login</html>", "AddPortMapping")


def test_external_ip_values() -> None:
    assert upnp.parse_external_ip("10.200.0.2") == "10.200.0.2"
    assert upnp.parse_external_ip("") is None
    assert upnp.parse_external_ip("0.0.0.0") is None
    with pytest.raises(ProtocolViolation):
        upnp.parse_external_ip("fe80::1")


# Whatever a gateway sends, a decoder either returns or raises one of our two errors.
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_never_crash_on_garbage(data: bytes) -> None:
    calls = [
        lambda: natpmp.decode_public_address_reply(data),
        lambda: natpmp.decode_map_reply(data, "UDP", 7000),
        lambda: pcp.decode_map_reply(data, nonce=NONCE, protocol="TCP", internal_port=7000),
        lambda: pcp.decode_map_reply(pcp_reply()[:24] + data, nonce=NONCE, protocol="TCP",
                                     internal_port=7000),
        lambda: upnp.parse_ssdp_response(data),
        lambda: http.parse_response(data, eof=True),
        lambda: http.parse_response(b"HTTP/1.1 200 OK\r\n" + data, eof=True),
        lambda: upnp.parse_description(data, "http://10.0.0.1/d.xml"),
        lambda: upnp.parse_soap_response(500, data, "AddPortMapping"),
    ]
    for call in calls:
        with contextlib.suppress(ProtocolViolation, RemoteRejected):
            call()


def test_default_gateway_from_proc_net_route() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0000C90A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0101C90A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "bad\tline\n"
    )
    native = parse_default_gateway(table)
    expected = "10.201.1.1" if sys.byteorder == "little" else "1.1.201.10"
    assert native == expected
    assert parse_default_gateway(table.splitlines()[0]) is None


# -- client logic without a network ------------------------------------------------------------


async def test_open_mapping_checks_arguments() -> None:
    for kwargs in ({"protocol": "SCTP"}, {"methods": ("carrier-pigeon",)}, {"methods": "pcp"},
                   {"lifetime": 0}, {"gateway": "router.local"}, {"external_port": 70000}):
        with pytest.raises(ConfigError):
            await client.open_mapping(7000, **({"gateway": "10.0.0.1"} | kwargs))
    with pytest.raises(ConfigError):
        await client.open_mapping(0, gateway="10.0.0.1")


def fake_mapping(lifetime: int = 100, port: int = 40000) -> client.PortMapping:
    return client.PortMapping("pcp", "TCP", "10.0.0.1", "10.0.0.2", 7000, "10.200.0.2", port,
                              lifetime, trio.current_time(), nonce=NONCE)


async def test_keep_mapped_renews_at_half_life_and_removes_on_cancel(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    events: list[tuple[str, float]] = []

    async def fake_open(*args: Any, **kwargs: Any) -> client.PortMapping:
        events.append(("open", trio.current_time()))
        return fake_mapping()

    async def fake_renew(mapping: client.PortMapping, **kwargs: Any) -> client.PortMapping:
        events.append(("renew", trio.current_time()))
        # The third renewal moves the mapping to another port.
        return fake_mapping(port=40001 if len(events) >= 4 else 40000)

    async def fake_close(mapping: client.PortMapping, **kwargs: Any) -> None:
        await trio.sleep(0.5)  # still runs although the surrounding scope is cancelled
        events.append((f"close {mapping.external_port}", trio.current_time()))

    monkeypatch.setattr(client, "open_mapping", fake_open)
    monkeypatch.setattr(client, "renew", fake_renew)
    monkeypatch.setattr(client, "close", fake_close)
    changes: list[int | None] = []
    async with trio.open_nursery() as nursery:
        first = await nursery.start(lambda task_status: client.keep_mapped(
            7000, on_change=lambda m: changes.append(m.external_port if m else None),
            task_status=task_status))
        assert first.external_port == 40000
        await trio.sleep(170)
        nursery.cancel_scope.cancel()
    assert [name for name, _ in events] == ["open", "renew", "renew", "renew", "close 40001"]
    assert [round(t) for _, t in events[1:4]] == [50, 100, 150]
    assert changes == [40000, 40001]


async def test_keep_mapped_reopens_after_the_mapping_is_lost(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    opened: list[float] = []

    async def fake_open(*args: Any, **kwargs: Any) -> client.PortMapping:
        opened.append(trio.current_time())
        return fake_mapping(lifetime=20)

    async def failing_renew(mapping: client.PortMapping, **kwargs: Any) -> client.PortMapping:
        raise PeerUnavailable("gateway gone")

    async def fake_close(mapping: client.PortMapping, **kwargs: Any) -> None:
        pass

    monkeypatch.setattr(client, "open_mapping", fake_open)
    monkeypatch.setattr(client, "renew", failing_renew)
    monkeypatch.setattr(client, "close", fake_close)
    changes: list[int | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: client.keep_mapped(
            7000, timeout=1.0, on_change=lambda m: changes.append(m.external_port if m else None),
            task_status=task_status))
        await trio.sleep(40)
        nursery.cancel_scope.cancel()
    # Renewals at 10 s fail until the mapping is about to expire; then it is reported lost
    # and a new one is opened.
    assert changes[:3] == [40000, None, 40000]
    assert len(opened) >= 2 and opened[1] < 30


async def test_keep_mapped_raises_when_nothing_can_be_mapped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_open(*args: Any, **kwargs: Any) -> client.PortMapping:
        raise client.PortMappingFailed({"pcp": PeerUnavailable("silence")})

    monkeypatch.setattr(client, "open_mapping", fake_open)
    async with trio.open_nursery() as nursery:
        with pytest.raises(client.PortMappingFailed):
            await nursery.start(client.keep_mapped, 7000)


# -- in the network lab ------------------------------------------------------------------------

# Runs on the private host: listens on PORT, maps it, prints the mapping as JSON, answers each
# connection with b"pong:" + what it read, and on "close" from stdin removes the mapping.
MAPPER = r"""
import json, sys, trio
from dandelion_p2p.net.portmap.client import close, open_mapping

async def answer(stream):
    async with stream:
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        await stream.send_all(b"pong:" + data)

async def main():
    port, methods, lifetime = int(sys.argv[1]), tuple(sys.argv[2].split(",")), int(sys.argv[3])
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port)
        nursery.start_soon(trio.serve_listeners, answer, listeners)
        mapping = await open_mapping(port, methods=methods, lifetime=lifetime, timeout=3.0)
        print(json.dumps({"method": mapping.method, "ip": mapping.external_ip,
                          "port": mapping.external_port, "lifetime": mapping.lifetime}),
              flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        await close(mapping)
        print("CLOSED", flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""

# Runs on the private host: holds a mapping with keep_mapped until a line arrives on stdin.
KEEPER = r"""
import functools, json, sys, trio
from dandelion_p2p.net.portmap.client import keep_mapped

async def answer(stream):
    async with stream:
        while await stream.receive_some(4096):
            pass
        await stream.send_all(b"pong:ping")

async def main():
    port, method, lifetime = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_tcp, answer, port)
        mapping = await nursery.start(functools.partial(
            keep_mapped, port, methods=(method,), lifetime=lifetime, timeout=1.0))
        print(json.dumps({"ip": mapping.external_ip, "port": mapping.external_port}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        nursery.cancel_scope.cancel()
    print("DONE", flush=True)

trio.run(main)
"""

# Runs on a public host: connect, send "ping", print what came back (or the error's name).
DIALER = r"""
import json, socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    conn.sendall(b"ping")
    conn.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    print(json.dumps({"ok": True, "reply": data.decode()}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""

# Runs on the private host for the idle test: what a node without --upnp does with the package.
IDLE = r"""
import socket, time
import dandelion_p2p.net.portmap  # importing must send nothing
server = socket.create_server(("0.0.0.0", int(__import__("sys").argv[1])))
time.sleep(1.0)
"""

LOG_KINDS = {"pcp": {"pcp"}, "natpmp": {"natpmp"}, "upnp": {"ssdp", "http"}}
PORT = 7000


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line, or fail with the process's stderr if it does not come in time."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=5)
    raise AssertionError(f"no output within {timeout}s; stderr:\n{err}")


def dial(host: Host, ip: str, port: int, timeout: float = 1.0) -> dict[str, Any]:
    done = host.run([sys.executable, "-c", DIALER, ip, str(port), str(timeout)],
                    timeout=timeout + 10)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="portmap-") as path:
        yield Path(path)


def start_gateway(router: NatRouter, log: Path, protocols: str = "pcp,natpmp,upnp"
                  ) -> subprocess.Popen[str]:
    proc = router.popen([sys.executable, str(GATEWAY_SCRIPT), "gateway", "--lan-ip",
                         router.lan_ip, "--lan-net", router.lan_net, "--wan-ip", router.wan_ip,
                         "--log", str(log), "--protocols", protocols],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert read_line(proc, 10) == "READY"
    return proc


def logged_kinds(log: Path) -> set[str]:
    return {entry["kind"] for entry in json.loads(log.read_text())}


def outsider_of(netlab: NetLab) -> Host:
    return netlab.hosts.get("outsider") or netlab.add_public_host("outsider")


def map_connect_unmap(netlab: NetLab, router: NatRouter, methods: str,
                      lifetime: int = 120) -> dict[str, Any]:
    """The whole round trip; returns the mapping the private host reported."""
    outsider = outsider_of(netlab)
    mapper = router.host.popen([sys.executable, "-c", MAPPER, str(PORT), methods, str(lifetime)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    mapping: dict[str, Any] = json.loads(read_line(mapper, 15))
    assert mapping["ip"] == router.wan_ip
    assert "dnat" in router.ruleset()

    assert dial(outsider, router.wan_ip, mapping["port"]) == {"ok": True, "reply": "pong:ping"}

    assert mapper.stdin is not None
    mapper.stdin.write("close\n")
    mapper.stdin.flush()
    assert read_line(mapper, 10) == "CLOSED"
    mapper.wait(timeout=10)
    assert "dnat" not in router.ruleset()
    closed = dial(outsider, router.wan_ip, mapping["port"])
    assert closed["ok"] is False
    return mapping


@pytest.mark.netlab
@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_mapping_through_lab_gateway(netlab: NetLab, workdir: Path, method: str) -> None:
    router = netlab.add_nat("home")
    log = workdir / "requests.json"
    start_gateway(router, log)
    mapping = map_connect_unmap(netlab, router, method)
    assert mapping["method"] == method
    assert mapping["port"] == PORT and mapping["lifetime"] == 120
    assert logged_kinds(log) == LOG_KINDS[method]


@pytest.mark.netlab
@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_keep_mapped_renews_and_removes_in_the_lab(netlab: NetLab, workdir: Path,
                                                    method: str) -> None:
    router = netlab.add_nat("home")
    outsider = outsider_of(netlab)
    log = workdir / "requests.json"
    start_gateway(router, log)
    keeper = router.host.popen([sys.executable, "-c", KEEPER, str(PORT), method, "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    mapping = json.loads(read_line(keeper, 15))
    # The gateway drops a mapping one second after it was last asked for: still being
    # reachable after twice that proves the renewals.
    time.sleep(2.0)
    assert dial(outsider, router.wan_ip, mapping["port"]) == {"ok": True, "reply": "pong:ping"}
    assert router.ruleset().count("dnat ip to") == 1  # renewals refresh, never duplicate
    assert keeper.stdin is not None
    keeper.stdin.write("stop\n")
    keeper.stdin.flush()
    assert read_line(keeper, 10) == "DONE"
    assert "dnat" not in router.ruleset()
    requests = json.loads(log.read_text())
    if method != "upnp":
        assert len(requests) >= 4  # open, renewals every half second, removal


@pytest.mark.netlab
def test_lab_gateway_expires_mappings(netlab: NetLab, workdir: Path) -> None:
    router = netlab.add_nat("home")
    start_gateway(router, workdir / "requests.json")
    mapper = router.host.popen([sys.executable, "-c", MAPPER, str(PORT), "pcp", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    json.loads(read_line(mapper, 15))
    deadline = time.monotonic() + 3
    while "dnat" in router.ruleset():
        assert time.monotonic() < deadline, "the mapping did not expire"
        time.sleep(0.1)
    mapper.kill()
    mapper.wait()


@pytest.mark.netlab
@pytest.mark.parametrize(("answers", "expected"), [
    ("natpmp,upnp", "natpmp"),  # PCP answered "unsupported version": NAT-PMP at once
    ("upnp", "upnp"),  # nothing on 5351: straight on to UPnP
])
def test_default_order_falls_through(netlab: NetLab, workdir: Path, answers: str,
                                     expected: str) -> None:
    router = netlab.add_nat("home", answer_with_rst=True)  # a closed port fails fast
    start_gateway(router, workdir / "requests.json", protocols=answers)
    started = time.monotonic()
    mapping = map_connect_unmap(netlab, router, ",".join(client.METHODS))
    assert mapping["method"] == expected
    # Falling through must not cost a timeout per skipped method.
    assert time.monotonic() - started < 2 * client.DEFAULT_TIMEOUT


@pytest.mark.netlab
def test_nobody_mapping_means_no_requests(netlab: NetLab, workdir: Path) -> None:
    router = netlab.add_nat("home", answer_with_rst=True)
    outsider = netlab.add_public_host("outsider")
    log = workdir / "requests.json"
    start_gateway(router, log)
    router.host.run([sys.executable, "-c", IDLE, str(PORT)], timeout=15)
    assert dial(outsider, router.wan_ip, PORT, timeout=0.5)["ok"] is False
    assert json.loads(log.read_text()) == []


# -- miniupnpd (Debian's miniupnpd-nftables 2.3.1) ---------------------------------------------

MINIUPNPD_CONF = """\
ext_ifname=wan0
listening_ip=lan0
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
lease_file={workdir}/leases
upnp_table_name=filter
upnp_nat_table_name=nat
upnp_forward_chain=portmap_forward
upnp_nat_chain=portmap_prerouting
upnp_nat_postrouting_chain=portmap_postrouting
ext_perform_stun=yes
ext_stun_host={stun_ip}
ext_stun_port=3478
allow 1024-65535 {lan_net} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def start_miniupnpd(netlab: NetLab, router: NatRouter, workdir: Path) -> Path:
    """miniupnpd in the router, told by a lab STUN server that its WAN path is unfiltered.

    With a private (10.x) WAN address and no STUN, miniupnpd 2.3.1 disables forwarding.
    """
    stun = netlab.add_public_host("stun")
    alternate = netlab.add_public_address(stun)
    stun_proc = stun.popen([sys.executable, str(GATEWAY_SCRIPT), "stun", "--ip", stun.ip,
                            "--alternate-ip", alternate], stdout=subprocess.PIPE, text=True)
    assert read_line(stun_proc, 10) == "READY"
    # The STUN test needs answers from the second address/port to reach the router itself.
    router.nft(f'insert rule inet filter input iifname "wan0" ip saddr {{ {stun.ip}, '
               f"{alternate} }} udp sport {{ 3478, 3479 }} accept\n")
    conf = workdir / "miniupnpd.conf"
    conf.write_text(MINIUPNPD_CONF.format(workdir=workdir, stun_ip=stun.ip,
                                          lan_net=router.lan_net))
    output = workdir / "miniupnpd.log"
    with output.open("w") as sink:
        router.popen([MINIUPNPD, "-d", "-f", str(conf), "-P", str(workdir / "pid")],
                     stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while "Listening for NAT-PMP/PCP traffic" not in output.read_text():
        assert time.monotonic() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)
    assert "Port forwarding is now enabled" in output.read_text()
    return output


@pytest.mark.netlab
@pytest.mark.skipif(not os.path.exists(MINIUPNPD), reason="miniupnpd is not installed")
@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_mapping_through_miniupnpd(netlab: NetLab, workdir: Path, method: str) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    router = netlab.add_nat("home", answer_with_rst=True)
    output = start_miniupnpd(netlab, router, workdir)
    mapping = map_connect_unmap(netlab, router, method)
    assert mapping["method"] == method
    assert "Returning UPnPError" not in output.read_text()
