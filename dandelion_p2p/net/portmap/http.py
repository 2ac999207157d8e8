"""The little HTTP/1.1 that UPnP needs, sans-IO: build a request, parse a whole response.

Responses are bounded (``MAX_RESPONSE``) and parsed only once complete: by ``Content-Length``,
by the final chunk of a chunked body, or at end of stream. Only plain ``http://`` URLs whose
host is an IPv4 literal are accepted: a gateway is on the LAN and has no business sending us
to a name that needs DNS.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from dandelion_p2p.errors import ProtocolViolation, RejectCode

MAX_RESPONSE = 128 * 1024
MAX_HEADER = 16 * 1024


@dataclass(frozen=True, slots=True)
class HttpUrl:
    host: str
    port: int
    target: str  # path and query, as sent in the request line

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}{self.target}"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


def parse_url(url: str, base: str | None = None) -> HttpUrl:
    """Resolve ``url`` against ``base`` and check it is ``http://<IPv4>[:port]/...``."""
    full = urljoin(base, url) if base else url
    try:
        parts = urlsplit(full)
        port = parts.port or 80
    except ValueError as exc:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"bad URL {full!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"not an http URL: {full!r}")
    try:
        host = str(ipaddress.IPv4Address(parts.hostname))
    except ValueError:
        raise ProtocolViolation(RejectCode.INVALID_FIELD,
                                f"URL host is not an IPv4 address: {full!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(c in target for c in "\r\n \t"):
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"bad URL path in {full!r}")
    return HttpUrl(host, port, target)


def encode_request(method: str, url: HttpUrl, headers: dict[str, str] | None = None,
                   body: bytes = b"") -> bytes:
    lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.host}:{url.port}",
             "Connection: close", "User-Agent: dandelion-p2p UPnP/1.1"]
    for name, value in (headers or {}).items():
        if any(c in name + value for c in "\r\n"):
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _dechunk(data: bytes) -> bytes | None:
    """Body of a chunked transfer, or None while the last chunk has not arrived."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        size_field = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise ProtocolViolation(RejectCode.MALFORMED, "bad chunk size") from None
        if size < 0 or size > MAX_RESPONSE:
            raise ProtocolViolation(RejectCode.TOO_LARGE, "chunk too large")
        if size == 0:
            return bytes(out)  # trailers, if any, are of no interest
        start = end + 2
        if len(data) < start + size + 2:
            return None
        out += data[start:start + size]
        if data[start + size:start + size + 2] != b"\r\n":
            raise ProtocolViolation(RejectCode.MALFORMED, "chunk not followed by CRLF")
        pos = start + size + 2


def parse_response(data: bytes, *, eof: bool) -> HttpResponse | None:
    """Parse ``data`` as one response; None if more bytes are needed (and ``eof`` is False).

    Raises ``ProtocolViolation`` if the bytes cannot be a valid response, or are too many.
    """
    if len(data) > MAX_RESPONSE:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"HTTP response over {MAX_RESPONSE} bytes")
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if len(data) > MAX_HEADER:
            raise ProtocolViolation(RejectCode.TOO_LARGE, "HTTP header too large")
        if eof:
            raise ProtocolViolation(RejectCode.MALFORMED, "HTTP response ended inside the header")
        return None
    lines = data[:head_end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolViolation(RejectCode.MALFORMED, f"bad HTTP status line {lines[0][:80]!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ProtocolViolation(RejectCode.MALFORMED, f"bad HTTP header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    rest = data[head_end + 4:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest)
        if body is None:
            if eof:
                raise ProtocolViolation(RejectCode.MALFORMED, "chunked body cut short")
            return None
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise ProtocolViolation(RejectCode.MALFORMED, "bad Content-Length") from None
        if length < 0 or length > MAX_RESPONSE:
            raise ProtocolViolation(RejectCode.TOO_LARGE, f"Content-Length {length}")
        if len(rest) < length:
            if eof:
                raise ProtocolViolation(RejectCode.MALFORMED, "body shorter than Content-Length")
            return None
        body = rest[:length]
    else:
        if not eof:
            return None
        body = rest
    return HttpResponse(status, reason, headers, bytes(body))
