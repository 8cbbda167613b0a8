"""Aggregation rules over safetensors files on local disk: pure planning, streaming execution.

Every rule here is a *linear combination of files*: each output tensor is
``sum_j c_j * x_j`` over tensors ``x_j`` of the inputs (site updates, the current
global, the globals updates started from). Planning turns a rule into float64
coefficients (pure math, no tensor data); execution streams the combination one
chunk of one tensor at a time, so memory is a few MiB whatever N is.

Design decisions:

- Sites upload **full weights**, in the same format for synchronous and
  asynchronous rounds. FedBuff's ``delta_i = x_i - base_i`` is formed here, from
  the base global file the update started from (``Update.base_path``). The
  aggregator therefore keeps the globals still within ``max_staleness``.
- FedBuff ``new = G + eta * sum(s_i w_i (x_i - B_i)) / sum(w_i)`` is planned as
  coefficients ``G: 1 - eta*S_G/W``, ``B: -eta*S_B/W``, ``x_i: eta*s_i*w_i/W``. With
  eta = 1, tau = 0 the coefficient of G is exactly 0 and those of x_i are exactly
  FedAvg's ``w_i/W``, so synchronous FedBuff gives FedAvg's bytes.
- Accumulation is float32 (float64 when an input is F64), in a fixed order
  (global, bases by version, updates by site), so results are deterministic and
  byte-identical for any arrival order (on one machine and software stack).
  float32 costs at most a few ulp of the largest term, below what storing the
  result in float32 costs anyway; float64 would double the accumulator traffic.
  Output tensors keep their dtype (mixed float inputs: F64 if any, else F32).
- Integer (I64) buffers are not averaged: the output is their elementwise maximum.
- Finiteness is checked on each output chunk (a NaN or Inf in any input makes the
  combination non-finite); then the offending inputs are found, rejected with
  their reason, and the aggregation is re-run without them. Nothing from a
  rejected update reaches the output. :func:`fedfs.weights.tensors.validate_update` checks
  a file up front instead, at the cost of one more read.
- Output: safetensors written by this module, header first (shapes and dtypes are
  known from the plan), then tensors in sorted key order, metadata as given.
- Speed: each input chunk (2 MiB) is read with ``os.preadv`` into one reused
  buffer (no mmap: touched mapped pages would count in RSS) and added while still
  in cache, ``acc.add_(x, alpha=c)``, one fused pass. Two worker threads take
  chunks in turn (file I/O and torch release the GIL), torch's intra-op threads
  set to 1 meanwhile; the output is preallocated (``posix_fallocate``). Chunking
  depends only on the inputs, so any thread or re-run computes the same bytes.
  The garbage collector is paused during a call (planning allocates many small
  objects, and a full collection with torch imported costs more than planning).

AsymFedAvg (``align="level"`` or ``"name"``): outputs are *groups* (aligned key +
shape, see :mod:`fedfs.fl.align`) averaged over the sites that have them; the result
is a union file, and :func:`extract_site` gives each site its own keys back.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from .align import SiteShare, group_keys
from ..errors import ConfigError, SchemaError, ValidationError
from ..weights.tensors import (ALLOWED_DTYPES, FLOAT_DTYPES, MAX_HEADER, Shape, WeightsInfo, all_finite, check_finite,
                      check_shapes, inspect_weights, read_at, safetensors_header, torch_single_thread)

__all__ = [
    "Staleness", "FedAvg", "FedBuff", "FedAsync", "Update", "Contribution", "Rejection",
    "AggregateResult", "Extraction", "aggregate", "aggregate_asym", "extract_site",
]


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


Rule = Union[FedAvg, FedBuff, FedAsync]


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


@dataclass
class _Accepted:
    update: Update
    info: WeightsInfo
    groups: dict[str, str]  # actual key -> output key
    weight: float
    tau: int
    scale: float
    base: int  # index of its base in the sources list (0: the global itself)


# ---- validation of inputs ------------------------------------------------------
def _weight_of(u: Update, info: WeightsInfo, weighting: str) -> float:
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
    if isinstance(rule, FedAvg):
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


def _kind(dtype: str) -> str:
    return "float" if dtype in FLOAT_DTYPES else "int"


def _out_dtype(dtypes: Sequence[str]) -> str:
    if "F64" in dtypes:
        return "F64"
    return dtypes[0] if len(set(dtypes)) == 1 else "F32"


# ---- planning (pure) -----------------------------------------------------------
def _coefficients(rule: Rule, members: list[_Accepted],
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


def _plan(rule: Rule, glob: WeightsInfo | None, base_infos: Mapping[int, WeightsInfo], accepted: list[_Accepted],
          first_src: int) -> tuple[list[Out], list[Rejection]]:
    """Output tensors as linear combinations; also updates whose dtype kind or shape conflicts."""
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
            cache[who] = _coefficients(rule, [accepted[i] for i in who[0]], g is not None)
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


# ---- streaming execution -------------------------------------------------------
CHUNK_ELEMS = 1 << 19  # elements per read and write: 2 MiB of float32 (smaller calls cost more per byte)
_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Term(NamedTuple):
    src: int
    offset: int  # absolute file offset of the tensor's first byte
    dtype: str
    coef: float


class Out(NamedTuple):
    key: str
    dtype: str
    shape: Shape
    kind: str  # "lin": sum of coef * term; "max": elementwise maximum (integer buffers)
    terms: tuple[Term, ...]


class _Segment(NamedTuple):
    keys: tuple[str, ...]
    dtype: str
    kind: str
    terms: tuple[Term, ...]  # offsets of the segment's first element
    nel: int
    out_offset: int


class NonFinite(Exception):
    def __init__(self, segment: _Segment) -> None:
        super().__init__(f"non-finite values in {segment.keys[0]!r}")
        self.segment = segment


class SourceFailed(Exception):
    def __init__(self, src: int, error: Exception) -> None:
        super().__init__(str(error))
        self.src, self.error = src, error


def _segments(outs: Sequence[Out], data_start: int, offsets: Sequence[int]) -> list[_Segment]:
    """Merge consecutive outputs that read contiguous bytes with equal coefficients into one run."""
    segs: list[_Segment] = []
    sig: tuple[object, ...] = ()
    for out, off in zip(outs, offsets):
        nel = math.prod(out.shape)
        here = (out.kind, out.dtype) + tuple((t.src, t.dtype, t.coef) for t in out.terms)
        if segs and here == sig:
            s = segs[-1]
            if all(b.offset == a.offset + s.nel * ALLOWED_DTYPES[a.dtype][0] for a, b in zip(s.terms, out.terms)):
                segs[-1] = s._replace(keys=s.keys + (out.key,), nel=s.nel + nel)
                continue
        segs.append(_Segment((out.key,), out.dtype, out.kind, out.terms, nel, data_start + off))
        sig = here
    return [s for s in segs if s.nel]


class _Worker:
    """One thread's file handles and buffers (input, accumulator, converted output), reused per chunk."""

    def __init__(self, sources: Sequence[str], out_path: str, item: int) -> None:
        self.paths, self.files = sources, []
        for i, p in enumerate(sources):
            try:
                self.files.append(open(p, "rb", buffering=0))
            except OSError as exc:
                self.close()
                raise SourceFailed(i, ValidationError(f"{p}: cannot read: {exc}")) from exc
        self.out = open(out_path, "r+b", buffering=0)
        acc_item = 8 if item == 8 else 4
        self.bufs = [torch.empty(CHUNK_ELEMS * item, dtype=torch.uint8),
                     torch.empty(CHUNK_ELEMS * acc_item, dtype=torch.uint8),
                     torch.empty(CHUNK_ELEMS * 2, dtype=torch.uint8)]
        self.rview, self.aview, self.oview = (memoryview(b.numpy()) for b in self.bufs)
        self.r, self.a = ({n: b.view(t) for n, (i, t) in ALLOWED_DTYPES.items() if i <= len(b) // CHUNK_ELEMS}
                          for b in self.bufs[:2])
        self.o = {n: self.bufs[2].view(ALLOWED_DTYPES[n][1]) for n in ("F16", "BF16")}

    def close(self) -> None:
        for f in self.files + ([self.out] if hasattr(self, "out") else []):
            f.close()

    def run(self, seg: _Segment, start: int, n: int) -> None:
        acc_name = "I64" if seg.kind == "max" else ("F64" if seg.dtype == "F64" else "F32")
        acc = self.a[acc_name][:n]
        for j, term in enumerate(seg.terms):
            item = ALLOWED_DTYPES[term.dtype][0]
            try:
                read_at(self.files[term.src], self.rview[:n * item], term.offset + start * item, self.paths[term.src])
            except (OSError, ValidationError) as exc:
                raise SourceFailed(term.src, exc) from exc
            x = self.r[term.dtype][:n]
            if seg.kind == "max":
                torch.maximum(acc, x, out=acc) if j else acc.copy_(x)
            elif j == 0 and term.dtype == acc_name:
                torch.mul(x, term.coef, out=acc)
            elif j == 0:
                acc.copy_(x).mul_(term.coef)
            else:
                acc.add_(x, alpha=term.coef)  # one fused pass; x and acc are still in cache
        view, result = self.aview, acc
        if seg.dtype != acc_name:
            view, result = self.oview, self.o[seg.dtype][:n]
            result.copy_(acc)
        if seg.kind == "lin" and not all_finite(result):
            raise NonFinite(seg)
        item = ALLOWED_DTYPES[seg.dtype][0]
        data, pos = view[:n * item], seg.out_offset + start * item
        while data:
            if _PWRITE:
                done = os.pwrite(self.out.fileno(), data, pos)
            else:
                self.out.seek(pos)
                done = self.out.write(data) or 0
            data, pos = data[done:], pos + done


_PWRITE = hasattr(os, "pwrite")


def execute(outs: Sequence[Out], sources: Sequence[str], out_path: str, metadata: Mapping[str, str] | None,
            threads: int | None = None) -> None:
    """Write ``outs`` (sorted by key) to ``out_path`` as safetensors, streaming chunk by chunk.

    Raises NonFinite or SourceFailed (internal) for the caller to attribute; on any
    error the partial output is removed.
    """
    header, offsets = safetensors_header([(o.key, o.dtype, o.shape) for o in outs], metadata)
    size = len(header) + (offsets[-1] + math.prod(outs[-1].shape) * ALLOWED_DTYPES[outs[-1].dtype][0] if outs else 0)
    segs = _segments(outs, len(header), offsets)
    item = max((ALLOWED_DTYPES[t.dtype][0] for s in segs for t in s.terms), default=4)
    units = [(s, i, min(CHUNK_ELEMS, s.nel - i)) for s in segs for i in range(0, s.nel, CHUNK_ELEMS)]
    ok = False
    try:
        with open(out_path, "wb") as f:
            f.write(header)
            f.truncate(size)
            if hasattr(os, "posix_fallocate"):
                with contextlib.suppress(OSError):  # blocks allocated at once: cheaper writes
                    os.posix_fallocate(f.fileno(), 0, size)
        counter, errors, stop = itertools.count(), [], threading.Event()

        def loop() -> None:
            try:
                worker = _Worker(sources, out_path, item)
                try:
                    while not stop.is_set():
                        k = next(counter)
                        if k >= len(units):
                            return
                        worker.run(*units[k])
                finally:
                    worker.close()
            except BaseException as exc:  # handed to the calling thread
                errors.append(exc)
                stop.set()

        n_threads = max(1, min(threads or _THREADS, len(units)))
        with torch_single_thread():
            pool = [threading.Thread(target=loop, daemon=True) for _ in range(n_threads - 1)]
            for t in pool:
                t.start()
            loop()
            for t in pool:
                t.join()
        if errors:
            raise min(errors, key=lambda e: isinstance(e, (NonFinite, SourceFailed)))
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(out_path)


# ---- entry points --------------------------------------------------------------
def _check_config(rule: Rule, global_path: object, version: int | None, align: str | None) -> None:
    if not isinstance(rule, (FedAvg, FedBuff, FedAsync)):
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


def _reference(candidates: list[_Accepted], expected: Mapping[str, Sequence[int]] | None,
               glob: WeightsInfo | None) -> dict[str, Shape]:
    """The layout every update of a same-architecture federation must have."""
    if expected is not None:
        return {k: tuple(v) for k, v in expected.items()}
    if glob is not None:
        return glob.shapes()
    layouts = [tuple(sorted(c.info.shapes().items())) for c in candidates]
    votes = Counter(layouts)
    best = max(votes.values())
    return dict(next(lay for lay in layouts if votes[lay] == best))  # ties: the first site's


def _sharing(accepted: list[_Accepted]) -> dict[str, SiteShare]:
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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Planning creates thousands of small objects; with torch imported, each full
    collection walks ~10^5 objects and would cost more than the planning itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def aggregate(updates: Sequence[Update], out_path: str | os.PathLike[str], *, rule: Rule = FedAvg(),
              global_path: str | os.PathLike[str] | None = None, version: int | None = None,
              align: str | None = None, expected: Mapping[str, Sequence[int]] | None = None,
              metadata: Mapping[str, str] | None = None, max_header: int = MAX_HEADER,
              threads: int | None = None) -> AggregateResult:
    """Combine ``updates`` by ``rule`` into the safetensors file ``out_path``.

    ``version`` is the current global version: staleness is ``version - base_version``
    (and FedAvg then rejects updates for another base). ``align`` None: one
    architecture, output keys are the sites' keys (checked against ``expected``, else
    the global's, else the most common layout). ``align`` "level"/"name": AsymFedAvg,
    output keys are groups (a union file, see :func:`extract_site`).

    A bad update (or one whose base global is unusable) is rejected with its reason
    and the rest go on; a bad global raises ValidationError, as does having no
    acceptable update (``exc.rejected`` lists the reasons).
    """
    _check_config(rule, global_path, version, align)
    with _gc_paused():
        return _aggregate(updates, os.fspath(out_path), rule, global_path, version, align, expected, metadata,
                          max_header, threads)


def _aggregate(updates: Sequence[Update], out_path: str, rule: Rule, global_path: str | os.PathLike[str] | None,
               version: int | None, align: str | None, expected: Mapping[str, Sequence[int]] | None,
               metadata: Mapping[str, str] | None, max_header: int, threads: int | None) -> AggregateResult:
    glob = inspect_weights(global_path, max_header=max_header) if global_path is not None else None
    ordered = sorted(updates, key=lambda u: (u.site, -1 if u.base_version is None else u.base_version,
                                             os.fspath(u.path)))
    rejected: list[Rejection] = []
    bases: dict[int, WeightsInfo] = {}
    accepted: list[_Accepted] = []
    for u in ordered:
        u = Update(u.site, os.fspath(u.path), u.num_cases, u.base_version,
                   None if u.base_path is None else os.fspath(u.base_path), u.expected)
        try:
            accepted.append(_admit(u, rule, version, align, glob, bases, max_header))
        except ValidationError as exc:
            rejected.append(Rejection(u.site, str(u.path), str(exc)))
    if align is None and accepted:
        ref = _reference(accepted, expected, glob)
        for a in list(accepted):
            try:
                check_shapes(a.update.path, a.info.shapes(), ref)  # type: ignore[arg-type]
            except SchemaError as exc:
                rejected.append(Rejection(a.update.site, a.info.path, str(exc)))
                accepted.remove(a)
    # sources: 0 the global, then the base globals by version, then the updates by site
    versions = sorted({a.update.base_version for a in accepted if a.base})  # type: ignore[type-var]
    base_infos = {1 + i: bases[v] for i, v in enumerate(versions)}
    for a in accepted:
        a.base = 1 + versions.index(a.update.base_version) if a.base else 0  # type: ignore[arg-type]
    first_src = 1 + len(versions)
    while True:
        if not accepted:
            reasons = "; ".join(r.reason for r in rejected) or "no updates given"
            exc = ValidationError(f"no acceptable update to aggregate: {reasons}")
            exc.rejected = tuple(rejected)  # type: ignore[attr-defined]
            raise exc
        outs, conflicts = _plan(rule, glob, base_infos, accepted, first_src)
        index = {(a.update.site, a.info.path): i for i, a in reversed(list(enumerate(accepted)))}
        bad = {index[r.site, r.path]: r.reason for r in conflicts[::-1]}
        if not bad:
            infos = [glob] + [base_infos[s] for s in sorted(base_infos)] + [a.info for a in accepted]
            sources = [i.path if i else os.devnull for i in infos]
            try:
                execute(outs, sources, out_path, metadata, threads)
                break
            except SourceFailed as exc:
                if exc.src < first_src:
                    raise ValidationError(str(exc.error)) from exc.error
                bad[exc.src - first_src] = str(exc.error)
            except NonFinite as exc:
                bad.update(_nonfinite_culprits(exc.segment, infos, first_src))
        for i in sorted(bad):
            rejected.append(Rejection(accepted[i].update.site, accepted[i].info.path, bad[i]))
        accepted = [a for i, a in enumerate(accepted) if i not in bad]
    return AggregateResult(
        out_path, type(rule).__name__,
        tuple(Contribution(a.update.site, a.info.path, a.weight, a.tau, a.scale) for a in accepted),
        tuple(rejected), len(outs), sum(math.prod(o.shape) for o in outs), _sharing(accepted))


def _admit(u: Update, rule: Rule, version: int | None, align: str | None, glob: WeightsInfo | None,
           bases: dict[int, WeightsInfo], max_header: int) -> _Accepted:
    """Header-level checks of one update (and its base); raises ValidationError with the reason."""
    info = inspect_weights(u.path, expected=u.expected, max_header=max_header)
    weight = _weight_of(u, info, _weighting(rule))
    tau, scale = _staleness(u, rule, version)
    needs_base = isinstance(rule, FedBuff) and tau > 0
    if needs_base and u.base_version not in bases:
        if u.base_path is None:
            raise ValidationError(f"{u.path}: base global version {u.base_version} is not available")
        base = inspect_weights(u.base_path, max_header=max_header)
        if align is None:
            check_shapes(base.path, base.shapes(), glob.shapes())  # type: ignore[union-attr]
        bases[u.base_version] = base  # type: ignore[index]
    groups = group_keys(info.shapes(), align) if align else {k: k for k in info.tensors}
    return _Accepted(u, info, groups, weight, tau, scale, int(needs_base))


def _nonfinite_culprits(seg: _Segment, infos: Sequence[WeightsInfo | None], first_src: int) -> dict[int, str]:
    """Which inputs of a non-finite output chunk hold NaN/Inf; a bad global or base raises."""
    found: dict[int, str] = {}
    for src in sorted({t.src for t in seg.terms}):
        try:
            check_finite(infos[src])  # type: ignore[arg-type]
        except ValidationError as exc:
            if src < first_src:
                raise
            found[src - first_src] = str(exc)
    if not found:
        raise ValidationError(f"the aggregate of tensor {seg.keys[0]!r} overflows {seg.dtype}")
    return found


@dataclass(frozen=True)
class Extraction:
    path: str
    from_global: int
    from_fallback: int


def extract_site(union_path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]],
                 out_path: str | os.PathLike[str], *, align: str = "level",
                 fallback_path: str | os.PathLike[str] | None = None, metadata: Mapping[str, str] | None = None,
                 max_header: int = MAX_HEADER) -> Extraction:
    """One site's weights under its own keys: from the union file where its group exists,
    else from ``fallback_path`` (its own weights), byte for byte."""
    union = inspect_weights(union_path, max_header=max_header)
    fallback = inspect_weights(fallback_path, expected=shapes, max_header=max_header) if fallback_path else None
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
    try:
        execute(outs, [union.path, fallback.path if fallback else os.devnull], os.fspath(out_path), metadata)
    except NonFinite as exc:
        raise ValidationError(f"{union.path}: tensor {exc.segment.keys[0]!r} holds non-finite values") from None
    except SourceFailed as exc:
        raise ValidationError(str(exc)) from exc.error
    return Extraction(os.fspath(out_path), n_global, len(outs) - n_global)


def aggregate_asym(updates: Sequence[Update], union_path: str | os.PathLike[str],
                   site_paths: Mapping[str, str | os.PathLike[str]], *, rule: Rule = FedAvg(),
                   align: str = "level", global_path: str | os.PathLike[str] | None = None,
                   version: int | None = None, metadata: Mapping[str, str] | None = None,
                   max_header: int = MAX_HEADER) -> tuple[AggregateResult, dict[str, Extraction]]:
    """AsymFedAvg: the union file, then one file per contributing site listed in ``site_paths``
    (averaged tensors where its groups are shared, its own weights for the rest)."""
    result = aggregate(updates, union_path, rule=rule, global_path=global_path, version=version, align=align,
                       metadata=metadata, max_header=max_header)
    own = {c.site: c.path for c in result.contributions}
    files = {}
    for site in sorted(own):
        if site in site_paths:
            shapes = inspect_weights(own[site], max_header=max_header).shapes()
            files[site] = extract_site(union_path, shapes, site_paths[site], align=align, fallback_path=own[site],
                                       metadata={**(metadata or {}), "site": site}, max_header=max_header)
    return result, files
