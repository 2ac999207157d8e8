"""A port-mapping gateway for the network lab: NAT-PMP, PCP MAP and UPnP IGD on the LAN side.

Run inside a lab router namespace::

    python portmap_gateway.py gateway --lan-ip 10.201.1.1 --lan-net 10.201.1.0/24 \\
        --wan-ip 10.200.0.3 --log /tmp/requests.json

Each granted mapping becomes real nftables rules in the hook chains the lab router provides: a
DNAT rule in ``inet nat portmap_prerouting`` and an accept rule for the translated flow in
``inet filter portmap_forward``. Rules go when the mapping is deleted, expires, or the gateway
stops. Every datagram or HTTP request received is appended to the JSON log (a list), so a
test can tell that nobody asked for anything. ``READY`` on stdout means all sockets are bound.

The wire handling here is written from the RFCs independently of the client under test, so
that a misreading shared by encoder and decoder would not cancel out.

``python portmap_gateway.py stun ...`` runs a minimal STUN server (RFC 5389 Binding with the
RFC 5780 CHANGE-REQUEST attribute) answering from a second address and port when asked, which
is what miniupnpd's ``ext_perform_stun`` needs to see an unfiltered path.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import struct
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import trio

NATPMP_PCP_PORT = 5351
SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_IP_SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
SEARCH_TARGETS_ANSWERED = {
    "ssdp:all", "upnp:rootdevice", IGD_DEVICE,
    "urn:schemas-upnp-org:device:WANDevice:1",
    "urn:schemas-upnp-org:device:WANConnectionDevice:1",
    WAN_IP_SERVICE,
}
PROTOCOLS = {6: "TCP", 17: "UDP"}
MAX_LIFETIME = 86400
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


class RequestLog:
    """The JSON list of requests received, rewritten atomically after each one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._flush()

    def add(self, kind: str, source: str, **detail: Any) -> None:
        self.entries.append({"time": time.time(), "kind": kind, "source": source, **detail})
        self._flush()

    def _flush(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.entries, fh)
        os.replace(tmp, self.path)


@dataclass
class Mapping:
    protocol: str
    external_port: int
    internal_ip: str
    internal_port: int
    expires: float | None  # trio time; None for a permanent UPnP lease
    owner: str  # "pcp", "natpmp" or "upnp"
    nonce: bytes = b""
    handles: list[tuple[str, str, int]] = field(default_factory=list)  # (table, chain, handle)


class Gateway:
    def __init__(self, args: argparse.Namespace, log: RequestLog) -> None:
        self.lan_ip: str = args.lan_ip
        self.lan_net = ipaddress.IPv4Network(args.lan_net)
        self.wan_ip: str = args.wan_ip
        self.wan_if: str = args.wan_if
        self.http_port: int = args.http_port
        self.protocols: set[str] = set(args.protocols.split(","))
        self.log = log
        self.started = time.monotonic()
        self.uuid = "a1b2c3d4-0000-4000-8000-" + secrets.token_hex(6)
        self.mappings: dict[tuple[str, int], Mapping] = {}
        self.lock = trio.Lock()

    def epoch(self) -> int:
        return int(time.monotonic() - self.started)

    # -- nftables ------------------------------------------------------------------------------

    async def nft_add(self, table: str, chain: str, rule: str) -> tuple[str, str, int]:
        done = await trio.run_process(
            ["nft", "--echo", "--handle", "add", "rule", "inet", table, chain, *rule.split()],
            capture_stdout=True, capture_stderr=True)
        handle = re.search(rb"# handle (\d+)", done.stdout)
        if handle is None:
            raise RuntimeError(f"nft printed no handle: {done.stdout!r}")
        return table, chain, int(handle.group(1))

    async def install(self, m: Mapping) -> None:
        proto = m.protocol.lower()
        m.handles.append(await self.nft_add(
            "nat", "portmap_prerouting",
            f'iifname "{self.wan_if}" {proto} dport {m.external_port} '
            f"dnat ip to {m.internal_ip}:{m.internal_port}"))
        m.handles.append(await self.nft_add(
            "filter", "portmap_forward",
            f'iifname "{self.wan_if}" ip daddr {m.internal_ip} {proto} dport {m.internal_port} '
            "ct status dnat accept"))

    async def uninstall(self, m: Mapping) -> None:
        for table, chain, handle in m.handles:
            await trio.run_process(
                ["nft", "delete", "rule", "inet", table, chain, "handle", str(handle)],
                check=False, capture_stderr=True)
        m.handles.clear()

    # -- the mapping table, shared by all three protocols --------------------------------------

    def find_internal(self, protocol: str, internal_ip: str, internal_port: int) -> Mapping | None:
        for m in self.mappings.values():
            if (m.protocol, m.internal_ip, m.internal_port) == (protocol, internal_ip,
                                                                internal_port):
                return m
        return None

    def free_port(self, protocol: str, wanted: int) -> int | None:
        if 1024 <= wanted <= 65535 and (protocol, wanted) not in self.mappings:
            return wanted
        for _ in range(200):
            port = 1024 + secrets.randbelow(65536 - 1024)
            if (protocol, port) not in self.mappings:
                return port
        return None

    async def map_or_refresh(self, owner: str, protocol: str, internal_ip: str,
                             internal_port: int, wanted: int, lifetime: int,
                             nonce: bytes = b"") -> Mapping | str:
        """The mapping for this internal endpoint, created or refreshed; or an error name."""
        async with self.lock:
            now = trio.current_time()
            existing = self.find_internal(protocol, internal_ip, internal_port)
            if existing is not None:
                if existing.owner == "pcp" and owner == "pcp" and existing.nonce != nonce:
                    return "not_authorized"
                existing.expires = now + lifetime
                return existing
            port = self.free_port(protocol, wanted)
            if port is None:
                return "no_resources"
            m = Mapping(protocol, port, internal_ip, internal_port, now + lifetime, owner, nonce)
            await self.install(m)
            self.mappings[(protocol, port)] = m
            return m

    async def remove(self, m: Mapping) -> None:
        async with self.lock:
            if self.mappings.get((m.protocol, m.external_port)) is m:
                del self.mappings[(m.protocol, m.external_port)]
                await self.uninstall(m)

    async def expire_loop(self) -> None:
        while True:
            await trio.sleep(0.2)
            now = trio.current_time()
            for m in list(self.mappings.values()):
                if m.expires is not None and m.expires <= now:
                    await self.remove(m)

    async def remove_all(self) -> None:
        for m in list(self.mappings.values()):
            await self.remove(m)

    # -- NAT-PMP (RFC 6886) and PCP (RFC 6887) on UDP 5351 -------------------------------------

    async def serve_udp(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((self.lan_ip, NATPMP_PCP_PORT))
        task_status.started()
        while True:
            data, (source, port) = await sock.recvfrom(2048)
            if len(data) >= 1 and data[0] == 2:
                self.log.add("pcp", source, size=len(data))
                if "pcp" in self.protocols:
                    reply = await self.handle_pcp(data, source)
                else:
                    # A NAT-PMP-only server answers every other version "unsupported".
                    reply = await self.handle_natpmp(data, source)
            else:
                self.log.add("natpmp", source, size=len(data))
                if "natpmp" in self.protocols:
                    reply = await self.handle_natpmp(data, source)
                else:
                    reply = None
            if reply is not None:
                await sock.sendto(reply, (source, port))

    async def handle_natpmp(self, data: bytes, source: str) -> bytes | None:
        if len(data) < 2:
            return None
        version, op = data[0], data[1]
        if version != 0:
            return struct.pack(">BBHI", 0, 0x80 | op, 1, self.epoch())
        if op == 0:
            return struct.pack(">BBHI4s", 0, 0x80, 0, self.epoch(),
                               socket.inet_aton(self.wan_ip))
        if op not in (1, 2):
            return struct.pack(">BBHI", 0, 0x80 | op, 5, self.epoch())
        if len(data) < 12:
            return None
        _, _, _, internal_port, wanted, lifetime = struct.unpack(">BBHHHI", data[:12])
        protocol = "UDP" if op == 1 else "TCP"

        def reply(result: int, external: int, granted: int) -> bytes:
            return struct.pack(">BBHIHHI", 0, 0x80 | op, result, self.epoch(), internal_port,
                               external, granted)

        if lifetime == 0:
            for m in list(self.mappings.values()):
                if m.internal_ip == source and m.protocol == protocol and (
                        internal_port in (0, m.internal_port)):
                    await self.remove(m)
            return reply(0, 0, 0)
        if internal_port == 0:
            return reply(2, 0, 0)
        granted = min(lifetime, MAX_LIFETIME)
        got = await self.map_or_refresh("natpmp", protocol, source, internal_port, wanted,
                                        granted)
        if isinstance(got, str):
            return reply(4, 0, 0)
        return reply(0, got.external_port, granted)

    async def handle_pcp(self, data: bytes, source: str) -> bytes | None:
        if len(data) < 24 or len(data) > 1100 or len(data) % 4:
            return None
        version, r_op, _, lifetime, client = struct.unpack(">BBHI16s", data[:24])
        if r_op & 0x80:
            return None  # a response: never answer those
        op = r_op & 0x7F

        def reply(result: int, granted: int, body: bytes = b"") -> bytes:
            return struct.pack(">BBBBII12x", 2, 0x80 | op, 0, result, granted,
                               self.epoch()) + body

        if version != 2:
            return reply(1, 0)
        if op != 1:
            return reply(4, 0, data[24:])
        if len(data) < 60:
            return reply(3, 0)
        nonce, number, internal_port, wanted, _suggested = struct.unpack(
            ">12sB3xHH16s", data[24:60])
        client_ip = ipaddress.IPv6Address(client).ipv4_mapped

        def map_reply(result: int, granted: int, external: int) -> bytes:
            ext_ip = ipaddress.IPv6Address("::ffff:" + self.wan_ip).packed
            return reply(result, granted,
                         struct.pack(">12sB3xHH16s", nonce, number, internal_port, external,
                                     ext_ip if external else bytes(16)))

        if client_ip is None or str(client_ip) != source:
            return map_reply(12, 0, 0)
        # Options after the MAP data: only framing is checked; none is supported, and any
        # mandatory one (code < 128) must then be refused.
        offset = 60
        while offset < len(data):
            if offset + 4 > len(data):
                return map_reply(6, 0, 0)
            code, _, length = struct.unpack(">BBH", data[offset:offset + 4])
            if code < 128:
                return map_reply(5, 0, 0)
            offset += 4 + (length + 3) // 4 * 4
        protocol = PROTOCOLS.get(number)
        if protocol is None:
            return map_reply(9, 0, 0)
        if internal_port == 0:
            return map_reply(3, 0, 0)
        if lifetime == 0:
            m = self.find_internal(protocol, source, internal_port)
            if m is not None:
                if m.owner == "pcp" and m.nonce != nonce:
                    return map_reply(2, 0, 0)
                await self.remove(m)
            return map_reply(0, 0, 0)
        granted = min(lifetime, MAX_LIFETIME)
        got = await self.map_or_refresh("pcp", protocol, source, internal_port, wanted,
                                        granted, nonce)
        if got == "not_authorized":
            return map_reply(2, 0, 0)
        if isinstance(got, str):
            return map_reply(8, 0, 0)
        return map_reply(0, granted, got.external_port)

    # -- UPnP IGD: SSDP, description, SOAP ----------------------------------------------------

    async def serve_ssdp(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("0.0.0.0", SSDP_PORT))
        membership = socket.inet_aton(SSDP_GROUP) + socket.inet_aton(self.lan_ip)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        task_status.started()
        while True:
            data, (source, port) = await sock.recvfrom(4096)
            self.log.add("ssdp", source, size=len(data))
            if ipaddress.IPv4Address(source) not in self.lan_net:
                continue
            text = data.decode("latin-1")
            if not text.startswith("M-SEARCH * HTTP/1.1\r\n"):
                continue
            headers = parse_headers(text)
            st = headers.get("st", "")
            if headers.get("man", "").strip('"') != "ssdp:discover" or \
                    st not in SEARCH_TARGETS_ANSWERED:
                continue
            answer_st = IGD_DEVICE if st == "ssdp:all" else st
            answer = (
                "HTTP/1.1 200 OK\r\n"
                "CACHE-CONTROL: max-age=120\r\n"
                f"ST: {answer_st}\r\n"
                f"USN: uuid:{self.uuid}::{answer_st}\r\n"
                "EXT:\r\n"
                "SERVER: Linux/6 UPnP/1.1 lab-gateway/1.0\r\n"
                f"LOCATION: http://{self.lan_ip}:{self.http_port}/rootDesc.xml\r\n"
                "\r\n"
            )
            await sock.sendto(answer.encode("latin-1"), (source, port))

    def description(self) -> bytes:
        return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device>
<deviceType>{IGD_DEVICE}</deviceType><friendlyName>lab gateway</friendlyName>
<UDN>uuid:{self.uuid}</UDN>
<deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service>
<serviceType>{WAN_IP_SERVICE}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service></serviceList>
</device></deviceList>
</device></deviceList>
</device>
</root>
""".encode()

    async def serve_http(self, stream: trio.SocketStream) -> None:
        source = stream.socket.getpeername()[0]
        async with stream:
            buffer = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in buffer and len(buffer) < 16384:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, body = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = parse_headers(head.decode("latin-1"))
                length = min(int(headers.get("content-length", "0") or 0), 65536)
                while len(body) < length:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    body += chunk
                method, _, rest = lines[0].partition(" ")
                path = rest.split(" ", 1)[0]
                action = headers.get("soapaction", "").strip('"').rpartition("#")[2]
                self.log.add("http", source, method=method, path=path, action=action)
                if ipaddress.IPv4Address(source) not in self.lan_net:
                    await send_http(stream, 403, b"")
                elif method == "GET" and path == "/rootDesc.xml":
                    await send_http(stream, 200, self.description())
                elif method == "POST" and path == "/ctl/IPConn":
                    status, answer = await self.handle_soap(action, body, source)
                    await send_http(stream, status, answer)
                else:
                    await send_http(stream, 404, b"")

    async def handle_soap(self, action: str, body: bytes, source: str) -> tuple[int, bytes]:
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return soap_fault(402, "Invalid Args")
        call = next((e for e in root.iter() if local(e.tag) == action), None)
        if call is None:
            return soap_fault(401, "Invalid Action")
        args = {local(child.tag): (child.text or "").strip() for child in call}
        if action == "GetExternalIPAddress":
            return soap_ok(action, {"NewExternalIPAddress": self.wan_ip})
        if action == "AddPortMapping":
            try:
                external = int(args["NewExternalPort"])
                internal = int(args["NewInternalPort"])
                lease = int(args.get("NewLeaseDuration", "0") or 0)
                protocol = args["NewProtocol"].upper()
                client = args["NewInternalClient"]
            except (KeyError, ValueError):
                return soap_fault(402, "Invalid Args")
            if protocol not in ("TCP", "UDP") or not 1 <= internal <= 65535 or \
                    not 0 <= lease <= 604800:
                return soap_fault(402, "Invalid Args")
            if external == 0:
                return soap_fault(716, "WildCardNotPermittedInExtPort")
            if args.get("NewRemoteHost", ""):
                return soap_fault(726, "RemoteHostOnlySupportsWildcard")
            if client != source:
                return soap_fault(606, "Action not authorized")
            async with self.lock:
                existing = self.mappings.get((protocol, external))
                if existing is not None:
                    if (existing.internal_ip, existing.internal_port) != (client, internal):
                        return soap_fault(718, "ConflictInMappingEntry")
                    existing.expires = trio.current_time() + lease if lease else None
                    return soap_ok(action, {})
                m = Mapping(protocol, external, client, internal,
                            trio.current_time() + lease if lease else None, "upnp")
                await self.install(m)
                self.mappings[(protocol, external)] = m
            return soap_ok(action, {})
        if action == "DeletePortMapping":
            try:
                key = (args["NewProtocol"].upper(), int(args["NewExternalPort"]))
            except (KeyError, ValueError):
                return soap_fault(402, "Invalid Args")
            found = self.mappings.get(key)
            if found is None:
                return soap_fault(714, "NoSuchEntryInArray")
            if found.internal_ip != source:
                return soap_fault(606, "Action not authorized")
            await self.remove(found)
            return soap_ok(action, {})
        return soap_fault(401, "Invalid Action")


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_headers(text: str) -> dict[str, str]:
    headers = {}
    for line in text.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def soap_ok(action: str, out: dict[str, str]) -> tuple[int, bytes]:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
    return 200, (
        f'<?xml version="1.0"?><s:Envelope xmlns:s="{SOAP_ENV}" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="{WAN_IP_SERVICE}">{inner}</u:{action}Response>'
        "</s:Body></s:Envelope>"
    ).encode()


def soap_fault(code: int, description: str) -> tuple[int, bytes]:
    return 500, (
        f'<?xml version="1.0"?><s:Envelope xmlns:s="{SOAP_ENV}" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{description}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


async def send_http(stream: trio.SocketStream, status: int, body: bytes) -> None:
    reason = {200: "OK", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}
    head = (f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            'Content-Type: text/xml; charset="utf-8"\r\n'
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    await stream.send_all(head.encode("latin-1") + body)


async def run_gateway(args: argparse.Namespace) -> None:
    gateway = Gateway(args, RequestLog(args.log))
    async with trio.open_nursery() as nursery:
        if gateway.protocols & {"pcp", "natpmp"}:
            await nursery.start(gateway.serve_udp)
        if "upnp" in gateway.protocols:
            await nursery.start(gateway.serve_ssdp)
            listeners = await trio.open_tcp_listeners(args.http_port, host=args.lan_ip)
            nursery.start_soon(trio.serve_listeners, gateway.serve_http, listeners)
        nursery.start_soon(gateway.expire_loop)
        print("READY", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        with trio.CancelScope(shield=True):
            await gateway.remove_all()
        nursery.cancel_scope.cancel()


# -- STUN ------------------------------------------------------------------------------------

STUN_MAGIC = 0x2112A442


def stun_answer(request: bytes, source: tuple[str, int]) -> tuple[bytes, int] | None:
    """Binding success for a Binding request, and the CHANGE-REQUEST flags it carried."""
    if len(request) < 20:
        return None
    msg_type, length, magic = struct.unpack(">HHI", request[:8])
    if msg_type != 0x0001 or 20 + length > len(request):
        return None
    transaction = request[8:20]
    flags = 0
    offset = 20
    while offset + 4 <= 20 + length:
        attr, size = struct.unpack(">HH", request[offset:offset + 4])
        if attr == 0x0003 and size >= 4:
            (flags,) = struct.unpack(">I", request[offset + 4:offset + 8])
        offset += 4 + (size + 3) // 4 * 4
    ip = socket.inet_aton(source[0])
    port = source[1]
    mapped = struct.pack(">BBH4s", 0, 1, port, ip)
    xor_ip = bytes(a ^ b for a, b in zip(ip, struct.pack(">I", STUN_MAGIC), strict=True))
    xored = struct.pack(">BBH4s", 0, 1, port ^ (STUN_MAGIC >> 16), xor_ip)
    attributes = struct.pack(">HH", 0x0001, 8) + mapped
    if magic == STUN_MAGIC:
        attributes += struct.pack(">HH", 0x0020, 8) + xored
    header = struct.pack(">HHI", 0x0101, len(attributes), magic) + transaction
    return header + attributes, flags


async def run_stun(args: argparse.Namespace) -> None:
    log = RequestLog(args.log) if args.log else None
    sockets: dict[tuple[bool, bool], trio.socket.SocketType] = {}
    for change_ip in (False, True):
        for change_port in (False, True):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind((args.alternate_ip if change_ip else args.ip,
                             args.alternate_port if change_port else args.port))
            sockets[(change_ip, change_port)] = sock
    print("READY", flush=True)
    primary = sockets[(False, False)]
    while True:
        data, source = await primary.recvfrom(2048)
        if log is not None:
            log.add("stun", source[0], size=len(data))
        answered = stun_answer(data, source)
        if answered is not None:
            answer, flags = answered
            await sockets[(bool(flags & 0x4), bool(flags & 0x2))].sendto(answer, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    gw = sub.add_parser("gateway")
    gw.add_argument("--lan-ip", required=True)
    gw.add_argument("--lan-net", required=True)
    gw.add_argument("--wan-ip", required=True)
    gw.add_argument("--wan-if", default="wan0")
    gw.add_argument("--http-port", type=int, default=5000)
    gw.add_argument("--log", required=True, help="JSON file listing every request received")
    gw.add_argument("--protocols", default="pcp,natpmp,upnp",
                    help="comma-separated subset of pcp,natpmp,upnp to answer")
    stun = sub.add_parser("stun")
    stun.add_argument("--ip", required=True)
    stun.add_argument("--alternate-ip", required=True)
    stun.add_argument("--port", type=int, default=3478)
    stun.add_argument("--alternate-port", type=int, default=3479)
    stun.add_argument("--log")
    args = parser.parse_args()
    trio.run(run_gateway if args.mode == "gateway" else run_stun, args)


if __name__ == "__main__":
    main()
