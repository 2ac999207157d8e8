"""Regenerate ``protocol/vectors/wire.json`` from the ``vectors`` family in ``tests/test_wire.py``.

    .venv/bin/python protocol/vectors/generate_wire.py          # rewrite wire.json
    .venv/bin/python protocol/vectors/generate_wire.py --check  # exit 1 if wire.json is stale

The output is deterministic. The committed JSON is what the tests load; this script only
documents how each vector was made and keeps the file reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT = Path(__file__).resolve().with_name("wire.json")
sys.path.insert(0, str(REPO_ROOT))

from dandelion_p2p.wire import WIRE_VERSION, Message, Reject, RejectCode, encode  # noqa: E402
from dandelion_p2p.wire.framing import ABSOLUTE_MAX_FRAME, HEADER  # noqa: E402
from dandelion_p2p.wire.schema import MAX_MAP_DEPTH  # noqa: E402
from tests.test_wire import (  # noqa: E402
    MAX_FRAME,
    VECTORS,
    Point,
    Route,
    Scalars,
    Settings,
    as_json,
)

MSGPACK_DEPTH_LIMIT = 1024


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frame(payload: bytes) -> bytes:
    """A length prefix and payload, with no checks, so that invalid frames can be written."""
    return HEADER.pack(len(payload)) + payload


def envelope(version: Any, type_id: Any, body: Any) -> bytes:
    return packb([version, type_id, body])


def envelope_raw_body(type_id: int, body: bytes) -> bytes:
    """An envelope whose body is given as msgpack bytes (for encodings packb cannot produce)."""
    return b"\x93" + packb(WIRE_VERSION) + packb(type_id) + body


def raw_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A fixmap from already-encoded keys and values; may repeat a key."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(key + value for key, value in pairs)


def float32(value: float) -> bytes:
    return b"\xca" + struct.pack(">f", value)


def nested_arrays(depth: int, innermost: Any) -> Any:
    value = innermost
    for _ in range(depth):
        value = [value]
    return value


def valid(name: str, about: str, message: Message, wire: bytes | None = None) -> dict[str, Any]:
    """A frame that decodes to ``message``; ``wire`` is given when it is not the canonical one."""
    canonical = frame(encode(message))
    vector: dict[str, Any] = {
        "name": name,
        "about": about,
        "frame": (canonical if wire is None else frame(wire)).hex(),
    }
    if wire is not None:
        assert frame(wire) != canonical, f"{name}: the given bytes are already canonical"
        vector["canonical_frame"] = canonical.hex()
    vector["family"] = VECTORS.family
    vector["type"] = type(message).__name__
    vector["fields"] = as_json(message)
    return vector


def invalid(name: str, about: str, code: RejectCode, raw_frame: bytes) -> dict[str, Any]:
    return {"name": name, "about": about, "frame": raw_frame.hex(), "reject": code.name}


SCALARS_ZERO = Scalars(count=0, offset=0, ratio=0.0, label="", payload=b"", enabled=False)
SCALARS = Scalars(count=7, offset=-7, ratio=0.5, label="seven", payload=b"\x07", enabled=True)
ROUTE = Route(
    chunks=(b"", b"\x01\x02", b"\xff" * 3),
    start=Point(x=1, y=-1),
    stops=(Point(x=2, y=3), Point(x=-4, y=5)),
    comment="via the ridge",
    hops=3,
)
ROUTE_WITHOUT_OPTIONALS = dataclasses.replace(ROUTE, comment=None, hops=None)
SETTINGS = Settings(
    values={
        "lr": 0.0001,
        "name": "sd15",
        "steps": [100, 200],
        "ema": {"decay": 0.999, "enabled": True},
        "seed": None,
    }
)


def scalars_filling(size: int) -> Scalars:
    """A Scalars whose envelope is exactly ``size`` bytes long."""
    payload_length = size
    while True:
        message = dataclasses.replace(SCALARS_ZERO, payload=b"\xab" * payload_length)
        excess = len(encode(message)) - size
        if excess == 0:
            return message
        payload_length -= excess


def valid_vectors() -> list[dict[str, Any]]:
    scalars_body = SCALARS.to_body()
    route_body = ROUTE.to_body()
    return [
        valid("reject", "Reject with the default empty detail", Reject(code=RejectCode.MALFORMED)),
        valid(
            "reject_with_detail",
            "Reject with a detail",
            Reject(code=RejectCode.TOO_LARGE, detail="frame of 4096 bytes exceeds 2048"),
        ),
        valid(
            "reject_unknown_code",
            "codes this version does not know are still valid Rejects",
            Reject(code=2**16 - 1, detail="a code from a later version"),
        ),
        valid("scalars_zero", "zero and empty values", SCALARS_ZERO),
        valid(
            "scalars_fixint_bounds",
            "127 and -32 are the largest one-byte ints",
            Scalars(count=127, offset=-32, ratio=1.5, label="a", payload=b"\x00", enabled=True),
        ),
        valid(
            "scalars_int8_uint8",
            "128 needs uint8, -33 needs int8; negative zero float keeps its sign",
            Scalars(count=128, offset=-33, ratio=-0.0, label="b", payload=b"\x01", enabled=False),
        ),
        valid(
            "scalars_int32_uint32",
            "uint32 and int32 widths",
            Scalars(
                count=65536, offset=-32769, ratio=0.1, label="c", payload=b"\x02", enabled=True
            ),
        ),
        valid(
            "scalars_64bit_extremes",
            "uint64 max, int64 min, largest finite float, unicode text, bin16 bytes",
            Scalars(
                count=2**64 - 1,
                offset=-(2**63),
                ratio=1.7976931348623157e308,
                label="grüße, 世界 🌼",
                payload=bytes(range(256)),
                enabled=True,
            ),
        ),
        valid(
            "scalars_int64_max_and_subnormal",
            "int64 max is written as uint64; the smallest subnormal float",
            Scalars(
                count=2**32, offset=2**63 - 1, ratio=5e-324, label="d", payload=b"", enabled=True
            ),
        ),
        valid(
            "scalars_at_frame_limit",
            f"a frame payload of exactly max_frame ({MAX_FRAME}) bytes is accepted",
            scalars_filling(MAX_FRAME),
        ),
        valid("point", "a flat message", Point(x=-5, y=7)),
        valid("route_full", "arrays of bytes and messages, optionals present", ROUTE),
        valid(
            "route_empty_optionals_nil",
            "empty arrays; optional fields written as nil",
            Route(chunks=(), start=Point(x=0, y=0), stops=()),
        ),
        valid("settings", "a free-form map with nested maps and arrays", SETTINGS),
        valid(
            "accepted_optionals_absent",
            "optional fields may be left out; the canonical form writes them as nil",
            ROUTE_WITHOUT_OPTIONALS,
            envelope(
                WIRE_VERSION,
                Route.TYPE,
                {k: v for k, v in route_body.items() if k not in ("comment", "hops")},
            ),
        ),
        valid(
            "accepted_reject_detail_absent",
            "a field with a default may be left out",
            Reject(code=RejectCode.UNEXPECTED),
            envelope(WIRE_VERSION, Reject.TYPE, {"code": RejectCode.UNEXPECTED.value}),
        ),
        valid(
            "accepted_fields_reordered",
            "fields may come in any order; the canonical form follows declaration order",
            SCALARS,
            envelope(WIRE_VERSION, Scalars.TYPE, dict(reversed(scalars_body.items()))),
        ),
        valid(
            "accepted_float_as_int",
            "a float field accepts an integer",
            dataclasses.replace(SCALARS, ratio=3.0),
            envelope(WIRE_VERSION, Scalars.TYPE, scalars_body | {"ratio": 3}),
        ),
        valid(
            "accepted_float32",
            "a float field accepts float32",
            SCALARS,
            envelope_raw_body(
                Scalars.TYPE,
                raw_map(
                    [
                        (packb(k), float32(v) if k == "ratio" else packb(v))
                        for k, v in scalars_body.items()
                    ]
                ),
            ),
        ),
        valid(
            "accepted_wide_int",
            "an int in a wider encoding than needed",
            Point(x=1, y=2),
            envelope_raw_body(
                Point.TYPE,
                raw_map([(packb("x"), b"\xcf" + struct.pack(">Q", 1)), (packb("y"), packb(2))]),
            ),
        ),
    ]


def invalid_vectors() -> list[dict[str, Any]]:
    scalars_body = SCALARS.to_body()
    route_body = ROUTE.to_body()
    good = encode(SCALARS)
    malformed = RejectCode.MALFORMED
    invalid_field = RejectCode.INVALID_FIELD

    def scalars_with(**changes: Any) -> bytes:
        return frame(envelope(WIRE_VERSION, Scalars.TYPE, scalars_body | changes))

    def scalars_with_raw(name: str, value: bytes) -> bytes:
        pairs = [(packb(k), value if k == name else packb(v)) for k, v in scalars_body.items()]
        return frame(envelope_raw_body(Scalars.TYPE, raw_map(pairs)))

    def route_with(**changes: Any) -> bytes:
        return frame(envelope(WIRE_VERSION, Route.TYPE, route_body | changes))

    def settings_with(values: Any) -> bytes:
        return frame(envelope(WIRE_VERSION, Settings.TYPE, {"values": values}))

    return [
        # Framing.
        invalid("frame_zero_length", "a zero length prefix", malformed, HEADER.pack(0)),
        invalid(
            "frame_over_limit",
            "the header alone announces max_frame + 1 bytes; refused before any payload",
            RejectCode.TOO_LARGE,
            HEADER.pack(MAX_FRAME + 1),
        ),
        invalid(
            "frame_over_absolute_limit",
            "the header announces 64 MiB + 1",
            RejectCode.TOO_LARGE,
            HEADER.pack(ABSOLUTE_MAX_FRAME + 1),
        ),
        invalid("frame_length_max", "the largest 32-bit length", RejectCode.TOO_LARGE, b"\xff" * 4),
        # msgpack.
        invalid(
            "msgpack_truncated",
            "a valid envelope missing its last byte",
            malformed,
            frame(good[:-1]),
        ),
        invalid(
            "msgpack_trailing_byte",
            "a valid envelope followed by one more byte",
            malformed,
            frame(good + b"\x00"),
        ),
        invalid(
            "msgpack_two_envelopes", "two envelopes in one frame", malformed, frame(good + good)
        ),
        invalid(
            "msgpack_reserved_byte", "0xc1 is never used in msgpack", malformed, frame(b"\xc1")
        ),
        invalid(
            "msgpack_invalid_utf8",
            "a str that is not UTF-8",
            malformed,
            scalars_with_raw("label", b"\xa2\xff\xfe"),
        ),
        invalid(
            "msgpack_ext_type",
            "ext types are not used",
            malformed,
            scalars_with_raw("payload", b"\xd4\x01\x00"),
        ),
        invalid(
            "msgpack_timestamp",
            "the timestamp ext type is not used either",
            malformed,
            scalars_with_raw("count", b"\xd6\xff\x00\x00\x00\x01"),
        ),
        invalid(
            "msgpack_integer_map_key",
            "map keys must be strings",
            malformed,
            frame(envelope_raw_body(Point.TYPE, raw_map([(packb(1), packb(2))]))),
        ),
        invalid(
            "msgpack_duplicate_key",
            "a key twice in one map",
            malformed,
            frame(
                envelope_raw_body(
                    Point.TYPE,
                    raw_map(
                        [
                            (packb("x"), packb(1)),
                            (packb("y"), packb(2)),
                            (packb("x"), packb(3)),
                        ]
                    ),
                )
            ),
        ),
        invalid(
            "msgpack_string_longer_than_frame",
            "a str32 header claims 4 GiB",
            malformed,
            scalars_with_raw("label", b"\xdb\xff\xff\xff\xff"),
        ),
        invalid(
            "msgpack_array_longer_than_frame",
            "an array32 header claims 4 billion items",
            malformed,
            scalars_with_raw("label", b"\xdd\xff\xff\xff\xff"),
        ),
        invalid(
            "msgpack_nested_too_deep",
            f"{MSGPACK_DEPTH_LIMIT} nested arrays inside the envelope, past msgpack's depth limit",
            malformed,
            # Written by hand: the packer refuses to nest this deep.
            frame(
                envelope_raw_body(
                    Settings.TYPE,
                    raw_map(
                        [
                            (
                                packb("values"),
                                raw_map([(packb("deep"), b"\x91" * MSGPACK_DEPTH_LIMIT + b"\x00")]),
                            )
                        ]
                    ),
                )
            ),
        ),
        # Envelope.
        invalid(
            "envelope_not_array",
            "a map instead of an array",
            malformed,
            frame(packb({"version": 1, "type": 2, "body": {}})),
        ),
        invalid("envelope_empty", "an empty array", malformed, frame(packb([]))),
        invalid(
            "envelope_two_items",
            "[version, type]",
            malformed,
            frame(packb([WIRE_VERSION, Point.TYPE])),
        ),
        invalid(
            "envelope_four_items",
            "[version, type, body, extra]",
            malformed,
            frame(packb([WIRE_VERSION, Point.TYPE, {"x": 1, "y": 2}, 0])),
        ),
        invalid(
            "envelope_version_string",
            "the version as a str",
            malformed,
            frame(envelope("1", Point.TYPE, {"x": 1, "y": 2})),
        ),
        invalid(
            "envelope_version_bool",
            "true is not the integer 1",
            malformed,
            frame(envelope(True, Point.TYPE, {"x": 1, "y": 2})),
        ),
        invalid(
            "envelope_version_float",
            "1.0 is not the integer 1",
            malformed,
            frame(envelope(1.0, Point.TYPE, {"x": 1, "y": 2})),
        ),
        invalid(
            "version_2",
            "a later version",
            RejectCode.UNSUPPORTED_VERSION,
            frame(envelope(2, Point.TYPE, {"x": 1, "y": 2})),
        ),
        invalid(
            "version_0",
            "an earlier version",
            RejectCode.UNSUPPORTED_VERSION,
            frame(envelope(0, Point.TYPE, {"x": 1, "y": 2})),
        ),
        invalid(
            "version_2_other_shape",
            "the version is read before the rest of the envelope",
            RejectCode.UNSUPPORTED_VERSION,
            frame(packb([2, "a later envelope"])),
        ),
        invalid(
            "type_string",
            "the type as a str",
            malformed,
            frame(envelope(WIRE_VERSION, "Point", {"x": 1, "y": 2})),
        ),
        invalid(
            "type_bool",
            "false is not type 0",
            malformed,
            frame(envelope(WIRE_VERSION, False, {"code": 1, "detail": ""})),
        ),
        invalid(
            "type_unknown",
            "no type 99 in this family",
            RejectCode.UNKNOWN_TYPE,
            frame(envelope(WIRE_VERSION, 99, {})),
        ),
        invalid(
            "type_negative",
            "no type -1 in this family",
            RejectCode.UNKNOWN_TYPE,
            frame(envelope(WIRE_VERSION, -1, {})),
        ),
        # Body and fields.
        invalid(
            "body_not_map",
            "the body as an array",
            invalid_field,
            frame(envelope(WIRE_VERSION, Point.TYPE, [1, 2])),
        ),
        invalid(
            "field_missing",
            "Point without y",
            invalid_field,
            frame(envelope(WIRE_VERSION, Point.TYPE, {"x": 1})),
        ),
        invalid(
            "field_unknown",
            "Point with a z",
            invalid_field,
            frame(envelope(WIRE_VERSION, Point.TYPE, {"x": 1, "y": 2, "z": 3})),
        ),
        invalid(
            "field_name_as_bytes",
            "a field name written as bin is not that field",
            invalid_field,
            frame(envelope(WIRE_VERSION, Point.TYPE, {b"x": 1, "y": 2})),
        ),
        invalid(
            "field_nil_not_optional",
            "nil for a required int",
            invalid_field,
            frame(envelope(WIRE_VERSION, Point.TYPE, {"x": None, "y": 2})),
        ),
        invalid(
            "field_str_as_bytes",
            "bin where str is expected",
            invalid_field,
            scalars_with(label=b"seven"),
        ),
        invalid(
            "field_bytes_as_str",
            "str where bin is expected",
            invalid_field,
            scalars_with(payload="\x07"),
        ),
        invalid(
            "field_bool_as_int",
            "true where an int is expected",
            invalid_field,
            scalars_with(offset=True),
        ),
        invalid(
            "field_float_as_int",
            "1.0 where an int is expected",
            invalid_field,
            scalars_with(offset=1.0),
        ),
        invalid(
            "field_bool_as_float",
            "true where a float is expected",
            invalid_field,
            scalars_with(ratio=True),
        ),
        invalid(
            "field_int_as_bool",
            "1 where a bool is expected",
            invalid_field,
            scalars_with(enabled=1),
        ),
        invalid("field_nan", "NaN float64", invalid_field, scalars_with(ratio=float("nan"))),
        invalid("field_infinity", "+inf float64", invalid_field, scalars_with(ratio=float("inf"))),
        invalid(
            "field_float32_negative_infinity",
            "-inf float32",
            invalid_field,
            scalars_with_raw("ratio", float32(float("-inf"))),
        ),
        invalid(
            "field_check_out_of_range",
            "Scalars.count must not be negative",
            invalid_field,
            scalars_with(count=-1),
        ),
        invalid(
            "field_arrays_for_int",
            "nested arrays where an int is expected",
            invalid_field,
            scalars_with(count=nested_arrays(40, 0)),
        ),
        invalid(
            "array_item_wrong_type",
            "a str in an array of bytes",
            invalid_field,
            route_with(chunks=[b"ok", "not bytes"]),
        ),
        invalid(
            "array_as_map",
            "a map where an array is expected",
            invalid_field,
            route_with(chunks={"0": b"ok"}),
        ),
        invalid(
            "nested_field_missing",
            "the nested Point lacks y",
            invalid_field,
            route_with(start={"x": 1}),
        ),
        invalid(
            "nested_not_map",
            "the nested Point as an array",
            invalid_field,
            route_with(start=[1, 2]),
        ),
        invalid(
            "optional_wrong_type",
            "an optional str given an int",
            invalid_field,
            route_with(comment=5),
        ),
        invalid(
            "reject_code_zero",
            "Reject codes start at 1",
            invalid_field,
            frame(envelope(WIRE_VERSION, Reject.TYPE, {"code": 0, "detail": ""})),
        ),
        invalid(
            "reject_code_too_large",
            "Reject codes fit 16 bits",
            invalid_field,
            frame(envelope(WIRE_VERSION, Reject.TYPE, {"code": 2**16, "detail": ""})),
        ),
        invalid(
            "reject_detail_too_long",
            "Reject detail is at most 512 characters",
            invalid_field,
            frame(envelope(WIRE_VERSION, Reject.TYPE, {"code": 1, "detail": "x" * 513})),
        ),
        invalid(
            "free_form_too_deep",
            f"a free-form map nested {MAX_MAP_DEPTH + 1} levels deep",
            invalid_field,
            settings_with({"deep": nested_arrays(MAX_MAP_DEPTH, 0)}),
        ),
    ]


def type_entry(type_id: int, cls: type[Message]) -> dict[str, Any]:
    fields = []
    for field in dataclasses.fields(cls):
        entry: dict[str, Any] = {"name": field.name, "type": str(field.type)}
        if field.default is not dataclasses.MISSING:
            entry["default"] = as_json(field.default)
        fields.append(entry)
    about = (cls.__doc__ or "").strip().splitlines()[0]
    return {"type_id": type_id, "name": cls.__name__, "about": about, "fields": fields}


def build() -> dict[str, Any]:
    return {
        "about": (
            "Wire format test vectors, described in protocol/wire.md. Generated by "
            "protocol/vectors/generate_wire.py; edit that script, not this file."
        ),
        "wire_version": WIRE_VERSION,
        "family": VECTORS.family,
        "max_frame": MAX_FRAME,
        "types": [type_entry(type_id, cls) for type_id, cls in sorted(VECTORS.types.items())],
        "valid": valid_vectors(),
        "invalid": invalid_vectors(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
