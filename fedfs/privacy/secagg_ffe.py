"""Secure FFE: the census and the fingerprint summaries' integer parts summed under secure
aggregation, so the coordinator learns only the pooled figures. Pure: no I/O.

A site's FFE contribution splits in two:

* **masked** (summed by :mod:`.secagg`, uint64 words, exact): the census (its case count and
  a one-hot of its channel count), and per channel the histogram of its sampled foreground
  intensities on a grid every site shares (:class:`IntegerGrid`: one bin per integer value).
  From the pooled histogram the aggregator derives the pooled sample count, min, max, mean,
  variance, median and percentiles, exactly: integer sums are exact, and with integer
  intensities (CT, most stored MRI) plain FFE's value tables are these very histograms.
* **in the clear**: the per-case geometry (spacing, shape after crop, relative size) and the
  sample dtype, which nnU-Net's planner needs as a multiset of records; a masked sum cannot
  carry a multiset of floats (docs/secure-aggregation.md says what this still reveals).

:func:`merge_secure_fingerprint` returns the ``dataset_fingerprint.json`` that plain FFE's
:func:`~fedfs.fl.fingerprint.merge_summaries` returns, field for field; mean and std are the
correctly rounded values of the pooled sums (plain FFE's pairwise float merge may differ from
them in the last bits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..fl.fingerprint import table_percentiles
from ..fl.fingerprint_schema import validate_summary

__all__ = ["IntegerGrid", "MAX_CHANNELS", "census_input", "pooled_census", "summary_input",
           "merge_secure_fingerprint"]

#: Channel counts the census one-hot can express.
MAX_CHANNELS = 16


@dataclass(frozen=True)
class IntegerGrid:
    """The shared histogram grid: one bin per integer intensity in ``[lo, hi]``."""

    lo: int = -32768
    hi: int = 32767

    def __post_init__(self) -> None:
        if not self.lo < self.hi or self.hi - self.lo >= 1 << 24:
            raise ValueError(f"grid [{self.lo}, {self.hi}] must be non-empty and at most 2**24 bins")

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def values(self) -> np.ndarray:
        return np.arange(self.lo, self.hi + 1, dtype=np.float64)

    def histogram(self, values: list[float], counts: list[int], where: str) -> np.ndarray:
        v, c = np.asarray(values, np.float64), np.asarray(counts, np.int64)
        if v.size and (not np.array_equal(v, np.round(v)) or v[0] < self.lo or v[-1] > self.hi):
            raise ValidationError(f"{where}: secure FFE needs integer intensities in the shared grid "
                                  f"[{self.lo}, {self.hi}]; this channel has values in [{v[0]:g}, {v[-1]:g}]"
                                  f"{'' if np.array_equal(v, np.round(v)) else ', not all integers'}")
        out = np.zeros(self.size, np.uint64)
        out[(v - self.lo).astype(np.int64)] = c.astype(np.uint64)
        return out


def census_input(num_cases: int, num_channels: int) -> dict[str, np.ndarray]:
    """A site's masked census: its case count and a one-hot of its channel count."""
    if not 1 <= num_channels <= MAX_CHANNELS:
        raise ValidationError(f"secure FFE takes 1..{MAX_CHANNELS} channels, got {num_channels}")
    onehot = np.zeros(MAX_CHANNELS + 1, np.uint64)
    onehot[num_channels] = 1
    return {"num_cases": np.asarray([num_cases], np.uint64), "channels": onehot}


def pooled_census(total: Mapping[str, np.ndarray], sites: list[str]) -> dict[str, Any]:
    """The merged census from the summed census inputs (no per-site counts: ``sites`` maps each
    survivor to nothing the aggregator knows). ValidationError when the sites' channel counts differ."""
    channels = np.asarray(total["channels"], np.uint64)
    told = {int(c): int(k) for c, k in enumerate(channels) if k}
    if sum(told.values()) != len(sites):
        raise ValidationError(f"the pooled census counts {sum(told.values())} sites, the session {len(sites)}")
    if len(told) != 1:
        detail = ", ".join(f"{k} site(s) with {c}" for c, k in sorted(told.items()))
        raise ValidationError(f"sites disagree on the number of image channels: {detail}")
    return {"total_cases": int(np.asarray(total["num_cases"])[0]), "num_channels": next(iter(told))}


def summary_input(summary: Mapping[str, Any], grid: IntegerGrid, where: str = "fingerprint summary"
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a site's FFE summary (:class:`~fedfs.fl.fingerprint.SiteSummaryBuilder`) into what
    travels in the clear (geometry) and its masked input (per-channel histograms on ``grid``)."""
    validate_summary(summary, where)
    geometry = {k: summary[k] for k in ("num_cases", "total_cases", "samples_per_case", "sample_dtype", "cases")}
    arrays = {"num_cases": np.asarray([summary["num_cases"]], np.uint64)}
    for c, ch in enumerate(summary["channels"]):
        if ch["mantissa_bits"] is not None:
            raise ValidationError(f"{where}, channel {c}: a binned table cannot be summed on an integer grid")
        arrays[f"hist.{c}"] = grid.histogram(ch["values"], ch["counts"], f"{where}, channel {c}")
    return geometry, arrays


def _channel(hist: np.ndarray, grid: IntegerGrid, dtype: np.dtype, what: str) -> dict[str, float]:
    idx = np.flatnonzero(hist)
    if not idx.size:
        raise ValidationError(f"{what}: no site has any foreground sample")
    counts = hist[idx].astype(np.int64)
    values = (idx + grid.lo).astype(np.int64)
    n = int(counts.sum())
    s1 = sum(int(c) * int(v) for c, v in zip(counts.tolist(), values.tolist()))
    s2 = sum(int(c) * int(v) * int(v) for c, v in zip(counts.tolist(), values.tolist()))
    m2 = Fraction(s2 * n - s1 * s1, n)
    p005, med, p995 = table_percentiles(values.astype(np.float64), counts, dtype)
    return {"mean": s1 / n, "median": med, "std": math.sqrt(float(m2 / n)), "min": float(values[0]),
            "max": float(values[-1]), "percentile_99_5": p995, "percentile_00_5": p005}


def merge_secure_fingerprint(geometries: Mapping[str, Mapping[str, Any]], total: Mapping[str, np.ndarray],
                             grid: IntegerGrid, census: Mapping[str, Any]) -> dict[str, Any]:
    """The pooled ``dataset_fingerprint.json`` from the sites' geometry and the unmasked sum of
    their histograms; checked against the (pooled) census as plain FFE checks its summaries."""
    sites = sorted(geometries)
    if int(np.asarray(total["num_cases"])[0]) != census["total_cases"]:
        raise ValidationError(f"the summed summaries hold {int(np.asarray(total['num_cases'])[0])} cases, the "
                              f"census {census['total_cases']}")
    if sum(g["num_cases"] for g in geometries.values()) != census["total_cases"]:
        raise ValidationError("the sites' case records do not add up to the census")
    if {g["total_cases"] for g in geometries.values()} != {census["total_cases"]}:
        raise ValidationError(f"summaries computed for another federation total than {census['total_cases']}")
    spc = {g["samples_per_case"] for g in geometries.values()}
    if len(spc) != 1:
        raise ValidationError(f"sites sampled different numbers of voxels per case: {sorted(spc)}")
    cases = [geometries[s]["cases"] for s in sites]
    pairs = sorted((sp, sh) for c in cases for sp, sh in zip(c["spacings"], c["shapes_after_crop"]))
    rel = [r for c in cases for r in c["relative_sizes_after_cropping"]]
    dtype = np.result_type(*[np.dtype(geometries[s]["sample_dtype"]) for s in sites])
    props = {str(c): _channel(np.asarray(total[f"hist.{c}"], np.uint64), grid, dtype, f"channel {c}")
             for c in range(census["num_channels"])}
    return {
        "spacings": [p[0] for p in pairs],
        "shapes_after_crop": [p[1] for p in pairs],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.median(np.asarray(rel, np.float64), 0)),
    }
