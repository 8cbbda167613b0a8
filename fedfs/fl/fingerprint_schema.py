"""The shape of FFE's documents, checked before any number in them is used (pure).

A site's census and fingerprint summary come from the bucket: every field is checked for
presence, type, range and size (a value table is capped, counts must add up) so that a
malformed or hostile summary is a :class:`~fedfs.errors.SchemaError` naming the file, never
a crash or a huge allocation inside the merge (:mod:`fedfs.fl.fingerprint`). Integers are
bounded by :data:`MAX_COUNT` (exact in float64, within int64) and numbers by
:data:`MAX_MAGNITUDE` (squares and sums of squares stay finite), so whatever passes is merged
without an overflow or a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import SchemaError

__all__ = ["MAX_TABLE_ENTRIES", "MAX_COUNT", "MAX_MAGNITUDE", "MAX_AXES", "SAMPLE_DTYPES", "validate_census",
           "validate_federation_census", "validate_summary"]

#: Most entries a channel's value table may have (a DoS guard, far above real use).
MAX_TABLE_ENTRIES = 1 << 22
SAMPLE_DTYPES = ("float16", "float32", "float64")
#: Largest count, case number or shape a summary may hold: 2**53 (exact as a float64, fits int64).
MAX_COUNT = 1 << 53
#: Largest magnitude of a value, mean, bound or spacing (image intensities are far smaller); its square
#: times MAX_COUNT is still a finite float64.
MAX_MAGNITUDE = 1e100
#: Most image axes a case may have (nnU-Net has 2 or 3).
MAX_AXES = 8


def _fail(where: str, reason: str) -> SchemaError:
    return SchemaError(f"{where}: {reason}")


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _fail(where, f"missing field {key!r}")
    return d[key]


def _int(d: Mapping[str, Any], key: str, where: str, minimum: int = 0) -> int:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where, f"{str(key)[:40]} must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise _fail(where, f"{str(key)[:40]} is {_brief_int(v)}; it must be at least {minimum}")
    if v > MAX_COUNT:
        raise _fail(where, f"{str(key)[:40]} is {_brief_int(v)}; it must be at most 2**53")
    return v


def _brief_int(v: int) -> str:
    return str(v) if v.bit_length() <= 200 else f"an integer of {v.bit_length()} bits"


def _finite(v: Any, what: str, where: str, bound: float = MAX_MAGNITUDE) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(where, f"{what} must be a number, got {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise _fail(where, f"{what} is {x}; NaN and Inf are not allowed")
    if abs(x) > bound:
        raise _fail(where, f"{what} is {x}; its magnitude must be at most {bound:g}")
    return x


def _list(v: Any, what: str, where: str) -> list:
    if not isinstance(v, list):
        raise _fail(where, f"{what} must be a list, got {type(v).__name__}")
    return v


def validate_census(d: Any, where: str) -> Mapping[str, Any]:
    """A site's phase-1 census: ``{"num_cases": int >= 1, "num_channels": int >= 1}``."""
    if not isinstance(d, Mapping):
        raise _fail(where, "census must be a JSON object")
    _int(d, "num_cases", where, 1)
    _int(d, "num_channels", where, 1)
    return d


def validate_federation_census(d: Any, where: str) -> Mapping[str, Any]:
    """The aggregator's merged census (see :func:`merge_census`)."""
    if not isinstance(d, Mapping):
        raise _fail(where, "census must be a JSON object")
    total = _int(d, "total_cases", where, 1)
    _int(d, "num_channels", where, 1)
    per = _get(d, "sites", where)
    if not isinstance(per, Mapping) or not per:
        raise _fail(where, "sites must be a non-empty object")
    for site in per:
        _int(per, site, f"{where}, sites", 1)
    if sum(per.values()) != total:
        raise _fail(where, f"sites sums to {sum(per.values())}, total_cases is {total}")
    return d


def validate_summary(d: Any, where: str, n_channels: int | None = None) -> Mapping[str, Any]:
    """Check a site's phase-2 summary; raise SchemaError naming ``where`` and the reason."""
    if not isinstance(d, Mapping):
        raise _fail(where, "summary must be a JSON object")
    n_cases = _int(d, "num_cases", where, 1)
    _int(d, "total_cases", where, n_cases)
    spc = _int(d, "samples_per_case", where, 1)
    dtype = _get(d, "sample_dtype", where)
    if type(dtype) is not str or dtype not in SAMPLE_DTYPES:
        shown = repr(dtype[:40]) if isinstance(dtype, str) else type(dtype).__name__
        raise _fail(where, f"sample_dtype {shown} is not one of {SAMPLE_DTYPES}")
    cases = _get(d, "cases", where)
    if not isinstance(cases, Mapping):
        raise _fail(where, "cases must be a JSON object")
    lists = {k: _list(_get(cases, k, where), f"cases.{k}", where)
             for k in ("spacings", "shapes_after_crop", "relative_sizes_after_cropping")}
    for k, v in lists.items():
        if len(v) != n_cases:
            raise _fail(where, f"inconsistent list lengths: cases.{k} has {len(v)} entries, num_cases is {n_cases}")
    ndim = None
    for i, (sp, sh, rel) in enumerate(zip(*lists.values())):
        sp, sh = _list(sp, f"spacings[{i}]", where), _list(sh, f"shapes_after_crop[{i}]", where)
        ndim = len(sp) if ndim is None else ndim
        if len(sp) != ndim or len(sh) != ndim or not 0 < ndim <= MAX_AXES:
            raise _fail(where, f"inconsistent list lengths: case {i} has spacing of {len(sp)} and shape of "
                               f"{len(sh)} axes, expected {ndim}")
        if any(_finite(v, f"spacings[{i}]", where) <= 0 for v in sp):
            raise _fail(where, f"spacings[{i}] has a non-positive spacing")
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT for v in sh):
            raise _fail(where, f"shapes_after_crop[{i}] must hold non-negative integers up to 2**53")
        if not 0.0 <= _finite(rel, f"relative_sizes_after_cropping[{i}]", where) <= 1.0:
            raise _fail(where, f"relative_sizes_after_cropping[{i}] is {float(rel)}, outside [0, 1]")
    channels = _list(_get(d, "channels", where), "channels", where)
    if n_channels is not None and len(channels) != n_channels:
        raise _fail(where, f"wrong channel count: {len(channels)} channels, the federation has {n_channels}")
    if not channels:
        raise _fail(where, "channels is empty")
    for c, ch in enumerate(channels):
        _validate_channel(ch, f"{where}, channel {c}", n_cases * spc, spc)
    return d


def _validate_channel(ch: Any, where: str, max_count: int, spc: int) -> None:
    if not isinstance(ch, Mapping):
        raise _fail(where, "channel summary must be a JSON object")
    count = _int(ch, "count", where, 0)
    if count > max_count or count % spc:
        raise _fail(where, f"count {count} is not a multiple of samples_per_case {spc} up to {max_count}")
    values = _list(_get(ch, "values", where), "values", where)
    counts = _list(_get(ch, "counts", where), "counts", where)
    if len(values) != len(counts):
        raise _fail(where, f"inconsistent list lengths: {len(values)} values but {len(counts)} counts")
    if len(values) > MAX_TABLE_ENTRIES:
        raise _fail(where, f"value table has {len(values)} entries, the limit is {MAX_TABLE_ENTRIES}")
    bits = _get(ch, "mantissa_bits", where)
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 52):
        shown = _brief_int(bits) if isinstance(bits, int) else type(bits).__name__
        raise _fail(where, f"mantissa_bits must be null or an integer 0..52, got {shown}")
    if count == 0:
        if values:
            raise _fail(where, "count is 0 but the value table is not empty")
        return
    mean, m2 = _finite(_get(ch, "mean", where), "mean", where), _finite(_get(ch, "m2", where), "m2", where, 1e300)
    lo, hi = _finite(_get(ch, "min", where), "min", where), _finite(_get(ch, "max", where), "max", where)
    if m2 < 0:
        raise _fail(where, f"m2 is {m2}; a sum of squares cannot be negative")
    slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
    if not lo - slack <= mean <= hi + slack:
        raise _fail(where, f"mean {mean} lies outside [min {lo}, max {hi}]")
    for i, k in enumerate(counts):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_COUNT:
            shown = _brief_int(k) if isinstance(k, int) else type(k).__name__
            raise _fail(where, f"counts[{i}] is {shown}; counts must be positive integers up to 2**53")
    for i, v in enumerate(values):
        _finite(v, f"values[{i}]", where)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise _fail(where, "values must be strictly increasing")
    if sum(counts) != count:
        raise _fail(where, f"counts sum to {sum(counts)}, count is {count}")
    if bits is None and (values[0] != lo or values[-1] != hi):
        raise _fail(where, "exact value table does not span [min, max]")
