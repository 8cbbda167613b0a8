"""Model weights as torch tensors: canonical keys, saving, loading, finiteness checks.

The torch side of :mod:`fedfs.weights.header`: a state dict is saved under stable keys
with no aliases, and a file from the bucket is validated (header, then a streaming
finiteness check, one bounded chunk at a time, no mmap) before its tensors are loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from ..errors import ValidationError
from .header import ALLOWED_DTYPES, FLOAT_DTYPES, MAX_HEADER, WeightsInfo, inspect_weights, read_at, \
    safetensors_header

__all__ = [
    "TORCH_DTYPES",
    "canonical_state",
    "save_weights",
    "weights_metadata",
    "validate_update",
    "check_finite",
    "all_finite",
    "load_weights",
    "torch_single_thread",
    "relative_change",
]

#: safetensors dtype name -> torch dtype, for every name in ``ALLOWED_DTYPES``
TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
})
_TORCH_TO_NAME = {t: name for name, t in TORCH_DTYPES.items()}

_CHECK_CHUNK = 4 * 1024 * 1024
_COMPILE_PREFIX = "_orig_mod."


# ---- writing -------------------------------------------------------------------
def canonical_state(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors worth saving, under stable keys, with no aliases.

    From a module: ``named_parameters()`` plus the persistent ``named_buffers()``
    (nnU-Net's ``state_dict()`` repeats the encoder under ``decoder.encoder.*``,
    which safetensors refuses). From a dict: aliases of an earlier key (same
    storage, offset, shape and strides) are dropped, keeping the first in the
    dict's order, which is registration order for a ``state_dict()``. torch.compile's
    ``_orig_mod.`` segments are removed from every key.
    """
    if isinstance(module_or_state, torch.nn.Module):
        persistent = set(module_or_state.state_dict(keep_vars=True))
        items: list[tuple[str, torch.Tensor]] = list(module_or_state.named_parameters())
        items += [(k, b) for k, b in module_or_state.named_buffers() if k in persistent]
    else:
        items = list(module_or_state.items())
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise ValidationError(f"state entry {key!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        if t.numel() and t.device.type != "meta":
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in seen:
                continue
            seen.add(ident)
        name = key.replace(_COMPILE_PREFIX, "")
        if name in out:
            raise ValidationError(f"keys {key!r} and {name!r} collide once {_COMPILE_PREFIX!r} is removed")
        out[name] = t.to("cpu").contiguous()
    return out


def weights_metadata(*, federation: str, site: str, version: int, base_version: int | None = None,
                     num_cases: int | None = None, plans_digest: str | None = None,
                     **extra: str) -> dict[str, str]:
    """The str->str metadata fedfs writes into every weights file."""
    meta = {"federation": federation, "site": site, "version": str(version)}
    if base_version is not None:
        meta["base_version"] = str(base_version)
    if num_cases is not None:
        meta["num_cases"] = str(num_cases)
    if plans_digest is not None:
        meta["plans_digest"] = plans_digest
    meta.update(extra)
    return meta


def save_weights(path: str | os.PathLike[str], tensors: torch.nn.Module | Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (a module or a state dict, canonicalised) as safetensors.

    The file appears atomically (temporary file, then rename), so a crash never
    leaves half a file under ``path``. Byte-deterministic: the header comes from
    :func:`~fedfs.weights.header.safetensors_header` (tensors and metadata in sorted key
    order), then the tensors' bytes in that order, so the same weights and metadata give
    the same file and the same sha256 (safetensors' own writer orders a metadata map of two
    or more keys at random), and a re-published update after a crash is the same blob.
    """
    state = canonical_state(tensors)
    for key, t in state.items():
        if t.dtype not in _TORCH_TO_NAME:
            raise ValidationError(f"tensor {key!r} has dtype {t.dtype}; allowed: {sorted(ALLOWED_DTYPES)}")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationError(f"metadata must map str to str, got {k!r}: {v!r}")
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.incomplete"
    entries = [(key, _TORCH_TO_NAME[state[key].dtype], tuple(state[key].shape)) for key in sorted(state)]
    header, _offsets = safetensors_header(entries, meta)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for key, _dtype, _shape in entries:
                t = state[key].detach().cpu().contiguous().reshape(-1)
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- reading and checks ---------------------------------------------------------
@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch's element-wise work on the calling thread only.

    On chunks of a few MiB, torch's intra-op thread pool costs more than it gains, and on a
    busy machine (a site training beside it, or 2 cores shared with other parties) its
    workers' spin-waits make a 30 MiB NaN check take 1.1 s instead of 50 ms (measured).
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN or Inf."""
    if x.dtype in (torch.float32, torch.float64) and math.isfinite(float(x.sum())):
        return True  # a finite sum implies finite elements; else look closer
    return bool(torch.isfinite(x).all())


def check_finite(info: WeightsInfo, keys: Sequence[str] | None = None) -> None:
    """Raise ValidationError naming the first tensor (in key order) holding NaN or Inf.

    Streams in chunks of a few MiB through one reused buffer, so memory stays flat.
    """
    buf = bytearray(_CHECK_CHUNK)
    view = memoryview(buf)
    with open(info.path, "rb", buffering=0) as f, torch_single_thread():
        for key in keys if keys is not None else list(info.tensors):
            t = info.tensors[key]
            if t.dtype not in FLOAT_DTYPES:
                continue
            item, tdtype = ALLOWED_DTYPES[t.dtype], TORCH_DTYPES[t.dtype]
            step = _CHECK_CHUNK // item * item
            for off in range(t.start, t.end, step):
                nb = min(step, t.end - off)
                read_at(f, view[:nb], off, info.path)
                x = torch.frombuffer(buf, dtype=tdtype, count=nb // item)
                if not all_finite(x):
                    what = "NaN" if bool(torch.isnan(x).any()) else "Inf"
                    raise ValidationError(f"{info.path}: tensor {key!r} contains {what}")


def validate_update(path: str | os.PathLike[str], expected: Mapping[str, Sequence[int]] | None = None, *,
                    max_header: int = MAX_HEADER) -> WeightsInfo:
    """:func:`inspect_weights`, then a streaming check that every float value is finite."""
    info = inspect_weights(path, expected=expected, max_header=max_header)
    check_finite(info)
    return info


def load_weights(path: str | os.PathLike[str], expected: Mapping[str, Sequence[int]] | None = None, *,
                 max_header: int = MAX_HEADER) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate, then load all tensors (CPU) and the metadata. For sites loading a global."""
    from safetensors import safe_open

    info = validate_update(path, expected, max_header=max_header)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(info.path, framework="pt") as f:
        for key in info.tensors:
            tensors[key] = f.get_tensor(key)
    return tensors, dict(info.metadata)


def relative_change(path: str, base_path: str) -> float:
    """||x - base|| / ||base|| over the float tensors both files hold, one tensor at a time."""
    from safetensors import safe_open

    num = den = 0.0
    with safe_open(path, framework="pt") as fx, safe_open(base_path, framework="pt") as fb, torch_single_thread():
        base_keys = set(fb.keys())
        for k in fx.keys():
            if k not in base_keys:
                continue
            x, b = fx.get_tensor(k), fb.get_tensor(k)
            if not x.is_floating_point() or x.shape != b.shape:
                continue
            x, b = x.double(), b.double()
            num += float(((x - b) ** 2).sum())
            den += float((b**2).sum())
    return (num ** 0.5) / max(den ** 0.5, 1e-12)
