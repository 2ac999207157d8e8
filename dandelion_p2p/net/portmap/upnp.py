"""UPnP IGD messages, sans-IO: SSDP search, device description, SOAP actions.

The client side of the UPnP Device Architecture and the IGD WANIPConnection /
WANPPPConnection services, limited to what port mapping needs: find the gateway with an SSDP
M-SEARCH, read its device description to find the connection service's control URL, then call
``GetExternalIPAddress``, ``AddPortMapping`` and ``DeletePortMapping``.

All parsing is defensive: replies are bounded, XML with a DOCTYPE (the only way to declare
entities) is refused before parsing, tags are matched by local name because real devices get
namespaces wrong, and a control URL must point at the host that served the description.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from dandelion_p2p.errors import ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.net.portmap.http import HttpUrl, parse_url

SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
MAX_SSDP = 4096
MAX_XML = 64 * 1024

SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
_SERVICE_PREFIXES = (
    "urn:schemas-upnp-org:service:WANIPConnection:",
    "urn:schemas-upnp-org:service:WANPPPConnection:",
)
_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
_SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"

ERROR_INVALID_ACTION = 401
ERROR_INVALID_ARGS = 402
ERROR_ACTION_FAILED = 501
ERROR_NOT_AUTHORIZED = 606
ERROR_NO_SUCH_ENTRY = 714
ERROR_CONFLICT = 718
ERROR_SAME_PORT_REQUIRED = 724
ERROR_ONLY_PERMANENT_LEASES = 725

MEANINGS: dict[int, str] = {
    ERROR_INVALID_ACTION: "Invalid Action",
    ERROR_INVALID_ARGS: "Invalid Args",
    ERROR_ACTION_FAILED: "Action Failed",
    ERROR_NOT_AUTHORIZED: "Action not authorized",
    ERROR_NO_SUCH_ENTRY: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    ERROR_CONFLICT: "ConflictInMappingEntry",
    ERROR_SAME_PORT_REQUIRED: "SamePortValuesRequired",
    ERROR_ONLY_PERMANENT_LEASES: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
}


@dataclass(frozen=True, slots=True)
class SsdpResponse:
    location: str
    st: str
    usn: str


@dataclass(frozen=True, slots=True)
class Service:
    service_type: str
    control_url: HttpUrl


def encode_msearch(st: str, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for ``st``; devices answer within ``mx`` seconds (1..5)."""
    if not 1 <= mx <= 5 or any(c in st for c in "\r\n"):
        raise ValueError("bad M-SEARCH parameters")
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_GROUP}:{SSDP_PORT}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {st}\r\n"
        "\r\n"
    ).encode("ascii")


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """Parse a unicast answer to an M-SEARCH. Raises ``ProtocolViolation`` for anything else."""
    if len(data) > MAX_SSDP:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"SSDP datagram of {len(data)} bytes")
    lines = data.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise ProtocolViolation(RejectCode.UNEXPECTED, f"not an M-SEARCH answer: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    location = headers.get("location", "")
    if not location:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "SSDP answer without LOCATION")
    return SsdpResponse(location, headers.get("st", ""), headers.get("usn", ""))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_xml(data: bytes) -> ET.Element:
    """Parse a bounded XML document, refusing DTDs (and with them entity expansion)."""
    if len(data) > MAX_XML:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"XML document of {len(data)} bytes")
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "XML with a DTD refused")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise ProtocolViolation(RejectCode.MALFORMED, f"bad XML: {exc}") from None


def _child_text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def _service_rank(service_type: str) -> tuple[int, int]:
    """Sort key, best first: WANIPConnection before WANPPPConnection, newer versions first."""
    for kind, prefix in enumerate(_SERVICE_PREFIXES):
        if service_type.startswith(prefix):
            version = service_type[len(prefix):]
            return kind, -int(version) if version.isdigit() else 0
    return len(_SERVICE_PREFIXES), 0


def parse_description(data: bytes, location: str) -> list[Service]:
    """The WAN connection services in a device description, best first.

    ``location`` is where the description came from; relative control URLs resolve against
    ``URLBase`` if present, else against it. Raises ``ProtocolViolation`` for a malformed
    document or one offering no usable service.
    """
    root = parse_xml(data)
    origin = parse_url(location)
    base = _child_text(root, "URLBase") or location
    found: list[Service] = []
    problems: list[str] = []
    for element in root.iter():
        if _local(element.tag) != "service":
            continue
        service_type = _child_text(element, "serviceType")
        if not service_type.startswith(_SERVICE_PREFIXES):
            continue
        control = _child_text(element, "controlURL")
        try:
            url = parse_url(control, base)
        except ProtocolViolation as exc:
            problems.append(str(exc))
            continue
        if url.host != origin.host:
            problems.append(f"control URL {url} is not on the describing host {origin.host}")
            continue
        found.append(Service(service_type, url))
    if not found:
        detail = "; ".join(problems) or "no WANIPConnection or WANPPPConnection service"
        raise ProtocolViolation(RejectCode.NOT_FOUND, f"device description: {detail}")
    found.sort(key=lambda s: _service_rank(s.service_type))
    return found


def encode_soap(service_type: str, action: str,
                args: Sequence[tuple[str, str | int]] = ()) -> tuple[dict[str, str], bytes]:
    """Headers and body of a SOAP call of ``action`` on ``service_type``."""
    if not action.isalnum():
        raise ValueError(f"bad action name {action!r}")
    inner = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in args)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{_SOAP_ENV}" s:encodingStyle="{_SOAP_ENCODING}">'
        f'<s:Body><u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}>'
        "</s:Body></s:Envelope>\r\n"
    ).encode()
    headers = {
        "Content-Type": 'text/xml; charset="utf-8"',
        "SOAPAction": f'"{service_type}#{action}"',
    }
    return headers, body


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """Output arguments of a successful call, by name.

    Raises ``RemoteRejected`` with the UPnP error code for a SOAP fault and
    ``ProtocolViolation`` for anything that is neither an answer nor a fault.
    """
    root = parse_xml(body)
    envelope_body = next((e for e in root if _local(e.tag) == "Body"), None)
    if envelope_body is None or len(envelope_body) == 0:
        raise ProtocolViolation(RejectCode.MALFORMED, f"SOAP reply (HTTP {status}) has no Body")
    payload = envelope_body[0]
    if _local(payload.tag) == "Fault":
        code_text = description = ""
        for element in payload.iter():
            if _local(element.tag) == "errorCode":
                code_text = (element.text or "").strip()
            elif _local(element.tag) == "errorDescription":
                description = (element.text or "").strip()
        if not code_text.isdigit():
            raise ProtocolViolation(RejectCode.MALFORMED,
                                    f"SOAP fault without errorCode (HTTP {status})")
        code = int(code_text)
        raise RemoteRejected(code, f"UPnP {action}: {description or MEANINGS.get(code, 'error')}")
    if status != 200:
        raise ProtocolViolation(RejectCode.MALFORMED, f"HTTP {status} without a SOAP fault")
    if _local(payload.tag) != f"{action}Response":
        raise ProtocolViolation(RejectCode.UNEXPECTED,
                                f"expected {action}Response, got {_local(payload.tag)}")
    return {_local(child.tag): (child.text or "").strip() for child in payload}


def parse_external_ip(value: str) -> str | None:
    """The IPv4 address a gateway reports, or None if it reports none (empty or 0.0.0.0)."""
    if not value:
        return None
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise ProtocolViolation(RejectCode.INVALID_FIELD,
                                f"external IP {value[:40]!r} is not IPv4") from None
    return None if addr.is_unspecified else str(addr)
