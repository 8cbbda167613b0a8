"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1). Pure.

A secure-aggregation site splits two secrets per session (its self-mask seed and its
pairwise-mask private key) among its neighbours: any ``t`` shares give the secret back,
fewer say nothing about it. The share of the party with x-coordinate ``x`` is the value
at ``x`` of a random polynomial of degree ``t - 1`` whose constant term is the secret.

The coefficients are drawn from a seed (:func:`split` is deterministic given it), so a site
that persisted its seed republishes the very same shares after a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from ..errors import ValidationError

__all__ = ["PRIME", "SHARE_BYTES", "split", "reconstruct", "reconstruct_robust", "share_to_hex", "share_from_hex"]

#: The Mersenne prime 2**521 - 1: every 256-bit secret is an element of the field.
PRIME = (1 << 521) - 1
#: Bytes of one share value on the wire (521 bits, rounded up).
SHARE_BYTES = 66
SECRET_BYTES = 32


def _coefficient(seed: bytes, index: int) -> int:
    """The ``index``-th random coefficient from ``seed``: 80 bytes of SHA-512 counters, reduced
    mod PRIME (the bias is below 2**-119)."""
    raw = b"".join(hashlib.sha512(b"fedfs-shamir\x00" + seed + index.to_bytes(4, "big") + bytes([k])).digest()
                   for k in range(2))[:80]
    return int.from_bytes(raw, "big") % PRIME


def split(secret: bytes, xs: Iterable[int], t: int, seed: bytes) -> dict[int, int]:
    """Shares of ``secret`` (32 bytes) at the x-coordinates ``xs`` (distinct, 1..2**32-1), any
    ``t`` of which reconstruct it; the polynomial comes from ``seed`` (keep it secret)."""
    xs = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 32 for x in xs):
        raise ValueError(f"x-coordinates must be distinct integers in 1..2**32-1, got {xs}")
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} must be between 1 and the number of shares {len(xs)}")
    coeffs = [int.from_bytes(secret, "big")] + [_coefficient(seed, k) for k in range(1, t)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], t: int) -> bytes:
    """The secret from at least ``t`` shares ({x: y}); ValidationError with fewer, or when the
    shares do not lie on one polynomial of degree < t (a share was altered)."""
    if len(shares) < t:
        raise ValidationError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold {t}")
    points = sorted(shares.items())
    secret = _interpolate(points[:t], 0)
    for x, y in points[t:]:  # extra shares must agree: a cheap integrity check
        if _interpolate(points[:t], x) != y % PRIME:
            raise ValidationError(f"share at x={x} does not lie on the polynomial of the others (altered share)")
    if secret >> (8 * SECRET_BYTES):
        raise ValidationError("the reconstructed value is not a 32-byte secret (altered shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def reconstruct_robust(shares: Mapping[int, int], t: int) -> tuple[bytes, list[int]]:
    """As :func:`reconstruct`, but when the shares disagree, leave out the one share (then any
    one pair of shares, with enough to spare) whose removal makes the rest agree: a single
    altered share cannot block the reconstruction. Returns (secret, the x of the shares left out)."""
    try:
        return reconstruct(shares, t), []
    except ValidationError:
        if len(shares) < t + 2:
            raise
    xs = sorted(shares)
    for drop in [[x] for x in xs] + ([[a, b] for i, a in enumerate(xs) for b in xs[i + 1:]]
                                     if len(xs) >= t + 3 else []):
        rest = {x: y for x, y in shares.items() if x not in drop}
        try:
            return reconstruct(rest, t), drop
        except ValidationError:
            continue
    raise ValidationError(f"{len(shares)} shares do not agree on one secret, even with one or two left out")


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation of ``points`` evaluated at ``at``, mod PRIME."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def share_to_hex(y: int) -> str:
    return y.to_bytes(SHARE_BYTES, "big").hex()


def share_from_hex(text: object, where: str) -> int:
    """A share value from its hex form; ValidationError naming ``where`` if it is not one."""
    if not isinstance(text, str) or len(text) != 2 * SHARE_BYTES:
        raise ValidationError(f"{where}: a share is {2 * SHARE_BYTES} hex digits")
    try:
        y = int(text, 16)
    except ValueError:
        raise ValidationError(f"{where}: a share must be hex digits") from None
    if y >= PRIME:
        raise ValidationError(f"{where}: share value is not a field element")
    return y
