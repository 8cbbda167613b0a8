"""Robust aggregation rules: coordinate-wise median and trimmed mean. Pure: numpy, no files.

A robust rule replaces FedAvg's weighted mean, tensor element by tensor element, by an
order statistic of the sites' values, so that one member's update, however large, cannot
move the result beyond the range of the honest ones:

- :class:`Median`: the coordinate-wise median (the mean of the two middle values for an
  even number of updates). With ``n`` updates it tolerates ``ceil(n/2) - 1`` poisoned ones.
- :class:`TrimmedMean`: per coordinate, drop the ``k = floor(trim * n)`` smallest and ``k``
  largest values and average the rest (Yin et al., ICML 2018). It tolerates ``k`` poisoned
  updates; ``trim`` 0 is the plain, unweighted mean.

Both are unweighted: a site's case count cannot buy it influence (a weighted median would let
a site that claims many cases decide alone). Both are synchronous rules: they order one
round's fresh updates (FedBuff's staleness weighting has no order-statistic counterpart here).

Planning reuses :func:`fedfs.fl.combination.plan` with uniform weights; :func:`robust_outs`
then marks each output that combines site updates with the rule's ``kind``, and
:mod:`fedfs.weights.combine` streams such an output one block of one tensor at a time,
calling :func:`reduce_rows` on ``(updates, block)`` arrays: memory is one chunk whatever the
number of updates, never an update in full.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..errors import ConfigError

__all__ = ["Median", "TrimmedMean", "RobustRule", "ROBUST_KINDS", "is_robust_kind", "rule_named", "trimmed_count",
           "reduce_rows", "robust_outs", "tolerated"]

#: The output kinds the streaming engine reduces with :func:`reduce_rows` (a prefix for trimmed means).
ROBUST_KINDS = ("median", "trimmed:")


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median of the round's updates (unweighted)."""

    @property
    def kind(self) -> str:
        return "median"


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` smallest and largest values."""

    trim: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.trim, (int, float)) and math.isfinite(self.trim) and 0 <= self.trim < 0.5):
            raise ConfigError(f"trimmed mean: trim fraction must be in [0, 0.5), got {self.trim!r}")

    @property
    def kind(self) -> str:
        return f"trimmed:{float(self.trim)!r}"


RobustRule = Union[Median, TrimmedMean]


def rule_named(name: str, trim: float = 0.1) -> RobustRule:
    """The robust rule a federation's ``rule`` setting names ("median" or "trimmed_mean")."""
    if name == "median":
        return Median()
    if name == "trimmed_mean":
        return TrimmedMean(trim)
    raise ConfigError(f"unknown robust rule {name!r} (median or trimmed_mean)")


def is_robust_kind(kind: str) -> bool:
    return kind == "median" or kind.startswith("trimmed:")


def trimmed_count(n: int, trim: float) -> int:
    """How many values a trimmed mean drops at each end among ``n``; at least one value stays."""
    if n < 1:
        raise ValueError("no values to reduce")
    return min(int(math.floor(trim * n + 1e-9)), (n - 1) // 2)


def tolerated(rule: RobustRule, n: int) -> int:
    """How many of ``n`` updates may be arbitrary while the result stays within the honest values' range."""
    return (n - 1) // 2 if isinstance(rule, Median) else trimmed_count(n, rule.trim)


def reduce_rows(kind: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Reduce ``rows`` (updates x elements, finite floats) along axis 0 by the rule ``kind``.

    Deterministic: the result depends on the multiset of values per column only, not on the
    order of the updates. ``rows`` may be reordered in place (it is a scratch buffer).
    """
    n = rows.shape[0]
    if n == 1:
        result = rows[0]
    elif kind == "median":
        mid = n // 2
        if n % 2:
            rows.partition(mid, axis=0)
            result = rows[mid]
        else:
            rows.partition([mid - 1, mid], axis=0)
            result = rows[mid - 1] * 0.5 + rows[mid] * 0.5  # halves first: no overflow near the dtype's max
    elif kind.startswith("trimmed:"):
        k = trimmed_count(n, float(kind.split(":", 1)[1]))
        if k:
            rows.partition([k, n - k - 1], axis=0)  # the middle n - 2k values, as a set, are now rows[k:n-k]
        result = rows[k:n - k].mean(axis=0, dtype=np.float64)
    else:
        raise ValueError(f"not a robust kind: {kind!r}")
    if out is None:
        return np.asarray(result, dtype=rows.dtype)
    out[...] = result
    return out


def robust_outs(rule: RobustRule, outs: Sequence[Any], first_src: int) -> list[Any]:
    """The plan of a uniform FedAvg (:func:`fedfs.fl.combination.plan`) turned into ``rule``'s: every
    float output combined from site updates only is reduced by ``rule.kind`` (the coefficients are
    then unused); integer buffers keep their maximum, tensors no update holds keep the global's."""
    return [o._replace(kind=rule.kind) if o.kind == "lin" and o.terms and all(t.src >= first_src for t in o.terms)
            else o for o in outs]
