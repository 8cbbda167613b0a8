"""JSON documents of the fedfs protocol: frozen dataclasses with strict validation.

Pure: no I/O. Every document class has a ``kind`` and a ``schema_version``.
:func:`from_dict` checks the exact set of fields and their types against the
dataclass annotations, so an unknown version, a missing field or a wrong type
is a :class:`~fedfs.errors.SchemaError` naming the key the document came from.

Signing wraps a document in an *envelope* (see :mod:`fedfs.trust.signing`); this
module only knows bodies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from ..errors import SchemaError

T = TypeVar("T", bound="Document")

#: Registry kind -> class, filled by @document.
DOCUMENT_KINDS: dict[str, type[Document]] = {}

#: Largest JSON document fedfs will read (bytes). Fingerprint summaries with
#: exact value tables are the largest; they are checked before reading.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def loads_strict(data: bytes, where: str) -> Any:
    """Parse JSON, refusing NaN/Infinity and duplicate keys, with ``where`` in errors."""

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise SchemaError(f"{where}: duplicate JSON key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise SchemaError(f"{where}: JSON constant {name} is not allowed")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: malformed or truncated JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


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
        raise SchemaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind != cls.kind:
        raise SchemaError(f"{where}: expected a {cls.kind!r} document, got kind {kind!r}")
    version = data.get("schema_version")
    if version != cls.schema_version:
        raise SchemaError(
            f"{where}: unknown schema_version {version!r} for {cls.kind!r} (this fedfs reads version {cls.schema_version})"
        )
    body = {k: v for k, v in data.items() if k not in ("kind", "schema_version")}
    obj = _load_dataclass(cls, body, where, cls.kind)
    obj.validate(where)
    return obj


def _load_dataclass(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: {path} must be an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SchemaError(f"{where}: {path} has unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                continue
            raise SchemaError(f"{where}: {path} is missing field {name!r}")
        kwargs[name] = _coerce(hints[name], data[name], where, f"{path}.{name}")
    return cls(**kwargs)


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
            raise SchemaError(f"{where}: {path} must be a list, got {type(value).__name__}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_coerce(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: {path} must be an object, got {type(value).__name__}")
        _, vt = get_args(tp)
        return {k: _coerce(vt, v, where, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        obj = _load_dataclass(tp, value, where, path)
        if isinstance(obj, Document):
            obj.validate(f"{where} ({path})")
        return obj
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: {path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: {path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: {path} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SchemaError(f"{where}: {path} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: {path} must be a string, got {value!r}")
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
    "require",
    "DOCUMENT_KINDS",
    "MAX_DOCUMENT_BYTES",
    "typing",
]
