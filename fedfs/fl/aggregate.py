"""Aggregation rules, their inputs and results, and the admission of updates. Pure: headers
in, decisions out; no tensor data, no files.

A rule (:class:`FedAvg`, :class:`FedBuff`, :class:`FedAsync`, with a :class:`Staleness`
function, or a robust median / trimmed mean of :mod:`fedfs.fl.robust`) says how updates are combined. :func:`accept` decides, from an update's header,
its weight and staleness (or its rejection, with the reason); :mod:`fedfs.fl.combination`
turns the accepted updates into a plan of linear combinations, and
:mod:`fedfs.weights.combine` streams that plan over the files and holds the entry points
``aggregate``, ``aggregate_asym`` and ``extract_site``.

- Sites upload **full weights**, in the same format for synchronous and
  asynchronous rounds. FedBuff's ``delta_i = x_i - base_i`` is formed from the base
  global file the update started from (``Update.base_path``), so the aggregator keeps
  the globals still within ``max_staleness``.
- FedAvg takes only updates for the current version; FedBuff and FedAsync discount a
  stale one by ``s(tau)`` and refuse one staler than ``max_staleness``.

Headers are read through two small protocols (:class:`Header`, :class:`TensorHeader`)
that :class:`fedfs.weights.header.WeightsInfo` satisfies, so this module never imports
the I/O side. ``ALLOWED_DTYPES`` is the one table of the safetensors dtypes fedfs accepts.

AsymFedAvg (``align="level"`` or ``"name"``): outputs are *groups* (aligned key +
shape, see :mod:`fedfs.fl.align`) averaged over the sites that have them; the result
is a union file, and ``extract_site`` gives each site its own keys back.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, Union

from .align import Shape, SiteShare, group_keys
from .robust import Median, TrimmedMean
from ..errors import ConfigError, SchemaError, ValidationError

__all__ = [
    "ALLOWED_DTYPES", "FLOAT_DTYPES", "Shape", "TensorHeader", "Header",
    "Staleness", "FedAvg", "FedBuff", "FedAsync", "Rule", "Update", "Contribution", "Rejection",
    "AggregateResult", "Extraction", "Accepted",
    "check_config", "accept", "output_groups", "reference_layout", "number_sources",
]

#: safetensors dtype name -> bytes per element: F32, F16, BF16, F64 for weights, I64 for
#: integer counters such as BatchNorm's ``num_batches_tracked`` (combined by maximum).
ALLOWED_DTYPES: Mapping[str, int] = MappingProxyType({"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


class TensorHeader(Protocol):
    """What planning reads of one tensor's header entry; ``start`` is its absolute file offset."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Shape: ...
    @property
    def start(self) -> int: ...
    @property
    def numel(self) -> int: ...


class Header(Protocol):
    """What planning reads of one validated weights file's header."""

    @property
    def path(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...
    @property
    def tensors(self) -> Mapping[str, TensorHeader]: ...
    def shapes(self) -> dict[str, Shape]: ...


# ---- rules ---------------------------------------------------------------------
@dataclass(frozen=True)
class Staleness:
    """s(tau): ``constant`` 1; ``sqrt`` 1/sqrt(1+tau); ``polynomial`` (tau+1)^-a;
    ``hinge`` 1 if tau <= b else 1/(a(tau-b)+1)."""

    kind: str = "sqrt"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "sqrt", "polynomial", "hinge"):
            raise ConfigError(f"unknown staleness function {self.kind!r}")
        if not (self.a > 0 and self.b >= 0):
            raise ConfigError(f"staleness needs a > 0 and b >= 0, got a={self.a}, b={self.b}")

    def __call__(self, tau: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "sqrt":
            return 1.0 / math.sqrt(1.0 + tau)
        if self.kind == "polynomial":
            return float((tau + 1.0) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


@dataclass(frozen=True)
class FedAvg:
    """Weighted mean of full weights; ``weighting`` "cases" (training cases) or "uniform"."""

    weighting: str = "cases"


@dataclass(frozen=True)
class FedBuff:
    """Buffered asynchronous: ``G + eta * sum(s(tau_i) w_i delta_i) / sum(w_i)``."""

    eta: float = 1.0
    staleness: Staleness = Staleness()
    max_staleness: int | None = None
    weighting: str = "cases"


@dataclass(frozen=True)
class FedAsync:
    """Mixing, update by update in site order: ``x = (1 - alpha s(tau)) x + alpha s(tau) x_i``.
    Case counts are not used."""

    alpha: float = 0.6
    staleness: Staleness = Staleness()
    max_staleness: int | None = None


Rule = Union[FedAvg, FedBuff, FedAsync, Median, TrimmedMean]  # the robust rules: fedfs.fl.robust


@dataclass(frozen=True)
class Update:
    """One site's uploaded full weights, already fetched and signature-checked.

    ``num_cases`` None means: read the file's ``num_cases`` metadata. ``base_path``
    is the global file at ``base_version`` (FedBuff with tau > 0 needs it).
    ``expected`` is the site's declared architecture, {key: shape}.
    """

    site: str
    path: str | os.PathLike[str]
    num_cases: float | None = None
    base_version: int | None = None
    base_path: str | os.PathLike[str] | None = None
    expected: Mapping[str, Sequence[int]] | None = None


@dataclass(frozen=True)
class Contribution:
    site: str
    path: str
    weight: float
    staleness: int
    scale: float


@dataclass(frozen=True)
class Rejection:
    site: str
    path: str
    reason: str


@dataclass(frozen=True)
class AggregateResult:
    path: str
    rule: str
    contributions: tuple[Contribution, ...]
    rejected: tuple[Rejection, ...]
    tensors: int
    params: int
    sharing: Mapping[str, SiteShare]


@dataclass(frozen=True)
class Extraction:
    path: str
    from_global: int
    from_fallback: int


@dataclass
class Accepted:
    """An update past its header-level checks, with what planning needs of it."""

    update: Update
    info: Header
    groups: dict[str, str]  # actual key -> output key
    weight: float
    tau: int
    scale: float
    base: int  # index of its base in the sources list (0: the global itself); 1 until numbered if it needs one


# ---- admission of inputs -------------------------------------------------------
def check_config(rule: Rule, global_path: object, version: int | None, align: str | None) -> None:
    """Raise ConfigError for a rule or option no aggregation can run with."""
    if not isinstance(rule, (FedAvg, FedBuff, FedAsync, Median, TrimmedMean)):
        raise ConfigError(f"unknown aggregation rule {rule!r}")
    if _weighting(rule) not in ("cases", "uniform"):
        raise ConfigError(f"weighting must be 'cases' or 'uniform', got {_weighting(rule)!r}")
    if align not in (None, "level", "name"):
        raise ConfigError(f"align must be None, 'level' or 'name', got {align!r}")
    if version is not None and (not isinstance(version, int) or version < 0):
        raise ConfigError(f"version must be a non-negative integer, got {version!r}")
    if isinstance(rule, (FedBuff, FedAsync)) and (global_path is None or version is None):
        raise ConfigError(f"{type(rule).__name__} needs the current global file and its version")
    if isinstance(rule, FedBuff) and not rule.eta > 0:
        raise ConfigError(f"FedBuff eta must be positive, got {rule.eta}")
    if isinstance(rule, FedAsync) and not 0 < rule.alpha <= 1:
        raise ConfigError(f"FedAsync alpha must be in (0, 1], got {rule.alpha}")


def _weight_of(u: Update, info: Header, weighting: str) -> float:
    if weighting == "uniform":
        return 1.0
    raw: object = u.num_cases if u.num_cases is not None else info.metadata.get("num_cases")
    try:
        w = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SchemaError(f"{u.path}: number of training cases missing or not a number: {raw!r}") from None
    if not (math.isfinite(w) and w > 0):
        raise SchemaError(f"{u.path}: number of training cases must be positive, got {raw!r}")
    return w


def _staleness(u: Update, rule: Rule, version: int | None) -> tuple[int, float]:
    if version is None:
        return 0, 1.0
    if u.base_version is None:
        raise ValidationError(f"{u.path}: update does not name its base version")
    tau = version - u.base_version
    if isinstance(rule, (FedAvg, Median, TrimmedMean)):  # synchronous rules: the current version only
        if tau != 0:
            raise ValidationError(f"{u.path}: update is for base version {u.base_version}, "
                                  f"the aggregation is at version {version}")
        return 0, 1.0
    if tau < 0:
        raise ValidationError(f"{u.path}: base version {u.base_version} is newer than the current {version}")
    if rule.max_staleness is not None and tau > rule.max_staleness:
        raise ValidationError(f"{u.path}: staleness {tau} exceeds max_staleness {rule.max_staleness}")
    return tau, rule.staleness(tau)


def _weighting(rule: Rule) -> str:
    return getattr(rule, "weighting", "uniform")  # FedAsync mixes without case weights


def accept(u: Update, info: Header, rule: Rule, version: int | None) -> Accepted:
    """Weight and staleness of one update, from its header; raises ValidationError with the reason.

    ``base`` is 1 when the rule needs the update's own base global (FedBuff, tau > 0);
    ``groups`` is left empty for :func:`output_groups`.
    """
    weight = _weight_of(u, info, _weighting(rule))
    tau, scale = _staleness(u, rule, version)
    return Accepted(u, info, {}, weight, tau, scale, int(isinstance(rule, FedBuff) and tau > 0))


def output_groups(shapes: Mapping[str, Shape], align: str | None) -> dict[str, str]:
    """Actual key -> output key: the key itself, or its aligned group (AsymFedAvg)."""
    return group_keys(shapes, align) if align else {k: k for k in shapes}


def reference_layout(candidates: Sequence[Accepted], expected: Mapping[str, Sequence[int]] | None,
                     glob: Header | None) -> dict[str, Shape]:
    """The layout every update of a same-architecture federation must have."""
    if expected is not None:
        return {k: tuple(v) for k, v in expected.items()}
    if glob is not None:
        return glob.shapes()
    layouts = [tuple(sorted(c.info.shapes().items())) for c in candidates]
    votes = Counter(layouts)
    best = max(votes.values())
    return dict(next(lay for lay in layouts if votes[lay] == best))  # ties: the first site's


def number_sources(accepted: Sequence[Accepted], bases: Mapping[int, Header]) -> tuple[dict[int, Header], int]:
    """Sources: 0 the global, then the base globals by version, then the updates by site.

    Sets each update's ``base`` to its base's source index; returns {index: base header}
    and the index of the first update.
    """
    versions = sorted({a.update.base_version for a in accepted if a.base})  # type: ignore[type-var]
    for a in accepted:
        a.base = 1 + versions.index(a.update.base_version) if a.base else 0  # type: ignore[arg-type]
    return {1 + i: bases[v] for i, v in enumerate(versions)}, 1 + len(versions)  # type: ignore[index]
