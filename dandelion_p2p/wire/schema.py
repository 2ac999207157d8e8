"""Versioned, self-validating message dataclasses and their registry.

Each message type is a frozen, slotted dataclass registered under a numeric type id within a
protocol family. Field types are checked from the annotations when a message is decoded; a
``check`` method adds the range and consistency rules a type cannot express.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from dandelion_p2p.errors import ProtocolViolation, RejectCode

Checker = Callable[[Any, str], Any]
M = TypeVar("M", bound="Message")

# Nesting allowed inside a free-form map field, the map itself counting as level 1. msgpack
# decodes up to 1024 levels, but deep values cannot always be re-encoded or compared without
# hitting the recursion limit, so what is accepted stays far below that.
MAX_MAP_DEPTH = 32


def invalid(detail: str) -> ProtocolViolation:
    return ProtocolViolation(RejectCode.INVALID_FIELD, detail)


# Tells type checkers that subclasses are frozen dataclasses, which ``Registry.message`` makes them.
@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
class Message:
    """Base of every wire message. Subclasses are created with ``@message(type_id)``."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    TYPE: ClassVar[int]
    FAMILY: ClassVar[str]
    _FIELDS: ClassVar[tuple[tuple[str, Checker, bool], ...]]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Extra validation; raise ``invalid(...)``. Runs on construction and after decoding."""

    def to_body(self) -> dict[str, Any]:
        return {name: _to_plain(getattr(self, name)) for name, _, _ in self._FIELDS}

    @classmethod
    def from_body(cls: type[M], body: Any) -> M:
        if not isinstance(body, dict):
            raise invalid(f"{cls.__name__}: body must be a map")
        known = {name for name, _, _ in cls._FIELDS}
        unknown = [k for k in body if k not in known]
        if unknown:
            raise invalid(f"{cls.__name__}: unknown field(s) {sorted(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, checker, required in cls._FIELDS:
            if name in body:
                values[name] = checker(body[name], f"{cls.__name__}.{name}")
            elif required:
                raise invalid(f"{cls.__name__}: missing field {name!r}")
        try:
            return cls(**values)
        except ProtocolViolation:
            raise
        except (TypeError, ValueError) as exc:
            raise invalid(f"{cls.__name__}: {exc}") from exc


def _to_plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_body()
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _checker_for(tp: Any) -> Checker:
    origin = typing.get_origin(tp)
    if tp is int:
        def check_int(v: Any, where: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise invalid(f"{where}: expected an integer")
            return v
        return check_int
    if tp is float:
        def check_float(v: Any, where: str) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise invalid(f"{where}: expected a number")
            if not math.isfinite(v):
                raise invalid(f"{where}: must be finite")
            return float(v)
        return check_float
    if tp is bool:
        def check_bool(v: Any, where: str) -> bool:
            if not isinstance(v, bool):
                raise invalid(f"{where}: expected a boolean")
            return v
        return check_bool
    if tp in (str, bytes):
        def check_simple(v: Any, where: str) -> Any:
            if not isinstance(v, tp):
                raise invalid(f"{where}: expected {tp.__name__}")
            return v
        return check_simple
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda v, where: tp.from_body(v)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only homogeneous tuple[X, ...] fields are supported, not {tp}")
        item = _checker_for(args[0])

        def check_tuple(v: Any, where: str) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple):
                raise invalid(f"{where}: expected an array")
            return tuple(item(x, f"{where}[{i}]") for i, x in enumerate(v))
        return check_tuple
    if origin is dict:
        def check_map(v: Any, where: str) -> dict[str, Any]:
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise invalid(f"{where}: expected a map with string keys")
            _check_nesting(v, where)
            return dict(v)
        return check_map
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1 or len(args) != 2:
            raise TypeError(f"only Optional[X] unions are supported, not {tp}")
        inner = _checker_for(non_none[0])
        return lambda v, where: None if v is None else inner(v, where)
    raise TypeError(f"unsupported field type {tp!r}")


def _check_nesting(value: dict[str, Any], where: str) -> None:
    # Iterative, so a hostile nesting depth cannot exhaust the Python stack before it is refused.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > MAX_MAP_DEPTH:
                raise invalid(f"{where}: nested deeper than {MAX_MAP_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


class Registry:
    """Message types of one protocol family, by type id."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.types: dict[int, type[Message]] = {}
        if _reject_type is not None:
            self.types[0] = _reject_type

    def message(self, type_id: int) -> Callable[[type[M]], type[M]]:
        def register(cls: type[M]) -> type[M]:
            if type_id in self.types:
                raise ValueError(f"{self.family}: type id {type_id} registered twice")
            dc = dataclasses.dataclass(frozen=True, slots=True)(cls)
            hints = typing.get_type_hints(dc)
            fields = []
            for f in dataclasses.fields(dc):
                required = (
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                )
                fields.append((f.name, _checker_for(hints[f.name]), required))
            dc.TYPE = type_id
            dc.FAMILY = self.family
            dc._FIELDS = tuple(fields)
            self.types[type_id] = dc
            return dc

        return register


_reject_type: type[Message] | None = None
_common = Registry("common")


@_common.message(0)
class Reject(Message):
    """Answer to a request that could not be accepted; type 0 in every protocol family."""

    code: int
    detail: str = ""

    def check(self) -> None:
        if not 0 < self.code < 2**16:
            raise invalid("Reject.code out of range")
        if len(self.detail) > 512:
            raise invalid("Reject.detail longer than 512 characters")


_reject_type = Reject
