"""Aggregation over safetensors files on local disk: the entry points, and the engine that
streams a plan of :mod:`fedfs.fl.combination` one chunk of one tensor at a time.

The rules and the planning (which tensors, which coefficients) are pure and live in
:mod:`fedfs.fl.aggregate` and :mod:`fedfs.fl.combination`; this module reads the
headers, admits or rejects each update, runs the plan and reports. Memory is a few
MiB whatever N is.

Design decisions:

- Accumulation is float32 (float64 when an input is F64), in the plan's fixed order
  (global, bases by version, updates by site), so results are deterministic and
  byte-identical for any arrival order (on one machine and software stack).
  float32 costs at most a few ulp of the largest term, below what storing the
  result in float32 costs anyway; float64 would double the accumulator traffic.
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
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from ..errors import SchemaError, ValidationError
from ..fl.aggregate import (Accepted, AggregateResult, Extraction, FedAvg, Rejection, Rule, Update, accept,
                            check_config, number_sources, output_groups, reference_layout)
from ..fl.combination import Out, Term, extraction_plan, plan, result_of
from ..fl.robust import Median, TrimmedMean, is_robust_kind, reduce_rows, robust_outs
from .header import ALLOWED_DTYPES, MAX_HEADER, WeightsInfo, check_shapes, inspect_weights, read_at, \
    safetensors_header
from .tensors import TORCH_DTYPES, all_finite, check_finite, torch_single_thread

__all__ = ["aggregate", "aggregate_asym", "extract_site", "execute", "NonFinite", "SourceFailed", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 19  # elements per read and write: 2 MiB of float32 (smaller calls cost more per byte)
_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_PWRITE = hasattr(os, "pwrite")


# ---- streaming execution -------------------------------------------------------
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
            if all(b.offset == a.offset + s.nel * ALLOWED_DTYPES[a.dtype] for a, b in zip(s.terms, out.terms)):
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
        self.r, self.a = ({n: b.view(t) for n, t in TORCH_DTYPES.items() if ALLOWED_DTYPES[n] <= len(b) // CHUNK_ELEMS}
                          for b in self.bufs[:2])
        self.o = {n: self.bufs[2].view(TORCH_DTYPES[n]) for n in ("F16", "BF16")}
        self.stack: torch.Tensor | None = None  # robust rules: inputs x block, one chunk in all (made when needed)

    def close(self) -> None:
        for f in self.files + ([self.out] if hasattr(self, "out") else []):
            f.close()

    def run(self, seg: _Segment, start: int, n: int) -> None:
        acc_name = "I64" if seg.kind == "max" else ("F64" if seg.dtype == "F64" else "F32")
        acc = self.a[acc_name][:n]
        robust = is_robust_kind(seg.kind)
        if robust:  # coordinate-wise median or trimmed mean (fedfs.fl.robust), not a linear combination
            self._reduce(seg, start, n, acc)
        for j, term in enumerate(() if robust else seg.terms):
            item = ALLOWED_DTYPES[term.dtype]
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
        if seg.kind != "max" and not all_finite(result):
            raise NonFinite(seg)
        item = ALLOWED_DTYPES[seg.dtype]
        data, pos = view[:n * item], seg.out_offset + start * item
        while data:
            if _PWRITE:
                done = os.pwrite(self.out.fileno(), data, pos)
            else:
                self.out.seek(pos)
                done = self.out.write(data) or 0
            data, pos = data[done:], pos + done

    def _reduce(self, seg: _Segment, start: int, n: int, acc: torch.Tensor) -> None:
        """A robust rule's output chunk into ``acc``: ``CHUNK_ELEMS // inputs`` elements at a time, each
        input's values stacked (inputs x block: one chunk in all, whatever the number of updates) and
        reduced by :func:`fedfs.fl.robust.reduce_rows`. A non-finite input value raises NonFinite (its
        update is then found and rejected: an order statistic would hide a NaN, not refuse it)."""
        k = len(seg.terms)
        if self.stack is None or self.stack.dtype != acc.dtype:
            self.stack = torch.empty(CHUNK_ELEMS, dtype=acc.dtype)
        block = max(1, CHUNK_ELEMS // k)
        for b0 in range(0, n, block):
            m = min(block, n - b0)
            rows = self.stack[:k * m].view(k, m)
            for j, term in enumerate(seg.terms):
                item = ALLOWED_DTYPES[term.dtype]
                try:
                    read_at(self.files[term.src], self.rview[:m * item], term.offset + (start + b0) * item,
                            self.paths[term.src])
                except (OSError, ValidationError) as exc:
                    raise SourceFailed(term.src, exc) from exc
                rows[j].copy_(self.r[term.dtype][:m])
            if not all_finite(rows):
                raise NonFinite(seg)
            reduce_rows(seg.kind, rows.numpy(), acc[b0:b0 + m].numpy())


def execute(outs: Sequence[Out], sources: Sequence[str], out_path: str, metadata: Mapping[str, str] | None,
            threads: int | None = None) -> None:
    """Write ``outs`` (sorted by key) to ``out_path`` as safetensors, streaming chunk by chunk.

    Raises NonFinite or SourceFailed (internal) for the caller to attribute; on any
    error the partial output is removed.
    """
    header, offsets = safetensors_header([(o.key, o.dtype, o.shape) for o in outs], metadata)
    size = len(header) + (offsets[-1] + math.prod(outs[-1].shape) * ALLOWED_DTYPES[outs[-1].dtype] if outs else 0)
    segs = _segments(outs, len(header), offsets)
    item = max((ALLOWED_DTYPES[t.dtype] for s in segs for t in s.terms), default=4)
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
    check_config(rule, global_path, version, align)
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
    accepted: list[Accepted] = []
    for u in ordered:
        u = Update(u.site, os.fspath(u.path), u.num_cases, u.base_version,
                   None if u.base_path is None else os.fspath(u.base_path), u.expected)
        try:
            accepted.append(_admit(u, rule, version, align, glob, bases, max_header))
        except ValidationError as exc:
            rejected.append(Rejection(u.site, str(u.path), str(exc)))
    if align is None and accepted:
        ref = reference_layout(accepted, expected, glob)
        for a in list(accepted):
            try:
                check_shapes(a.update.path, a.info.shapes(), ref)  # type: ignore[arg-type]
            except SchemaError as exc:
                rejected.append(Rejection(a.update.site, a.info.path, str(exc)))
                accepted.remove(a)
    base_infos, first_src = number_sources(accepted, bases)
    while True:
        if not accepted:
            reasons = "; ".join(r.reason for r in rejected) or "no updates given"
            exc = ValidationError(f"no acceptable update to aggregate: {reasons}")
            exc.rejected = tuple(rejected)  # type: ignore[attr-defined]
            raise exc
        outs, conflicts = plan(rule, glob, base_infos, accepted, first_src)
        if isinstance(rule, (Median, TrimmedMean)):  # a uniform mean's plan, each output then reduced by the rule
            outs = robust_outs(rule, outs, first_src)
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
                bad.update(_nonfinite_culprits(exc.segment, infos, first_src))  # type: ignore[arg-type]
        for i in sorted(bad):
            rejected.append(Rejection(accepted[i].update.site, accepted[i].info.path, bad[i]))
        accepted = [a for i, a in enumerate(accepted) if i not in bad]
    return result_of(out_path, rule, accepted, rejected, outs)


def _admit(u: Update, rule: Rule, version: int | None, align: str | None, glob: WeightsInfo | None,
           bases: dict[int, WeightsInfo], max_header: int) -> Accepted:
    """Header-level checks of one update (and its base); raises ValidationError with the reason."""
    info = inspect_weights(u.path, expected=u.expected, max_header=max_header)
    admitted = accept(u, info, rule, version)
    if admitted.base and u.base_version not in bases:
        if u.base_path is None:
            raise ValidationError(f"{u.path}: base global version {u.base_version} is not available")
        base = inspect_weights(u.base_path, max_header=max_header)
        if align is None:
            check_shapes(base.path, base.shapes(), glob.shapes())  # type: ignore[union-attr]
        bases[u.base_version] = base  # type: ignore[index]
    admitted.groups = output_groups(info.shapes(), align)
    return admitted


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
    if not found:  # all finite, yet the sum overflows: the update with the largest values there goes
        culprit = _largest_update(seg, infos, first_src)
        if culprit is None:
            raise ValidationError(f"the aggregate of tensor {seg.keys[0]!r} overflows {seg.dtype}")
        src, peak = culprit
        found[src - first_src] = (f"{infos[src].path}: its values (max |x| = {peak:.3g} in {seg.keys[0]!r}) "  # type: ignore[union-attr]
                                  f"make the aggregate overflow {seg.dtype}")
    return found


def _largest_update(seg: _Segment, infos: Sequence[WeightsInfo | None], first_src: int) -> tuple[int, float] | None:
    """The update (source index) holding the largest magnitude in ``seg``'s tensors, and that magnitude."""
    from safetensors import safe_open

    best: tuple[int, float] | None = None
    for src in sorted({t.src for t in seg.terms if t.src >= first_src}):
        info = infos[src]
        if info is None:
            continue
        with safe_open(info.path, framework="pt") as f:
            peak = max(float(f.get_tensor(k).double().abs().max()) for k in seg.keys if k in info.tensors)
        if best is None or peak > best[1]:
            best = (src, peak)
    return best


def extract_site(union_path: str | os.PathLike[str], shapes: Mapping[str, Sequence[int]],
                 out_path: str | os.PathLike[str], *, align: str = "level",
                 fallback_path: str | os.PathLike[str] | None = None, metadata: Mapping[str, str] | None = None,
                 max_header: int = MAX_HEADER) -> Extraction:
    """One site's weights under its own keys: from the union file where its group exists,
    else from ``fallback_path`` (its own weights), byte for byte."""
    union = inspect_weights(union_path, max_header=max_header)
    fallback = inspect_weights(fallback_path, expected=shapes, max_header=max_header) if fallback_path else None
    outs, n_global = extraction_plan(union, fallback, shapes, align)
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
