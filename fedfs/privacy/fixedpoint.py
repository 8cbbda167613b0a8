"""Fixed-point encoding of weighted model updates into modular integers, and back. Pure.

Secure aggregation sums integers modulo 2**bits, so a float update is encoded first. A site
encodes ``(w / W) * (x - g)``: its update's difference from the global it trained from,
scaled by its weight ``w`` over the round's expected total weight ``W``. The sum over the
sites is then the weighted mean difference, bounded by ``max_abs`` whatever N is, so 32-bit
words suffice (bytes on the wire equal a float32 update's) and the fixed-point step is
``2**-frac_bits`` with ``frac_bits = bits - 2 - ceil(log2(max_abs))``. Two's complement
carries the sign: a negative sum wraps to the top of the range and decodes back.

The weights themselves are summed exactly, as integers, in a 64-bit scalar
(:data:`WEIGHT_TENSOR`), so the aggregator divides by the survivors' true total weight
(dropouts change it) without learning any one site's weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ValidationError

__all__ = ["FixedPoint", "WEIGHT_TENSOR", "encode_update", "decode_mean", "plain_weighted_mean"]

#: The masked scalar that carries a site's integer weight (case count) into the sum.
WEIGHT_TENSOR = "__secagg_weight__"


@dataclass(frozen=True)
class FixedPoint:
    """Encoding parameters every party of a session shares: word size and value bound."""

    bits: int = 32
    max_abs: float = 4.0  # bound on |x - g| per coordinate (and so on the weighted mean)

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError(f"fixed-point words are 32 or 64 bits, got {self.bits}")
        if not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise ValueError(f"max_abs must be a positive number, got {self.max_abs}")

    @property
    def frac_bits(self) -> int:
        return self.bits - 2 - max(0, math.ceil(math.log2(self.max_abs)))

    @property
    def step(self) -> float:
        """The fixed-point resolution: one unit of the encoded integers."""
        return 2.0 ** -self.frac_bits

    @property
    def dtype(self) -> type:
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def signed(self) -> type:
        return np.int32 if self.bits == 32 else np.int64


def encode_update(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], weight: int,
                  weight_total: int, fp: FixedPoint) -> dict[str, np.ndarray]:
    """A site's secure-aggregation input: ``round((w/W)(x - g) / step)`` per tensor as unsigned
    words, plus its weight in :data:`WEIGHT_TENSOR`. ValidationError when a coordinate moved
    more than ``max_abs`` (it would wrap), or the weight exceeds the round's total."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValidationError(f"a secure-aggregation weight is a positive integer (a case count), got {weight!r}")
    if weight > weight_total:
        raise ValidationError(f"weight {weight} exceeds the round's total weight {weight_total}: the sum could wrap")
    if set(update) != set(base):
        raise ValidationError(f"update and base name different tensors: {sorted(set(update) ^ set(base))[:5]}")
    scale = (weight / weight_total) / fp.step
    out: dict[str, np.ndarray] = {}
    for name in sorted(update):
        if name == WEIGHT_TENSOR:
            raise ValidationError(f"tensor name {WEIGHT_TENSOR!r} is reserved")
        x, g = np.asarray(update[name]), np.asarray(base[name])
        if x.shape != g.shape:
            raise ValidationError(f"tensor {name!r}: update shape {x.shape} differs from the global's {g.shape}")
        delta = x.astype(np.float64) - g.astype(np.float64)
        worst = float(np.max(np.abs(delta))) if delta.size else 0.0
        if not math.isfinite(worst) or worst > fp.max_abs:
            raise ValidationError(f"tensor {name!r} moved {worst:g} from the global, over the secure-aggregation "
                                  f"bound {fp.max_abs:g} (raise max_abs, or clip the update)")
        out[name] = np.ascontiguousarray(np.rint(delta * scale).astype(fp.signed).view(fp.dtype))
    out[WEIGHT_TENSOR] = np.asarray([weight], np.uint64)
    return out


def decode_mean(total: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], weight_total: int,
                fp: FixedPoint) -> tuple[dict[str, np.ndarray], int]:
    """The weighted mean of the survivors' updates from the unmasked sum, and their total
    weight: ``g + sum * step * W / sum(w)``, in float32 (as the updates were)."""
    w_sum = int(np.asarray(total[WEIGHT_TENSOR]).reshape(-1)[0])
    if not 0 < w_sum <= weight_total:
        raise ValidationError(f"the summed weight {w_sum} is not in 1..{weight_total}: wrong unmasking")
    factor = fp.step * weight_total / w_sum
    out = {}
    for name, g in base.items():
        g = np.asarray(g)
        # in the global's own float type (float32): its rounding is 2**-24 of the difference, far
        # below the fixed-point step's share of the result, and it costs a third of float64's passes
        work = g.dtype if g.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        s = np.asarray(total[name]).view(fp.signed).astype(work)
        s *= work.type(factor)
        s += g
        out[name] = s if work == g.dtype else np.rint(s).astype(g.dtype)  # integer buffers stay integers
    return out, w_sum


def plain_weighted_mean(updates: Mapping[str, Mapping[str, np.ndarray]],
                        weights: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Plain weighted FedAvg in float64 (the reference secure aggregation is measured against)."""
    sites = sorted(updates)
    total = sum(weights[s] for s in sites)
    names = sorted(updates[sites[0]])
    return {n: sum(np.asarray(updates[s][n], np.float64) * weights[s] for s in sites) / total for n in names}
