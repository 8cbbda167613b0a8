"""JSON documents of the fedfs protocol: frozen dataclasses with strict validation.

Pure: no I/O. Every document class has a ``kind`` and a ``schema_version``.
:func:`from_dict` checks the exact set of fields and their types against the
dataclass annotations, so an unknown version, a missing field or a wrong type
is a :class:`~fedfs.errors.SchemaError` naming the key the document came from.

Parsing is *total*: :func:`decode_json` (behind :func:`loads_strict`) and :func:`from_dict`
turn any input, however hostile (deep nesting, 5000-digit numbers, NaN, duplicate keys,
non-UTF-8, lone surrogates, a wrong type at any level, bool for int), into a value or a
SchemaError; nothing else escapes to stop a party (``tests/test_fuzz.py``, ``benchmarks/fuzz.py``).

Signing wraps a document in an *envelope* (see :mod:`fedfs.trust.signing`); this
module only knows bodies.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np

from ..errors import SchemaError

T = TypeVar("T", bound="Document")

#: Registry kind -> class, filled by @document.
DOCUMENT_KINDS: dict[str, type[Document]] = {}

#: Largest JSON document fedfs will read (bytes). Fingerprint summaries with
#: exact value tables are the largest; they are checked before reading.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
#: Deepest nesting of arrays and objects a document may have (fedfs's own reach 6).
MAX_JSON_DEPTH = 64
#: Longest number literal (characters): far above any int64 or float repr, far below
#: Python's 4300-digit limit on int() (a ValueError, not a JSON error).
MAX_NUMBER_CHARS = 100
#: Integers a document field may hold: signed 64-bit, what numpy and every other reader can take.
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1

_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled: no per-character alternation
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_NUMBER_RE = re.compile(r"[-+0-9.eE]{%d,}" % (MAX_NUMBER_CHARS + 1))  # outside strings


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def brief(value: Any, limit: int = 60) -> str:
    """A short, always-computable description of a value from the bucket, for error messages
    (the repr of a 16 MiB list, or of a 5000-digit int, is no reason)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 200 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object with {len(value)} field(s)"
    return f"a {type(value).__name__}"


def _max_depth(bare: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``bare`` (the text with its strings removed; an
    over-estimate for invalid JSON, which the parser refuses anyway); linear, in C and numpy, so
    16 MiB take milliseconds."""
    opened = bare.count("[") + bare.count("{")
    if opened <= MAX_JSON_DEPTH:  # cannot nest deeper than it opens
        return opened
    arr = np.frombuffer(bare.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = ((arr == 0x5B) | (arr == 0x7B)).astype(np.int64) - ((arr == 0x5D) | (arr == 0x7D))
    return int(np.cumsum(steps).max())


def _strict_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Refused(f"an integer literal of {len(literal)} digits (the limit is {MAX_NUMBER_CHARS})")
    return int(literal)


def _strict_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number literal of {len(literal)} characters (the limit is {MAX_NUMBER_CHARS})")
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the number {literal[:40]} overflows to infinity")
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"JSON constant {name} is not allowed")


class _Refused(Exception):
    """Raised inside the parser's hooks; :func:`decode_json` turns it into a SchemaError with ``where``."""


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate JSON key {brief(dup)}")
    return out


def decode_json(data: Any, where: str, *, max_bytes: int = MAX_DOCUMENT_BYTES,
                object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """The one strict JSON decoder for bytes from the bucket; total: any input either parses or raises
    :class:`~fedfs.errors.SchemaError` naming ``where`` and the reason, never another exception.

    Refused: anything but bytes, more than ``max_bytes``, non-UTF-8, a BOM, nesting deeper than
    :data:`MAX_JSON_DEPTH`, a number literal longer than :data:`MAX_NUMBER_CHARS`, NaN/Infinity and
    numbers that overflow to them, lone UTF-16 surrogates (they cannot be re-encoded to check a
    signature), trailing garbage. ``object_pairs_hook`` builds objects (default: a dict that refuses
    duplicate keys); a :class:`~fedfs.errors.SchemaError` it raises passes through.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise SchemaError(f"{where}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SchemaError(f"{where}: {len(data)} bytes is over the {max_bytes}-byte limit for a document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    bare = _STRING_RE.sub("", text)
    depth = _max_depth(bare)
    if depth > MAX_JSON_DEPTH:
        raise SchemaError(f"{where}: JSON nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})")
    # Integers go through C's parser unless a run of number characters outside strings is long
    # enough to be an over-long literal: then every literal goes through the checking hook
    # (safetensors headers hold hundreds of integers each, one hook call apiece otherwise).
    parse_int = _strict_int if _LONG_NUMBER_RE.search(bare) else int
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook or _no_dupes, parse_int=parse_int,
                           parse_float=_strict_float, parse_constant=_no_constant)
        if _SURROGATE_ESCAPE_RE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded
    except _Refused as exc:
        raise SchemaError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: malformed or truncated JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeEncodeError:
        raise SchemaError(f"{where}: a string holds a lone UTF-16 surrogate escape (not valid Unicode)") from None
    except (RecursionError, MemoryError) as exc:  # not reachable under the limits above; kept total regardless
        raise SchemaError(f"{where}: JSON too large or too deep to parse ({type(exc).__name__})") from None
    return value


def loads_strict(data: bytes, where: str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse a JSON document from the bucket (:func:`decode_json`: duplicate keys, NaN, deep nesting,
    long numbers and every other failure are a :class:`~fedfs.errors.SchemaError` naming ``where``)."""
    return decode_json(data, where, max_bytes=max_bytes)


class Document:
    """Base for protocol documents (use the :func:`document` decorator)."""

    kind: ClassVar[str]
    schema_version: ClassVar[int]

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        body["kind"] = self.kind
        body["schema_version"] = self.schema_version
        return body

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str) -> T:
        return _load_document(cls, data, where)

    def validate(self, where: str) -> None:
        """Semantic checks beyond types; subclasses override and raise SchemaError."""


def document(kind: str, version: int = 1):
    """Class decorator: make a frozen dataclass document of ``kind`` and register it."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True)(cls)
        cls.kind = kind
        cls.schema_version = version
        DOCUMENT_KINDS[kind] = cls
        return cls

    return wrap


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load_document(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {brief(data)}")
    kind = data.get("kind")
    if type(kind) is not str or kind != cls.kind:
        raise SchemaError(f"{where}: expected a {cls.kind!r} document, got kind {brief(kind)}")
    version = data.get("schema_version")
    if type(version) is not int or version != cls.schema_version:  # true and 1.0 are not 1
        raise SchemaError(
            f"{where}: unknown schema_version {brief(version)} for {cls.kind!r} (this fedfs reads version {cls.schema_version})"
        )
    body = {k: v for k, v in data.items() if k not in ("kind", "schema_version")}
    obj = _load_dataclass(cls, body, where, cls.kind)
    obj.validate(where)
    return obj


def _load_dataclass(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: {path} must be an object, got {brief(data)}")
    hints, fields = _fields_of(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        shown = ", ".join(brief(k, 40) for k in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise SchemaError(f"{where}: {path} has unknown field(s) {shown}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                continue
            raise SchemaError(f"{where}: {path} is missing field {name!r}")
        kwargs[name] = _coerce(hints[name], data[name], where, f"{path}.{name}")
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:  # type: ignore[type-arg]
    return get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, path)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0] if errors else f"{where}: {path} has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: {path} must be a list, got {brief(value)}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_coerce(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: {path} must be an object, got {brief(value)}")
        _, vt = get_args(tp)
        return {k: _coerce(vt, v, where, f"{path}.{k[:40]}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        obj = _load_dataclass(tp, value, where, path)
        if isinstance(obj, Document):
            obj.validate(f"{where} ({path})")
        return obj
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: {path} must be true or false, got {brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: {path} must be an integer, got {brief(value)}")
        if not INT_MIN <= value <= INT_MAX:
            raise SchemaError(f"{where}: {path} is {brief(value)}, outside the signed 64-bit range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: {path} must be a number, got {brief(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise SchemaError(f"{where}: {path} must be a finite number, got {brief(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: {path} must be a string, got {brief(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def require(cond: bool, where: str, message: str) -> None:
    """Raise SchemaError(f"{where}: {message}") unless ``cond``."""
    if not cond:
        raise SchemaError(f"{where}: {message}")


# Re-exported for document modules.
__all__ = [
    "Document",
    "document",
    "field",
    "canonical_json",
    "loads_strict",
    "decode_json",
    "brief",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "INT_MIN",
    "INT_MAX",
    "require",
    "DOCUMENT_KINDS",
    "MAX_DOCUMENT_BYTES",
    "typing",
]
