"""Aggregation plans: each output tensor as a linear combination of input tensors. Pure.

Every rule of :mod:`fedfs.fl.aggregate` is a *linear combination of files*: each output
tensor is ``sum_j c_j * x_j`` over tensors ``x_j`` of the inputs (site updates, the
current global, the globals updates started from). :func:`plan` turns the accepted
updates into float64 coefficients and a list of :class:`Out` tensors, each a sum of
:class:`Term` (a source index, a byte offset, a dtype, a coefficient), read from the
headers alone; :func:`fedfs.weights.combine.execute` streams it.

- FedBuff ``new = G + eta * sum(s_i w_i (x_i - B_i)) / sum(w_i)`` is planned as
  coefficients ``G: 1 - eta*S_G/W``, ``B: -eta*S_B/W``, ``x_i: eta*s_i*w_i/W``. With
  eta = 1, tau = 0 the coefficient of G is exactly 0 and those of x_i are exactly
  FedAvg's ``w_i/W``, so synchronous FedBuff gives FedAvg's bytes.
- Terms come in a fixed order (global, bases by version, updates by site), so the
  result does not depend on arrival order.
- Output tensors keep their dtype (mixed float inputs: F64 if any, else F32).
  Integer (I64) buffers are not averaged: the output is their elementwise maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .aggregate import (FLOAT_DTYPES, Accepted, AggregateResult, Contribution, FedAsync, FedBuff, Header, Rejection,
                        Rule, Shape)
from .align import SiteShare, group_keys
from ..errors import ValidationError

__all__ = ["Term", "Out", "coefficients", "plan", "sharing", "result_of", "extraction_plan"]


class Term(NamedTuple):
    """One input tensor of an output, read from source ``src`` at ``offset``, times ``coef``."""

    src: int
    offset: int  # absolute file offset of the tensor's first byte
    dtype: str
    coef: float


class Out(NamedTuple):
    """One output tensor and the terms it is combined from."""

    key: str
    dtype: str
    shape: Shape
    kind: str  # "lin": sum of coef * term; "max": elementwise maximum (integer buffers)
    terms: tuple[Term, ...]


# ---- planning ------------------------------------------------------------------
def _kind(dtype: str) -> str:
    return "float" if dtype in FLOAT_DTYPES else "int"


def _out_dtype(dtypes: Sequence[str]) -> str:
    if "F64" in dtypes:
        return "F64"
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


def coefficients(rule: Rule, members: Sequence[Accepted],
                 has_global: bool) -> tuple[float, dict[int, float], list[float]]:
    """(coefficient of the global, of each base source, of each member) for one output tensor."""
    bases: dict[int, float] = {}
    if isinstance(rule, FedAsync):
        mix = [rule.alpha * m.scale for m in members]
        if not has_global:
            mix[0] = 1.0  # a group new to the global starts from its first member
        coefs, keep = [], 1.0
        for a in reversed(mix):
            coefs.append(a * keep)
            keep *= 1.0 - a
        return (keep if has_global else 0.0), bases, coefs[::-1]
    total = 0.0
    for m in members:
        total += m.weight
    if not isinstance(rule, FedBuff) or not has_global:
        return 0.0, bases, [m.weight / total for m in members]
    for m in members:  # summed in site order, like total, so that S_G / W is exactly 1 when s = 1
        bases[m.base] = bases.get(m.base, 0.0) + m.scale * m.weight
    g = 1.0 - rule.eta * bases.pop(0, 0.0) / total
    return g, {b: -rule.eta * s / total for b, s in sorted(bases.items())}, \
        [rule.eta * m.scale * m.weight / total for m in members]


def plan(rule: Rule, glob: Header | None, base_infos: Mapping[int, Header], accepted: Sequence[Accepted],
         first_src: int) -> tuple[list[Out], list[Rejection]]:
    """Output tensors (sorted by key) as linear combinations; also updates whose dtype kind or shape conflicts."""
    members: dict[str, list[tuple[int, str]]] = {}
    for i, a in enumerate(accepted):
        for key, out in a.groups.items():
            members.setdefault(out, []).append((i, key))
    outs, conflicts = [], []
    cache: dict[tuple[tuple[int, ...], bool], tuple[float, dict[int, float], list[float]]] = {}
    for out_key in sorted(set(members) | set(glob.tensors if glob else ())):
        g = glob.tensors.get(out_key) if glob else None
        mem = members.get(out_key, [])
        tinfo = [accepted[i].info.tensors[key] for i, key in mem]
        ref, shape = (g.dtype, g.shape) if g else (tinfo[0].dtype, tinfo[0].shape)
        for (i, key), t in zip(mem, tinfo):
            if _kind(t.dtype) != _kind(ref) or t.shape != shape:
                u = accepted[i].update
                conflicts.append(Rejection(u.site, u.path, f"{u.path}: tensor {key!r} is {t.dtype}{list(t.shape)}, "
                                                           f"the aggregate holds {ref}{list(shape)}"))
        if _kind(ref) == "int":
            srcs = ([Term(0, g.start, g.dtype, 1.0)] if g else []) + \
                [Term(first_src + i, t.start, t.dtype, 1.0) for (i, _), t in zip(mem, tinfo)]
            outs.append(Out(out_key, "I64", shape, "max", tuple(srcs)))
            continue
        dtype = g.dtype if g else _out_dtype([t.dtype for t in tinfo])
        if not mem:
            outs.append(Out(out_key, dtype, shape, "lin", (Term(0, g.start, g.dtype, 1.0),)))
            continue
        who = (tuple(i for i, _ in mem), g is not None)  # same members, same coefficients: compute once
        if who not in cache:
            cache[who] = coefficients(rule, [accepted[i] for i in who[0]], g is not None)
        cg, cb, cx = cache[who]
        terms = [Term(0, g.start, g.dtype, cg)] if g and cg != 0.0 else []
        fallback = False
        for b, c in cb.items():
            bt = base_infos[b].tensors.get(out_key)
            if bt is None or bt.shape != shape or _kind(bt.dtype) != "float":
                bt, fallback = g, True
            terms.append(Term(b if bt is not g else 0, bt.start, bt.dtype, c))
        terms += [Term(first_src + i, t.start, t.dtype, c) for (i, _), t, c in zip(mem, tinfo, cx) if c != 0.0]
        outs.append(Out(out_key, dtype, shape, "lin", tuple(_merge_same(terms) if fallback else terms)))
    return outs, conflicts


def _merge_same(terms: list[Term]) -> list[Term]:
    """Sum coefficients of terms reading the same bytes (a base missing a group falls back to G)."""
    merged: dict[tuple[int, int], Term] = {}
    for t in terms:
        k = (t.src, t.offset)
        merged[k] = Term(t.src, t.offset, t.dtype, merged[k].coef + t.coef) if k in merged else t
    return [t for t in merged.values() if t.coef != 0.0]


# ---- results -------------------------------------------------------------------
def sharing(accepted: Sequence[Accepted]) -> dict[str, SiteShare]:
    """Per site: tensors and parameters, and how many are averaged with another site's."""
    sites: dict[str, set[str]] = {}
    for a in accepted:
        for out in a.groups.values():
            sites.setdefault(out, set()).add(a.update.site)
    report: dict[str, SiteShare] = {}
    done: dict[tuple[str, ...], tuple[int, int, int, int]] = {}  # one architecture: counted once
    for a in accepted:
        if a.update.site in report:
            continue
        layout = tuple(a.groups.values())
        if layout not in done:
            sizes = {k: t.numel for k, t in a.info.tensors.items()}
            shared = [k for k, out in a.groups.items() if len(sites[out]) > 1]
            done[layout] = (len(sizes), sum(sizes.values()), len(shared), sum(sizes[k] for k in shared))
        report[a.update.site] = SiteShare(a.update.site, *done[layout])
    return report


def result_of(out_path: str, rule: Rule, accepted: Sequence[Accepted], rejected: Sequence[Rejection],
              outs: Sequence[Out]) -> AggregateResult:
    """What an aggregation that wrote ``outs`` from ``accepted`` reports."""
    return AggregateResult(
        out_path, type(rule).__name__,
        tuple(Contribution(a.update.site, a.info.path, a.weight, a.tau, a.scale) for a in accepted),
        tuple(rejected), len(outs), sum(math.prod(o.shape) for o in outs), sharing(accepted))


def extraction_plan(union: Header, fallback: Header | None, shapes: Mapping[str, Sequence[int]],
                    align: str) -> tuple[list[Out], int]:
    """One site's tensors under its own keys (source 0: the union file, 1: ``fallback``), and
    how many come from the union; raises ValidationError for a group of the wrong shape or none."""
    groups = group_keys({k: tuple(v) for k, v in shapes.items()}, align)
    outs, n_global = [], 0
    for key in sorted(groups):
        t, src = union.tensors.get(groups[key]), 0
        if t is not None and t.shape != tuple(shapes[key]):
            raise ValidationError(f"{union.path}: group {groups[key]} has shape {list(t.shape)}")
        if t is None and fallback is not None:
            t, src = fallback.tensors[key], 1
        if t is None:
            raise ValidationError(f"{union.path}: no tensor for {key!r} (group {groups[key]}) and no fallback")
        n_global += src == 0
        outs.append(Out(key, t.dtype, t.shape, "lin" if t.dtype in FLOAT_DTYPES else "max",
                        (Term(src, t.start, t.dtype, 1.0),)))
    return outs, n_global
