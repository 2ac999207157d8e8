"""Open, renew and remove port mappings on the local gateway: PCP, NAT-PMP, UPnP IGD.

The wire formats live in ``pcp``, ``natpmp``, ``upnp`` and ``http``; this module only moves
their bytes over trio sockets and decides what to try next. Every exchange runs under a time
limit, and a gateway that stays silent or answers nonsense ends in ``PeerUnavailable`` or
``ProtocolViolation``, never in a hang or a crash.

Methods are tried in the order given (default PCP, NAT-PMP, UPnP). PCP and NAT-PMP share UDP
port 5351: a NAT-PMP-only gateway answers PCP with "unsupported version" and we fall through to
NAT-PMP at once; if nothing listens on 5351 at all (ICMP port unreachable), NAT-PMP is skipped
as well.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NoReturn, TypeVar, cast

import trio

from dandelion_p2p.errors import (
    ConfigError,
    PeerUnavailable,
    ProtocolViolation,
    RejectCode,
    RemoteRejected,
)
from dandelion_p2p.net.portmap import http, natpmp, pcp, upnp
from dandelion_p2p.net.portmap.route import default_gateway

log = logging.getLogger(__name__)

Method = Literal["pcp", "natpmp", "upnp"]
METHODS: tuple[Method, ...] = ("pcp", "natpmp", "upnp")
DEFAULT_LIFETIME = 7200  # RFC 6886 section 3.3 recommends two hours
DEFAULT_TIMEOUT = 3.0  # per method, for open/renew/close
CLOSE_TIMEOUT = 2.0  # removal when keep_mapped is cancelled
FIRST_RETRANSMIT = 0.25  # RFC 6886 section 3.1: 250 ms, doubling
SSDP_WINDOW = 1.5  # how long to listen for M-SEARCH answers
RETRY_PAUSE = 5.0  # after a failed renewal, and first pause when no mapping can be had
MAX_RETRY_PAUSE = 1800.0
UPNP_PORT_ATTEMPTS = 4  # the wanted external port, then random ones on conflict
DESCRIPTION = "dandelion-p2p"

T = TypeVar("T")


class PortMappingFailed(PeerUnavailable):
    """No method could open a mapping; ``errors`` holds each method's reason."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        self.errors = errors
        detail = "; ".join(f"{method}: {exc}" for method, exc in errors.items())
        super().__init__(f"no port mapping could be opened ({detail})")


class _NothingListens(PeerUnavailable):
    """The gateway answered ICMP port unreachable: no server on that port."""


@dataclass(frozen=True, slots=True)
class PortMapping:
    """A mapping granted by the gateway: ``external_ip:external_port`` -> ``internal_*``.

    ``lifetime`` is what the gateway granted, in seconds from ``obtained_at`` (a
    ``trio.current_time()`` value); 0 means "until removed", which only UPnP gateways that
    refuse leases grant. ``external_ip`` is None when the gateway would not say.
    """

    method: Method
    protocol: str
    gateway: str
    internal_ip: str
    internal_port: int
    external_ip: str | None
    external_port: int
    lifetime: int
    obtained_at: float
    nonce: bytes = field(default=b"", repr=False)  # PCP: proves we own the mapping
    control_url: str = ""  # UPnP: where to send renewals and the removal
    service_type: str = ""  # UPnP: the WAN connection service that granted it

    @property
    def expires_at(self) -> float:
        return math.inf if self.lifetime == 0 else self.obtained_at + self.lifetime

    @property
    def external_is_public(self) -> bool:
        """False when the gateway's own external address is private: another NAT is upstream
        and the mapping alone does not make us reachable from the internet."""
        return self.external_ip is not None and ipaddress.ip_address(self.external_ip).is_global


# -- argument checks -----------------------------------------------------------------------


def _check_protocol(protocol: str) -> str:
    upper = protocol.upper()
    if upper not in ("TCP", "UDP"):
        raise ConfigError(f"protocol must be TCP or UDP, got {protocol!r}")
    return upper


def _check_port(port: int, what: str) -> None:
    if not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise ConfigError(f"{what} must be a port number 1..65535, got {port!r}")


def _check_lifetime(lifetime: int) -> None:
    if not isinstance(lifetime, int) or not 1 <= lifetime <= 0xFFFFFFFF:
        raise ConfigError(f"lifetime must be a positive number of seconds, got {lifetime!r}")


def _check_methods(methods: Sequence[str]) -> tuple[Method, ...]:
    if isinstance(methods, str) or not methods:
        raise ConfigError(f"methods must be a non-empty sequence of {METHODS}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown port mapping method(s) {unknown}; known: {METHODS}")
    return tuple(cast(Method, m) for m in methods)


def _check_gateway(gateway: str | None) -> str:
    if gateway is None:
        gateway = default_gateway()
        if gateway is None:
            raise PeerUnavailable("no default IPv4 gateway to ask for a port mapping")
    try:
        return str(ipaddress.IPv4Address(gateway))
    except ValueError:
        raise ConfigError(f"gateway must be an IPv4 address, got {gateway!r}") from None


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise PeerUnavailable(f"{what}: no answer within {seconds:g} s") from None


# -- transports ------------------------------------------------------------------------------


async def _udp_exchange(gateway: str, port: int, build: Callable[[str], bytes],
                        decode: Callable[[bytes], T]) -> T:
    """Send the request built for our source address until a reply decodes.

    Retransmits at 250 ms, doubling. Datagrams that do not decode are skipped (they may be late
    answers to an earlier request); the exchange gives up just before the caller's deadline
    (or after ``DEFAULT_TIMEOUT`` without one), raising the last such ``ProtocolViolation`` if
    there was one and ``PeerUnavailable`` otherwise.
    """
    budget = trio.current_effective_deadline() - trio.current_time() - 0.05
    budget = DEFAULT_TIMEOUT if math.isinf(budget) else max(budget, 0.0)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        # A connected socket only receives from the gateway's port, and reports ICMP errors.
        try:
            await sock.connect((gateway, port))
        except OSError as exc:
            raise PeerUnavailable(f"cannot reach {gateway}:{port}: {exc}") from exc
        request = build(sock.getsockname()[0])
        last_violation: ProtocolViolation | None = None
        interval = FIRST_RETRANSMIT
        with trio.move_on_after(budget):
            while True:
                try:
                    await sock.send(request)
                    with trio.move_on_after(interval):
                        while True:
                            data = await sock.recv(pcp.MAX_MESSAGE + 1)
                            try:
                                return decode(data)
                            except ProtocolViolation as exc:
                                log.debug("ignoring reply from %s:%d: %s", gateway, port, exc)
                                last_violation = exc
                except ConnectionRefusedError as exc:
                    raise _NothingListens(f"nothing listens on {gateway}:{port}") from exc
                except OSError as exc:
                    raise PeerUnavailable(f"{gateway}:{port}: {exc}") from exc
                interval *= 2
        if last_violation is not None:
            raise last_violation
        raise PeerUnavailable(f"no answer from {gateway}:{port} within {budget:.2g} s")


async def _http(url: http.HttpUrl, method: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> http.HttpResponse:
    """One request over a fresh connection; the caller bounds the time."""
    try:
        stream = await trio.open_tcp_stream(url.host, url.port)
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to {url.host}:{url.port}: {exc}") from exc
    async with stream:
        buffer = bytearray()
        try:
            await stream.send_all(http.encode_request(method, url, headers, body))
            while True:
                chunk = await stream.receive_some(65536)
                response = http.parse_response(bytes(buffer + chunk), eof=not chunk)
                if response is not None:
                    return response
                buffer += chunk
        except (OSError, trio.BrokenResourceError) as exc:
            raise PeerUnavailable(f"HTTP {method} {url}: {exc}") from exc


def _local_ip_towards(host: str) -> str:
    """Our address on the route to ``host`` (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, 9))
        except OSError as exc:
            raise PeerUnavailable(f"no route to {host}: {exc}") from exc
        return str(sock.getsockname()[0])


# -- PCP -------------------------------------------------------------------------------------


async def _pcp_map(gateway: str, protocol: str, internal_port: int, lifetime: int,
                   external_port: int, external_ip: str | None, nonce: bytes) -> PortMapping:
    local_ip = ""

    def build(source_ip: str) -> bytes:
        nonlocal local_ip
        local_ip = source_ip
        return pcp.encode_map_request(
            nonce=nonce, protocol=protocol, internal_port=internal_port, client_ip=source_ip,
            lifetime=lifetime, external_port=external_port, external_ip=external_ip)

    reply = await _udp_exchange(
        gateway, pcp.SERVER_PORT, build,
        lambda data: pcp.decode_map_reply(data, nonce=nonce, protocol=protocol,
                                          internal_port=internal_port))
    return PortMapping("pcp", protocol, gateway, local_ip, internal_port, reply.external_ip,
                       reply.external_port, reply.lifetime, trio.current_time(), nonce=nonce)


# -- NAT-PMP ---------------------------------------------------------------------------------


async def _natpmp_map(gateway: str, protocol: str, internal_port: int, lifetime: int,
                      external_port: int) -> PortMapping:
    address = await _udp_exchange(gateway, natpmp.SERVER_PORT,
                                  lambda _ip: natpmp.encode_public_address_request(),
                                  natpmp.decode_public_address_reply)
    local_ip = ""

    def build(source_ip: str) -> bytes:
        nonlocal local_ip
        local_ip = source_ip
        return natpmp.encode_map_request(protocol, internal_port, external_port, lifetime)

    reply = await _udp_exchange(gateway, natpmp.SERVER_PORT, build,
                                lambda data: natpmp.decode_map_reply(data, protocol,
                                                                     internal_port))
    if reply.lifetime == 0:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "NAT-PMP granted a zero lifetime")
    return PortMapping("natpmp", protocol, gateway, local_ip, internal_port,
                       address.external_ip, reply.external_port, reply.lifetime,
                       trio.current_time())


async def _natpmp_unmap(mapping: PortMapping) -> None:
    await _udp_exchange(
        mapping.gateway, natpmp.SERVER_PORT,
        lambda _ip: natpmp.encode_map_request(mapping.protocol, mapping.internal_port, 0, 0),
        lambda data: natpmp.decode_map_reply(data, mapping.protocol, mapping.internal_port))


# -- UPnP IGD --------------------------------------------------------------------------------


async def _ssdp_search(gateway: str, window: float) -> list[str]:
    """LOCATIONs of the IGDs that answered an M-SEARCH, the default gateway's first.

    Searches by multicast and, because some gateways only answer that, by unicast to the
    gateway; returns as soon as the gateway itself has answered.
    """
    found: dict[str, str] = {}
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("0.0.0.0", 0))
        sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_TTL, 2)
        searches = [upnp.encode_msearch(st, mx=1) for st in upnp.SEARCH_TARGETS]

        async def search() -> None:
            interval = 0.5
            while True:
                for message in searches:
                    for destination in (upnp.SSDP_GROUP, gateway):
                        with contextlib.suppress(OSError):
                            await sock.sendto(message, (destination, upnp.SSDP_PORT))
                await trio.sleep(interval)
                interval *= 2

        with trio.move_on_after(window):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(search)
                while True:
                    try:
                        data, (source, _) = await sock.recvfrom(upnp.MAX_SSDP + 1)
                        answer = upnp.parse_ssdp_response(data)
                        location = http.parse_url(answer.location)
                    except ProtocolViolation as exc:
                        log.debug("ignoring SSDP datagram: %s", exc)
                        continue
                    except OSError:
                        continue
                    # A device describes itself: a LOCATION on another host is not followed.
                    if location.host != source:
                        continue
                    found.setdefault(answer.location, source)
                    if source == gateway:
                        nursery.cancel_scope.cancel()
    return sorted(found, key=lambda loc: found[loc] != gateway)


async def _soap(control_url: str, service_type: str, action: str,
                args: Sequence[tuple[str, str | int]] = ()) -> dict[str, str]:
    headers, body = upnp.encode_soap(service_type, action, args)
    response = await _http(http.parse_url(control_url), "POST", headers, body)
    return upnp.parse_soap_response(response.status, response.body, action)


async def _upnp_service(gateway: str, window: float) -> upnp.Service:
    locations = await _ssdp_search(gateway, window)
    if not locations:
        raise PeerUnavailable("no UPnP gateway answered the SSDP search")
    problems: list[str] = []
    for location in locations:
        try:
            response = await _http(http.parse_url(location), "GET")
            if response.status != 200:
                raise ProtocolViolation(RejectCode.NOT_FOUND,
                                        f"description at {location}: HTTP {response.status}")
            return upnp.parse_description(response.body, location)[0]
        except (PeerUnavailable, ProtocolViolation) as exc:
            problems.append(f"{location}: {exc}")
    raise PeerUnavailable("no usable UPnP gateway: " + "; ".join(problems))


async def _upnp_add(control_url: str, service_type: str, protocol: str, internal_ip: str,
                    internal_port: int, external_port: int, lifetime: int) -> int:
    """AddPortMapping; returns the lease granted (0 if the gateway only grants permanent)."""
    args: list[tuple[str, str | int]] = [
        ("NewRemoteHost", ""), ("NewExternalPort", external_port), ("NewProtocol", protocol),
        ("NewInternalPort", internal_port), ("NewInternalClient", internal_ip),
        ("NewEnabled", 1), ("NewPortMappingDescription", DESCRIPTION),
        ("NewLeaseDuration", lifetime)]
    try:
        await _soap(control_url, service_type, "AddPortMapping", args)
        return lifetime
    except RemoteRejected as exc:
        if exc.code != upnp.ERROR_ONLY_PERMANENT_LEASES or lifetime == 0:
            raise
    args[-1] = ("NewLeaseDuration", 0)
    await _soap(control_url, service_type, "AddPortMapping", args)
    return 0


async def _upnp_map(gateway: str, protocol: str, internal_port: int, lifetime: int,
                    external_port: int, window: float) -> PortMapping:
    service = await _upnp_service(gateway, window)
    control_url = str(service.control_url)
    try:
        reply = await _soap(control_url, service.service_type, "GetExternalIPAddress")
        external_ip = upnp.parse_external_ip(reply.get("NewExternalIPAddress", ""))
    except RemoteRejected as exc:
        log.info("UPnP gateway would not tell its external address: %s", exc)
        external_ip = None
    internal_ip = _local_ip_towards(service.control_url.host)
    candidates = [external_port] + [1024 + secrets.randbelow(65536 - 1024)
                                    for _ in range(UPNP_PORT_ATTEMPTS - 1)]
    for attempt, candidate in enumerate(candidates):
        try:
            granted = await _upnp_add(control_url, service.service_type, protocol, internal_ip,
                                      internal_port, candidate, lifetime)
        except RemoteRejected as exc:
            if exc.code == upnp.ERROR_CONFLICT and attempt + 1 < len(candidates):
                continue
            raise
        return PortMapping("upnp", protocol, gateway, internal_ip, internal_port, external_ip,
                           candidate, granted, trio.current_time(), control_url=control_url,
                           service_type=service.service_type)
    raise AssertionError("unreachable")


async def _upnp_unmap(mapping: PortMapping) -> None:
    try:
        await _soap(mapping.control_url, mapping.service_type, "DeletePortMapping",
                    [("NewRemoteHost", ""), ("NewExternalPort", mapping.external_port),
                     ("NewProtocol", mapping.protocol)])
    except RemoteRejected as exc:
        if exc.code != upnp.ERROR_NO_SUCH_ENTRY:  # already gone is what we wanted
            raise


# -- public API ------------------------------------------------------------------------------


async def open_mapping(internal_port: int, protocol: str = "TCP", *,
                       lifetime: int = DEFAULT_LIFETIME, gateway: str | None = None,
                       methods: Sequence[str] = METHODS, external_port: int | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> PortMapping:
    """Ask the gateway to forward ``external port -> this host:internal_port``.

    ``gateway`` defaults to the default route's gateway; ``external_port`` is a wish (default:
    the internal port) that the gateway may ignore. Each method in ``methods`` gets at most
    ``timeout`` seconds.

    Raises:
        ConfigError: invalid arguments.
        PortMappingFailed: (a ``PeerUnavailable``) no method worked; ``errors`` says why.
        PeerUnavailable: no default gateway.

    Cancellation: a mapping that the gateway granted while we were cancelled stays until its
    lifetime ends; nothing else is left behind.
    """
    protocol = _check_protocol(protocol)
    _check_port(internal_port, "internal_port")
    _check_lifetime(lifetime)
    wanted = internal_port if external_port is None else external_port
    _check_port(wanted, "external_port")
    chosen = _check_methods(methods)
    gateway = _check_gateway(gateway)
    errors: dict[str, Exception] = {}
    for method in chosen:
        if method == "natpmp" and isinstance(errors.get("pcp"), _NothingListens):
            errors[method] = PeerUnavailable("skipped: nothing listens on the PCP/NAT-PMP port")
            continue
        try:
            with _time_limit(timeout, method):
                if method == "pcp":
                    mapping = await _pcp_map(gateway, protocol, internal_port, lifetime, wanted,
                                             None, os.urandom(pcp.NONCE_SIZE))
                elif method == "natpmp":
                    mapping = await _natpmp_map(gateway, protocol, internal_port, lifetime,
                                                wanted)
                else:
                    # Leave time after the search for the description and two SOAP calls.
                    mapping = await _upnp_map(gateway, protocol, internal_port, lifetime, wanted,
                                              min(SSDP_WINDOW, timeout / 2))
        except (PeerUnavailable, ProtocolViolation, RemoteRejected) as exc:
            log.info("port mapping via %s failed: %s", method, exc)
            errors[method] = exc
            continue
        log.info("port mapping via %s: %s:%d -> %s:%d for %d s", method, mapping.external_ip,
                 mapping.external_port, mapping.internal_ip, internal_port, mapping.lifetime)
        return mapping
    raise PortMappingFailed(errors)


async def renew(mapping: PortMapping, *, lifetime: int | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> PortMapping:
    """Extend ``mapping`` by ``lifetime`` seconds (default: what the gateway granted last).

    Uses the method that created it. The gateway may move the mapping to another external
    port or address: use the returned mapping.

    Raises ``PeerUnavailable`` (no answer in ``timeout``), ``RemoteRejected`` (the gateway
    refused) or ``ProtocolViolation`` (nonsense answer). On any of them the old mapping lasts
    until its ``expires_at``. Cancellation leaves the old or the renewed mapping in place.
    """
    lifetime = lifetime or mapping.lifetime or DEFAULT_LIFETIME
    _check_lifetime(lifetime)
    with _time_limit(timeout, f"renewing via {mapping.method}"):
        if mapping.method == "pcp":
            return await _pcp_map(mapping.gateway, mapping.protocol, mapping.internal_port,
                                  lifetime, mapping.external_port, mapping.external_ip,
                                  mapping.nonce)
        if mapping.method == "natpmp":
            return await _natpmp_map(mapping.gateway, mapping.protocol, mapping.internal_port,
                                     lifetime, mapping.external_port)
        granted = await _upnp_add(mapping.control_url, mapping.service_type, mapping.protocol,
                                  mapping.internal_ip, mapping.internal_port,
                                  mapping.external_port, lifetime)
        return replace(mapping, lifetime=granted, obtained_at=trio.current_time())


async def close(mapping: PortMapping, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Remove ``mapping`` from the gateway.

    Raises ``PeerUnavailable``, ``RemoteRejected`` or ``ProtocolViolation`` when the removal
    could not be confirmed; the mapping then ends at its ``expires_at`` at the latest.
    """
    with _time_limit(timeout, f"removing via {mapping.method}"):
        if mapping.method == "pcp":
            await _pcp_map(mapping.gateway, mapping.protocol, mapping.internal_port, 0,
                           mapping.external_port, mapping.external_ip, mapping.nonce)
        elif mapping.method == "natpmp":
            await _natpmp_unmap(mapping)
        else:
            await _upnp_unmap(mapping)
    log.info("removed port mapping %s:%d via %s", mapping.external_ip, mapping.external_port,
             mapping.method)


def _renewal_time(mapping: PortMapping) -> float:
    # Half the lifetime, as RFC 6886 section 3.3 advises; permanent UPnP leases are refreshed
    # anyway in case the gateway rebooted and forgot them.
    return mapping.obtained_at + (mapping.lifetime or DEFAULT_LIFETIME) / 2


async def keep_mapped(internal_port: int, protocol: str = "TCP", *,
                      lifetime: int = DEFAULT_LIFETIME, gateway: str | None = None,
                      methods: Sequence[str] = METHODS, timeout: float = DEFAULT_TIMEOUT,
                      on_change: Callable[[PortMapping | None], object] | None = None,
                      task_status: trio.TaskStatus[PortMapping] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
                      ) -> NoReturn:
    """Hold a mapping open until cancelled, then remove it.

    Start with ``await nursery.start(keep_mapped, port)``, which returns the first mapping or
    raises what ``open_mapping`` raises. Afterwards the mapping is renewed at half its
    lifetime; failed renewals are retried while the mapping lasts, and once it has expired a
    new one is sought with growing pauses. ``on_change`` is called with each new mapping whose
    external address differs from the last, and with None while there is none.

    Cancellation removes the mapping, waiting at most ``CLOSE_TIMEOUT`` seconds for the
    gateway (shielded); if the gateway does not confirm, the mapping expires on its own.
    """
    mapping: PortMapping | None = await open_mapping(
        internal_port, protocol, lifetime=lifetime, gateway=gateway, methods=methods,
        timeout=timeout)
    assert mapping is not None
    task_status.started(mapping)
    if on_change is not None:
        on_change(mapping)
    next_attempt = _renewal_time(mapping)
    pause = RETRY_PAUSE
    try:
        while True:
            await trio.sleep_until(next_attempt)
            if mapping is None:
                try:
                    mapping = await open_mapping(internal_port, protocol, lifetime=lifetime,
                                                 gateway=gateway, methods=methods,
                                                 timeout=timeout)
                except PeerUnavailable as exc:
                    log.warning("port mapping still unavailable: %s", exc)
                    pause = min(pause * 2, MAX_RETRY_PAUSE)
                    next_attempt = trio.current_time() + pause
                    continue
                pause = RETRY_PAUSE
                next_attempt = _renewal_time(mapping)
                if on_change is not None:
                    on_change(mapping)
                continue
            try:
                renewed = await renew(mapping, lifetime=lifetime, timeout=timeout)
            except (PeerUnavailable, ProtocolViolation, RemoteRejected) as exc:
                log.warning("renewing the port mapping failed: %s", exc)
                now = trio.current_time()
                remaining = mapping.expires_at - now
                if remaining > 2 * timeout:
                    next_attempt = now + min(RETRY_PAUSE, remaining / 2)
                    continue
                # Expired (or about to): look for a new mapping, maybe by another method.
                mapping = None
                next_attempt = now + RETRY_PAUSE
                if on_change is not None:
                    on_change(None)
                continue
            moved = (renewed.external_ip, renewed.external_port) != (
                mapping.external_ip, mapping.external_port)
            mapping = renewed
            next_attempt = _renewal_time(mapping)
            if moved and on_change is not None:
                on_change(mapping)
    finally:
        if mapping is not None and trio.current_time() < mapping.expires_at:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                try:
                    await close(mapping, timeout=CLOSE_TIMEOUT)
                except (PeerUnavailable, ProtocolViolation, RemoteRejected) as exc:
                    log.warning("could not remove the port mapping: %s", exc)
