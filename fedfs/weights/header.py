"""Safetensors headers, parsed and checked without torch: what a weights file holds, and where.

Weights cross the bucket only as safetensors (8-byte little-endian header length,
a JSON header, then raw little-endian tensor bytes); never pickle. A file from the
bucket is untrusted, so :func:`inspect_weights` parses the header itself, strictly
and under a size limit, and checks that the byte ranges tile the file exactly,
before anything looks at tensor data. Importing this module never imports torch, so
readers that need only keys and shapes (reports, status) stay light.

Accepted dtypes (``ALLOWED_DTYPES``, defined with the aggregation rules in
:mod:`fedfs.fl.aggregate`): F32, F16, BF16, F64 for weights, and I64 for integer
counter buffers such as BatchNorm's ``num_batches_tracked`` (aggregation takes their
elementwise maximum). Everything else, booleans and other integers included, is
rejected: nnU-Net networks hold none.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, BinaryIO, NamedTuple

from ..errors import IntegrityError, SchemaError, TooLarge, ValidationError
from ..fl.aggregate import ALLOWED_DTYPES, FLOAT_DTYPES, Shape
from ..protocol.documents import brief, decode_json

__all__ = [
    "ALLOWED_DTYPES",
    "FLOAT_DTYPES",
    "MAX_HEADER",
    "Shape",
    "TensorInfo",
    "WeightsInfo",
    "inspect_weights",
    "parse_header",
    "check_shapes",
    "safetensors_header",
    "read_at",
]

MAX_HEADER = 16 * 1024 * 1024  # a 128-tensor nnU-Net header is ~15 KiB
MAX_KEY_LEN = 512
MAX_RANK = 8
_PREADV = hasattr(os, "preadv")


class TensorInfo(NamedTuple):
    """One tensor's entry in a validated header; start/end are absolute file offsets."""

    dtype: str
    shape: Shape
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WeightsInfo:
    """A validated safetensors header: where every tensor lies, and the metadata."""

    path: str
    size: int
    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorInfo]  # sorted by key

    def shapes(self) -> dict[str, Shape]:
        return {k: t.shape for k, t in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


# ---- writing ---------------------------------------------------------------------
def safetensors_header(entries: Sequence[tuple[str, str, Shape]],
                       metadata: Mapping[str, str] | None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, padded to 8) for tensors stored in ``entries`` order.

    Returns the header and each entry's data offset relative to the data start.
    Deterministic: the same entries and metadata give the same bytes.
    """
    header: dict[str, Any] = {}
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValidationError(f"metadata must map str to str, got {dict(metadata)!r}")
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offsets, pos = [], 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


# ---- reading and validation ----------------------------------------------------
def _sniff(path: str, head: bytes) -> None:
    if head[:4] == b"PK\x03\x04":
        raise SchemaError(f"{path}: is a zip archive (torch.save format), not safetensors; fedfs never unpickles")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise SchemaError(f"{path}: is a Python pickle, not safetensors; fedfs never unpickles")


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as parsed: its (key, value) pairs, duplicates kept so that they can be refused."""

    __slots__ = ()


def _object(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not _Pairs:
        raise SchemaError(f"{what} is not a JSON object")
    out = dict(value)
    if len(out) != len(value):
        seen: set[str] = set()
        dup = next(k for k, _ in value if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise SchemaError(f"duplicate key {dup!r} in {what}")
    return out


def _show(value: Any) -> str:
    """A shape or offsets list as written, if short and flat; else :func:`brief` (never a huge repr)."""
    if type(value) is list and len(value) <= MAX_RANK and all(v is None or isinstance(v, (bool, int, float))
                                                             for v in value):
        return "[" + ", ".join(brief(v) for v in value) + "]"
    return brief(value)


_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_INT = {int}  # compared with type(), not isinstance(): True and False are ints to isinstance


def _parse_entry(path: str, key: str, value: Any, data_start: int) -> TensorInfo:
    if not key or len(key) > MAX_KEY_LEN or not key.isprintable():
        raise SchemaError(f"{path}: tensor name {brief(key, 40)} is empty, too long or not printable")
    try:
        entry = _object(value, f"tensor {key!r}")
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from None
    if entry.keys() != _ENTRY_FIELDS:
        raise SchemaError(f"{path}: tensor {key!r} entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in ALLOWED_DTYPES:
        raise SchemaError(f"{path}: tensor {key!r} has dtype {brief(dtype)}; allowed: {', '.join(ALLOWED_DTYPES)}")
    if type(shape) is not list or len(shape) > MAX_RANK or not set(map(type, shape)) <= _INT or \
            (shape and min(shape) < 0):
        raise SchemaError(f"{path}: tensor {key!r} has an invalid shape {_show(shape)}")
    if type(offsets) is not list or len(offsets) != 2 or not set(map(type, offsets)) <= _INT or \
            not 0 <= offsets[0] <= offsets[1]:
        raise SchemaError(f"{path}: tensor {key!r} has invalid data_offsets {_show(offsets)}")
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise SchemaError(f"{path}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes; "
                          f"{dtype}{shape} needs {nbytes}")
    return TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _parse_entries(path: str, header: dict[str, Any], data_start: int) -> dict[str, TensorInfo]:
    """:func:`_parse_entry` for every tensor, inlined for the common well-formed case (a
    header of a few hundred tensors is parsed per update per round); any doubt goes
    to :func:`_parse_entry`, which raises the precise reason."""
    out, dtypes, max_key = {}, ALLOWED_DTYPES, MAX_KEY_LEN
    for key, value in header.items():
        try:
            (k0, dtype), (k1, shape), (k2, offsets) = value
            item = dtypes[dtype]
            begin, end = offsets
            if type(shape) is not list or len(shape) > MAX_RANK:  # before the product: no 10**6-dim shape
                raise ValueError
            nel = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError
                nel *= d
            ok = (type(value) is _Pairs and k0 == "dtype" and k1 == "shape" and k2 == "data_offsets"
                  and type(shape) is list and len(shape) <= MAX_RANK and type(offsets) is list
                  and type(begin) is int and type(end) is int and 0 <= begin and end - begin == nel * item
                  and 0 < len(key) <= max_key and key.isprintable())
        except (ValueError, TypeError, KeyError):
            ok = False
        out[key] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end) if ok else \
            _parse_entry(path, key, value, data_start)
    return out


def check_shapes(path: str, shapes: Mapping[str, Shape], expected: Mapping[str, Sequence[int]]) -> None:
    """Raise SchemaError naming the first missing, extra or wrongly shaped tensor."""
    if shapes == expected:
        return
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing:
        raise SchemaError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise SchemaError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} extra in all)")
    for key in sorted(expected):
        if tuple(expected[key]) != shapes[key]:
            raise SchemaError(f"{path}: tensor {key!r} has shape {list(shapes[key])}, "
                              f"expected {list(expected[key])}")


def inspect_weights(path: str | os.PathLike[str], *, expected: Mapping[str, Sequence[int]] | None = None,
                    max_header: int = MAX_HEADER) -> WeightsInfo:
    """Validate a safetensors file's header and layout without reading tensor data.

    Reads the 8-byte length and the header (nothing more), then :func:`parse_header`; a file that
    cannot be read is a ValidationError too.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if len(head) == 8 and 2 <= n <= max_header and 8 + n <= size:
                head += f.read(n)
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read: {exc}") from exc
    return parse_header(head, size, path, expected=expected, max_header=max_header)


def parse_header(head: bytes, size: int, path: str, *, expected: Mapping[str, Sequence[int]] | None = None,
                 max_header: int = MAX_HEADER) -> WeightsInfo:
    """The validated header of a safetensors file of ``size`` bytes that begins with ``head`` (the
    8-byte length and the header; more is ignored). Total: anything else is a ValidationError
    (SchemaError, IntegrityError, TooLarge) naming ``path``, never another exception.

    Checks: not a pickle, header length within ``max_header``, strict JSON
    (:func:`fedfs.protocol.documents.decode_json`: no duplicate keys, no NaN, bounded depth and
    number literals), allowed dtypes, shapes matching byte spans, data ranges that tile the rest of
    the file exactly (so truncation and trailing bytes are caught), and, if given, ``expected`` keys
    and shapes.
    """
    _sniff(path, head)
    if len(head) < 8:
        raise IntegrityError(f"{path}: {size} bytes is too short for a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n > max_header:
        raise TooLarge(f"{path}: header of {n} bytes exceeds the {max_header}-byte limit")
    if n < 2 or 8 + n > size or len(head) < 8 + n:
        raise IntegrityError(f"{path}: header length {n} does not fit a file of {size} bytes (truncated?)")
    raw = head[8:8 + n]
    if raw[:1] != b"{":
        raise SchemaError(f"{path}: malformed safetensors header: header is not a JSON object")
    try:
        parsed = decode_json(raw, f"{path}: malformed safetensors header", max_bytes=max_header,
                             object_pairs_hook=_Pairs)
        header = _object(parsed, "header")
        meta = _object(header.pop("__metadata__", _Pairs()), "__metadata__")
    except SchemaError as exc:
        msg = str(exc)
        raise SchemaError(msg if msg.startswith(path) else f"{path}: malformed safetensors header: {msg}") from None
    if not all(type(v) is str for v in meta.values()):
        raise SchemaError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors = _parse_entries(path, header, data_start)
    pos = data_start
    for start, end, key in sorted((t.start, t.end, k) for k, t in tensors.items()):
        if start != pos:
            raise IntegrityError(f"{path}: tensor {brief(key)} starts at byte {start}, expected {pos} "
                                 "(overlapping or gapped data)")
        pos = end
    if pos != size:
        what = "truncated" if pos > size else "has trailing bytes"
        raise IntegrityError(f"{path}: {what}: tensors need {pos} bytes, the file has {size}")
    info = WeightsInfo(path, size, MappingProxyType(dict(meta)),
                       MappingProxyType({k: tensors[k] for k in sorted(tensors)}))
    if expected is not None:
        check_shapes(path, info.shapes(), expected)
    return info


def read_at(f: BinaryIO, view: memoryview, offset: int, path: str = "") -> None:
    """Fill ``view`` from byte ``offset`` of ``f``; a short file is an IntegrityError.

    Positional (``os.preadv``) where the OS has it, so threads may share ``f``;
    elsewhere seek + readinto, so give each thread its own file object.
    """
    done = 0
    while done < len(view):
        if _PREADV:
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
        else:
            f.seek(offset + done)
            got = f.readinto(view[done:]) or 0  # type: ignore[attr-defined]
        if got <= 0:
            raise IntegrityError(f"{path}: file ended at byte {offset + done} (truncated after validation?)")
        done += got
