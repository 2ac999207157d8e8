"""Reading requests and writing answers for the JSON API: every input checked and refused
with a 4xx and a message, every answer JSON with no secret and no NaN in it."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dandelion_p2p.runconfig.publication import is_run_id
from dandelion_p2p.webui.scrubbing import SecretScrubber

MAX_BODY = 256 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class JSONOut(Response):
    """JSON with every secret scrubbed out, however it got into the data."""

    media_type = "application/json"

    def __init__(self, content: Any, scrubber: SecretScrubber, status_code: int = 200) -> None:
        self._scrubber = scrubber
        super().__init__(content, status_code, headers={"cache-control": "no-store"})

    def render(self, content: Any) -> bytes:
        text = json.dumps(finite(content), default=str, allow_nan=False, separators=(",", ":"))
        return self._scrubber.scrub(text).encode()


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: JSON has no spelling for them, and a broken
    worker's NaN loss must not break the page that would show it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def error_body(message: str, code: str = "") -> dict[str, Any]:
    return {"error": message, **({"code": code} if code else {})}


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name!r} must be in {low}..{high}")
    return value


def query_float(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be a number") from None
    if not math.isfinite(value):
        raise ApiError(400, f"query parameter {name!r} must be finite")
    return value


def check_run_id(value: Any, where: str = "run") -> str:
    if not isinstance(value, str) or not is_run_id(value):
        raise ApiError(
            400, f"{where!r} must be a run id (<name>-<24 hex digits>, as `runs` lists)"
        )
    return value


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 411/413/415/400 for anything else."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def only_keys(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(unknown)[:200]}")
