"""Federated Fingerprint Extraction (FFE): the math, pure (stdlib + numpy).

nnU-Net's ``DatasetFingerprintExtractor`` draws ``int(10e7 // n_cases)`` foreground
voxels per case with a fixed seed and computes mean, std, min, max, median and the
0.5/99.5 percentiles over the *concatenation* of all cases' samples. Once a site
knows the federation-wide case count (phase 1, :func:`merge_census`) it draws the
very samples centralized nnU-Net would draw, and publishes a mergeable summary of
them (phase 2, :class:`SiteSummaryBuilder`): the sample count, mean and sum of
squared deviations (merged with Chan et al.'s parallel formula), min, max, and a
value -> count table. :func:`merge_summaries` turns the summaries into exactly the
``dataset_fingerprint.json`` nnU-Net would have written for the pooled data.

Quantile table: exact while a site's channel holds at most ``max_exact_values``
distinct sample values (always the case for integer CT), so quantiles reproduce
``np.percentile`` bit for bit. Beyond that, values are binned by truncating their
float64 mantissa to ``mantissa_bits`` bits (a range-free, mergeable relative-error
histogram); a quantile is then within ``2**-(mantissa_bits+1) * max(|a|, |b|)`` of the
true one, ``a`` and ``b`` being the two order statistics ``np.percentile``
interpolates between (a relative error of at most 2**-13 ~ 1.2e-4 for the default
12 bits when they share a sign).

The plans that follow from the merged fingerprint are compared in :mod:`fedfs.fl.plans`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ValidationError
from .fingerprint_schema import (
    validate_census,
    validate_federation_census,
    validate_summary,
)

__all__ = [
    "PERCENTILES", "DEFAULT_MAX_EXACT_VALUES", "DEFAULT_MANTISSA_BITS",
    "validate_census", "merge_census", "census_mismatch", "validate_federation_census", "validate_summary",
    "summarize_samples", "SiteSummaryBuilder", "merge_summaries", "reference_merge",
    "table_percentiles", "coarsen_table", "bin_midpoints", "merge_moments",
]

#: The percentiles nnU-Net stores: percentile_00_5, median, percentile_99_5.
PERCENTILES = (0.5, 50.0, 99.5)
DEFAULT_MAX_EXACT_VALUES = 1 << 16
DEFAULT_MANTISSA_BITS = 12
def merge_census(censuses: Mapping[str, Mapping[str, Any]]) -> dict:
    """Phase 1 merge: the federation-wide case count every site needs for phase 2."""
    if not censuses:
        raise ValidationError("no site census to merge")
    sites = sorted(censuses)
    for s in sites:
        validate_census(censuses[s], f"census of site {s!r}")
    channels = {censuses[s]["num_channels"] for s in sites}
    if len(channels) != 1:
        detail = ", ".join(f"{s}={censuses[s]['num_channels']}" for s in sites)
        raise ValidationError(f"sites disagree on the number of image channels: {detail}")
    cases = {s: int(censuses[s]["num_cases"]) for s in sites}
    return {"total_cases": sum(cases.values()), "num_channels": channels.pop(), "sites": cases}


def census_mismatch(censuses: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], str] | None:
    """The first way two sites' datasets disagree (channel count, label names, channel names), as
    (the two sites, a sentence naming both and their values); None when they agree. A site that
    published no names (an older fedfs) is not compared on them."""
    sites = sorted(censuses)
    for what, field in (("a different number of image channels", "num_channels"),
                        ("different labels (dataset.json \"labels\")", "labels"),
                        ("different channels (dataset.json \"channel_names\")", "channel_names")):
        told = [s for s in sites if censuses[s].get(field) not in (None, {})]
        for s in told[1:]:
            a, b = censuses[told[0]][field], censuses[s][field]
            if a != b:
                return [told[0], s], (f"sites {told[0]} and {s} have {what}: {told[0]} has {a!r}, {s} has {b!r}; "
                                      "every site's dataset must use the same labels and channels")
    return None


# ---------------------------------------------------------------- value tables

def summarize_samples(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values (float64) and their counts (int64) of one case's samples.

    Integer-valued samples over a modest range (CT) are counted with ``bincount``
    (linear time); anything else with ``np.unique``.
    """
    x = np.asarray(samples).ravel()
    if x.size == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    if not np.all(np.isfinite(x)):
        raise ValidationError("foreground samples contain NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < (1 << 22) and np.array_equal(x, np.round(x)):
        counts = np.bincount((x - lo).astype(np.int64))
        idx = np.flatnonzero(counts)
        return lo + idx.astype(np.float64), counts[idx].astype(np.int64)
    values, counts = np.unique(x, return_counts=True)
    return values.astype(np.float64), counts.astype(np.int64)


def _merge_tables(tables: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([np.asarray(v, np.float64) for v, _ in tables]) if tables else np.zeros(0)
    counts = np.concatenate([np.asarray(c, np.int64) for _, c in tables]) if tables else np.zeros(0, np.int64)
    if values.size == 0:
        return values, counts.astype(np.int64)
    uniq, inverse = np.unique(values, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=counts, minlength=uniq.size)  # exact below 2**53
    return uniq, np.rint(summed).astype(np.int64)


def coarsen_table(values: np.ndarray, counts: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin a value table: keep ``bits`` mantissa bits of each float64 (truncate toward 0)."""
    raw = np.asarray(values, np.float64).view(np.uint64)
    mask = np.uint64(((1 << 64) - 1) ^ ((1 << (52 - bits)) - 1))
    keys = (raw & mask).view(np.float64)
    return _merge_tables([(keys, np.asarray(counts, np.int64))])


def bin_midpoints(keys: np.ndarray, bits: int) -> np.ndarray:
    """Centre of each bin made by :func:`coarsen_table` (keys are the truncated values)."""
    keys = np.asarray(keys, np.float64)
    mag = np.abs(keys)
    upper = (mag.view(np.uint64) + np.uint64(1 << (52 - bits))).view(np.float64)
    return np.sign(keys) * (mag + upper) / 2 + np.where(keys == 0, upper / 2, 0.0)


def _moments(values: np.ndarray, counts: np.ndarray) -> tuple[int, float, float]:
    n = int(counts.sum())
    if n == 0:
        return 0, 0.0, 0.0
    c = counts.astype(np.float64)
    mean = float(np.sum(c * values)) / n  # c*v is exact; pairwise float64 summation
    m2 = float(np.sum(c * (values - mean) ** 2))
    return n, mean, m2


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s pairwise merge of (count, mean, sum of squared deviations)."""
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * nb / n, m2_a + m2_b + delta * delta * na * nb / n


class _ChannelAccumulator:
    """Site-side running summary of one channel over the cases seen so far."""

    def __init__(self, max_exact_values: int, mantissa_bits: int) -> None:
        self.max_exact_values, self.mantissa_bits = max_exact_values, mantissa_bits
        self.bits: int | None = None
        self.moments: tuple[int, float, float] = (0, 0.0, 0.0)
        self.lo, self.hi = math.inf, -math.inf
        self.values, self.counts = np.zeros(0), np.zeros(0, np.int64)

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        if values.size == 0:
            return
        self.moments = merge_moments(self.moments, _moments(values, counts))
        self.lo, self.hi = min(self.lo, float(values[0])), max(self.hi, float(values[-1]))
        if self.bits is not None:
            values, counts = coarsen_table(values, counts, self.bits)
        self.values, self.counts = _merge_tables([(self.values, self.counts), (values, counts)])
        if self.bits is None and self.values.size > self.max_exact_values:
            self.bits = self.mantissa_bits
            self.values, self.counts = coarsen_table(self.values, self.counts, self.bits)

    def result(self) -> dict:
        n, mean, m2 = self.moments
        if n == 0:
            return {"count": 0, "mean": None, "m2": None, "min": None, "max": None,
                    "values": [], "counts": [], "mantissa_bits": None}
        return {"count": n, "mean": mean, "m2": m2, "min": self.lo, "max": self.hi,
                "values": [float(v) for v in self.values], "counts": [int(c) for c in self.counts],
                "mantissa_bits": self.bits}


class SiteSummaryBuilder:
    """Collects a site's cases (phase 2) into the summary document's payload.

    Feed it what nnU-Net's ``analyze_case`` returns, one case at a time, in any
    order; :meth:`summary` sorts the per-case records so the output is
    deterministic and says nothing about file order.
    """

    def __init__(self, n_channels: int, total_cases: int, samples_per_case: int,
                 max_exact_values: int = DEFAULT_MAX_EXACT_VALUES,
                 mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> None:
        self.total_cases, self.samples_per_case = total_cases, samples_per_case
        self.channels = [_ChannelAccumulator(max_exact_values, mantissa_bits) for _ in range(n_channels)]
        self.records: list[tuple[list, list, float]] = []
        self.dtypes: list[np.dtype] = []

    def add_case(self, spacing: Sequence[float], shape_after_crop: Sequence[int], relative_size: float,
                 tables: Sequence[tuple[np.ndarray, np.ndarray]], sample_dtype: str) -> None:
        """One case: its per-channel tables from :func:`summarize_samples` and the dtype
        nnU-Net's concatenation would see for it (float64 for a case without foreground,
        whose empty sample list numpy promotes)."""
        if len(tables) != len(self.channels):
            raise ValidationError(f"case has {len(tables)} channels, expected {len(self.channels)}")
        self.records.append(([_py(v) for v in spacing], [int(v) for v in shape_after_crop], float(relative_size)))
        self.dtypes.append(np.dtype(sample_dtype))
        for acc, (values, counts) in zip(self.channels, tables):
            acc.add(np.asarray(values, np.float64), np.asarray(counts, np.int64))

    def summary(self) -> dict:
        records = sorted(self.records, key=lambda r: (r[0], r[1], r[2]))
        return {
            "num_cases": len(records),
            "total_cases": self.total_cases,
            "samples_per_case": self.samples_per_case,
            "sample_dtype": str(np.result_type(*self.dtypes)) if self.dtypes else "float32",
            "cases": {"spacings": [r[0] for r in records],
                      "shapes_after_crop": [r[1] for r in records],
                      "relative_sizes_after_cropping": [r[2] for r in records]},
            "channels": [acc.result() for acc in self.channels],
        }


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------- quantiles

def table_percentiles(values: np.ndarray, counts: np.ndarray, dtype: str | np.dtype,
                      percentiles: Sequence[float] = PERCENTILES) -> list[float]:
    """``np.percentile(samples, percentiles)`` (method 'linear') from a value table.

    Mirrors numpy's index, gamma and ``_lerp`` arithmetic in the samples' dtype, so
    an exact table reproduces numpy's result bit for bit.
    """
    values = np.asarray(values, np.float64)
    counts = np.asarray(counts, np.int64)
    n = int(counts.sum())
    if n == 0:
        raise ValidationError("cannot take percentiles of zero samples")
    q = np.true_divide(np.asarray(percentiles, np.float64), 100)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above], nxt[above] = -1, -1
    below = virtual < 0
    prev[below], nxt[below] = 0, 0
    prev_i, next_i = prev.astype(np.intp), nxt.astype(np.intp)
    gamma = np.asarray(virtual - prev_i, dtype=virtual.dtype)
    cum = np.cumsum(counts)

    def at(i: np.ndarray) -> np.ndarray:
        i = np.where(i < 0, n + i, i)
        return values[np.searchsorted(cum, i, side="right")].astype(dtype)

    a, b = at(prev_i), at(next_i)
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return [float(v) for v in out]


# ---------------------------------------------------------------- merging

def merge_summaries(summaries: Mapping[str, Mapping[str, Any]], census: Mapping[str, Any]) -> dict:
    """Phase 2 merge: nnU-Net's ``dataset_fingerprint.json`` of the pooled data.

    Per-case lists hold the same records as nnU-Net's, sorted (nnU-Net lists them in
    file order; its planner only uses medians and spacing/shape pairs). Deterministic:
    sites are merged in sorted order. Raises ValidationError naming
    the site when a summary does not fit the census it claims to answer.
    """
    validate_federation_census(census, "federation census")
    sites = sorted(summaries)
    if sites != sorted(census["sites"]):
        raise ValidationError(f"summaries from sites {sites} do not match the census sites "
                              f"{sorted(census['sites'])}")
    n_channels = census["num_channels"]
    spc = set()
    for s in sites:
        d = summaries[s]
        where = f"fingerprint summary of site {s!r}"
        validate_summary(d, where, n_channels=n_channels)
        if d["total_cases"] != census["total_cases"]:
            raise ValidationError(f"{where}: computed for {d['total_cases']} federation cases, "
                                  f"the census says {census['total_cases']}")
        if d["num_cases"] != census["sites"][s]:
            raise ValidationError(f"{where}: has {d['num_cases']} cases, its census said "
                                  f"{census['sites'][s]}")
        spc.add(d["samples_per_case"])
    if len(spc) != 1:
        raise ValidationError(f"sites sampled different numbers of voxels per case: {sorted(spc)}")

    # One sorted list of (spacing, shape) pairs: nnU-Net only uses the multiset, and a
    # per-site concatenation would let any reader attribute cases to sites via the census.
    cases = [summaries[s]["cases"] for s in sites]
    pairs = sorted((sp, sh) for c in cases for sp, sh in zip(c["spacings"], c["shapes_after_crop"]))
    spacings, shapes = [p[0] for p in pairs], [p[1] for p in pairs]
    rel = [r for c in cases for r in c["relative_sizes_after_cropping"]]
    dtype = np.result_type(*[np.dtype(summaries[s]["sample_dtype"]) for s in sites])

    props = {}
    for ch in range(n_channels):
        chans = [summaries[s]["channels"][ch] for s in sites]
        props[str(ch)] = _merge_channel(chans, dtype, f"channel {ch}")
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.median(np.asarray(rel, np.float64), 0)),
    }


def _merge_channel(chans: Sequence[Mapping[str, Any]], dtype: np.dtype, what: str) -> dict:
    chans = [c for c in chans if c["count"] > 0]
    if not chans:
        raise ValidationError(f"{what}: no site has any foreground sample")
    moments: tuple[int, float, float] = (0, 0.0, 0.0)
    for c in chans:
        moments = merge_moments(moments, (c["count"], c["mean"], c["m2"]))
    n, mean, m2 = moments
    binned = [c["mantissa_bits"] for c in chans if c["mantissa_bits"] is not None]
    bits = min(binned) if binned else None
    tables = []
    for c in chans:
        v, k = np.asarray(c["values"], np.float64), np.asarray(c["counts"], np.int64)
        tables.append(coarsen_table(v, k, bits) if bits is not None else (v, k))
    values, counts = _merge_tables(tables)
    lo, hi = min(c["min"] for c in chans), max(c["max"] for c in chans)
    if bits is None:
        p005, med, p995 = table_percentiles(values, counts, dtype)
    else:
        mids = np.clip(bin_midpoints(values, bits), lo, hi)
        p005, med, p995 = table_percentiles(mids, counts, np.float64)
    return {"mean": mean, "median": med, "std": math.sqrt(max(m2, 0.0) / n), "min": lo, "max": hi,
            "percentile_99_5": p995, "percentile_00_5": p005}


_STAT_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


def reference_merge(fingerprints: Mapping[str, Mapping[str, Any]]) -> dict:
    """FednnU-Net's merge of per-site nnU-Net fingerprints, for comparison only.

    Per-case lists are concatenated; min and max are taken over sites; mean, std,
    median, percentiles and the median relative size are averaged with case-count
    weights, which is not what nnU-Net computes on pooled data.
    """
    sites = sorted(fingerprints)
    fps = [fingerprints[s] for s in sites]
    weights = np.asarray([len(fp["spacings"]) for fp in fps], np.float64)
    weights /= weights.sum()
    channels = sorted(fps[0]["foreground_intensity_properties_per_channel"], key=int)
    props = {}
    for ch in channels:
        per = [fp["foreground_intensity_properties_per_channel"][ch] for fp in fps]
        merged = {k: float(np.dot(weights, [p[k] for p in per])) for k in _STAT_KEYS}
        merged["min"] = float(min(p["min"] for p in per))
        merged["max"] = float(max(p["max"] for p in per))
        props[str(ch)] = merged
    return {
        "spacings": [sp for fp in fps for sp in fp["spacings"]],
        "shapes_after_crop": [sh for fp in fps for sh in fp["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.dot(
            weights, [fp["median_relative_size_after_cropping"] for fp in fps])),
    }
