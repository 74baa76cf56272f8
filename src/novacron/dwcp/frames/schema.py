"""Body schemas: typed, numbered, bounded fields, checked on encode and on decode.

A body is a msgpack map from field number to value, like protobuf's field numbers: names can change,
numbers never do. A decoder ignores field numbers it does not know (forward compatibility) and
rejects known fields of the wrong type or out of bounds, and missing required fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames.limits import MAX_BYTES_LEN, MAX_LIST_ITEMS, MAX_STRING_BYTES, MAX_U64


class Kind(Enum):
    UINT = "uint"
    BOOL = "bool"
    STR = "str"
    BYTES = "bytes"
    STR_LIST = "str-list"
    UINT_LIST = "uint-list"


@dataclass(frozen=True, slots=True)
class Field:
    """One body field. ``low``/``high`` bound a UINT's value, or the length of STR (UTF-8 bytes) and
    BYTES, or each item of a list; ``max_items`` bounds a list."""

    number: int
    name: str
    kind: Kind
    required: bool = True
    low: int = 0
    high: int = MAX_U64
    max_items: int = MAX_LIST_ITEMS


def uint(number: int, name: str, high: int = MAX_U64, *, low: int = 0, required: bool = True) -> Field:
    return Field(number, name, Kind.UINT, required, low, high)


def boolean(number: int, name: str, *, required: bool = False) -> Field:
    return Field(number, name, Kind.BOOL, required)


def text(number: int, name: str, max_bytes: int, *, required: bool = True, min_bytes: int = 0) -> Field:
    return Field(number, name, Kind.STR, required, min_bytes, min(max_bytes, MAX_STRING_BYTES))


def blob(number: int, name: str, max_len: int, *, min_len: int = 0, required: bool = True) -> Field:
    return Field(number, name, Kind.BYTES, required, min_len, min(max_len, MAX_BYTES_LEN))


def text_list(number: int, name: str, max_items: int, item_bytes: int) -> Field:
    return Field(number, name, Kind.STR_LIST, False, 1, item_bytes, min(max_items, MAX_LIST_ITEMS))


def uint_list(number: int, name: str, max_items: int, high: int = MAX_U64) -> Field:
    return Field(number, name, Kind.UINT_LIST, False, 0, high, min(max_items, MAX_LIST_ITEMS))


def _bad(frame: str, field: Field, why: str) -> ProtocolError:
    return ProtocolError(
        f"malformed {frame} body: field {field.name} ({field.number}) {why}",
        what=ProtocolErrorKind.MALFORMED,
        frame=frame,
        field=field.name,
    )


def _is_uint(value: object) -> bool:
    return type(value) is int  # bool is an int subclass: exclude it


def check_value(frame: str, field: Field, value: Any) -> Any:
    """Return ``value`` in its Python form (lists as tuples) if it fits ``field``, else raise."""
    kind = field.kind
    if kind is Kind.UINT:
        if not _is_uint(value):
            raise _bad(frame, field, f"must be an unsigned integer, got {type(value).__name__}")
        if not field.low <= value <= field.high:
            raise _bad(frame, field, f"must be in {field.low}..{field.high}, got {value}")
        return value
    if kind is Kind.BOOL:
        if type(value) is not bool:
            raise _bad(frame, field, f"must be a boolean, got {type(value).__name__}")
        return value
    if kind is Kind.STR:
        if not isinstance(value, str):
            raise _bad(frame, field, f"must be a string, got {type(value).__name__}")
        _check_len(frame, field, _utf8_len(frame, field, value), field.low, field.high)
        return value
    if kind is Kind.BYTES:
        if not isinstance(value, bytes | bytearray):
            raise _bad(frame, field, f"must be bytes, got {type(value).__name__}")
        _check_len(frame, field, len(value), field.low, field.high)
        return bytes(value)
    if not isinstance(value, list | tuple):
        raise _bad(frame, field, f"must be a list, got {type(value).__name__}")
    if len(value) > field.max_items:
        raise _bad(frame, field, f"has {len(value)} items, at most {field.max_items} allowed")
    if kind is Kind.STR_LIST:
        for item in value:
            if not isinstance(item, str):
                raise _bad(frame, field, "must hold only strings")
            _check_len(frame, field, _utf8_len(frame, field, item), field.low, field.high)
    else:
        for item in value:
            if not _is_uint(item) or not field.low <= item <= field.high:
                raise _bad(frame, field, f"must hold only integers in {field.low}..{field.high}")
    return tuple(value)


def _utf8_len(frame: str, field: Field, value: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _bad(frame, field, "is not valid UTF-8 text") from exc


def _check_len(frame: str, field: Field, n: int, low: int, high: int) -> None:
    if not low <= n <= high:
        raise _bad(frame, field, f"length {n} is outside {low}..{high}")
