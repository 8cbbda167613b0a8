"""Pretrained starting weights (``nnUNetv2_train -pretrained_weights``) for a federation's v0.

The coordinator reads the weights *locally* (:func:`read_pretrained`): an nnU-Net checkpoint
(``.pth``, read with ``torch.load(weights_only=True)``: tensors and plain data only, never
arbitrary pickled objects), an exported model folder (its ``fold_X/checkpoint_final.pth``) or
safetensors. They become safetensors (:func:`write_pretrained`): the canonical tensors fedfs
exchanges (``state_dict()``'s aliases removed, DDP's ``module.`` and torch.compile's
``_orig_mod.`` prefixes stripped). Only that safetensors file goes into the bucket.

A site loads them into its network right after building it from the plans
(:func:`apply_pretrained`), before it publishes its initial weights, so v0 *is* the pretrained
model wherever the shapes match. As nnU-Net's ``load_pretrained_weights``: every tensor but the
segmentation heads (``.seg_layers.``) must be there with the network's shape; a head is skipped
(kept random) where its shape differs, i.e. where the label count differs. torch is imported
inside functions only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, NnunetError

if TYPE_CHECKING:
    import torch

__all__ = ["read_pretrained", "canonical_state", "write_pretrained", "apply_pretrained", "SEG_HEAD"]

#: nnU-Net's skip string in load_pretrained_weights: the 1x1 layers that produce the segmentation.
SEG_HEAD = ".seg_layers."


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; numpy scalars and dtypes (nnU-Net's logs hold them) are allowed
    as data, nothing else that the unpickler would have to import."""
    import pickle

    import numpy as np
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    allowed = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    scalar = getattr(getattr(np, "_core", np), "multiarray", None) or np.core.multiarray
    allowed.append(scalar.scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not readable as an nnU-Net checkpoint with weights_only=True ({exc})") from None


def canonical_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The distinct tensors of a ``state_dict``: prefixes stripped; a tensor listed under several names
    (nnU-Net's networks list each encoder tensor four times) kept under its first, which is the name
    ``named_parameters()`` gives it (both walk the modules in the same order)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"pretrained weights: {key!r} is not a tensor ({type(value).__name__})")
        name = key.removeprefix("module.").replace("_orig_mod.", "")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if ident in seen and value.numel() > 0:
            continue
        seen.add(ident)
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def _checkpoint_in_folder(folder: Path) -> Path:
    """An exported (or nnU-Net results) model folder's checkpoint: fold_0's, else the only fold's."""
    found = sorted(folder.glob("fold_*/checkpoint_final.pth"))
    if not found:
        raise ConfigError(f"{folder}: no fold_X/checkpoint_final.pth (is it an nnU-Net model folder?)")
    for preferred in ("fold_0", "fold_all"):
        for f in found:
            if f.parent.name == preferred:
                return f
    if len(found) > 1:
        raise ConfigError(f"{folder}: several folds ({', '.join(f.parent.name for f in found)}); give one "
                          "checkpoint_final.pth")
    return found[0]


def read_pretrained(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(canonical tensors, metadata) of a checkpoint, model folder or safetensors file, read locally."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: pretrained weights not found")
    meta = {"source": p.name}
    if p.is_dir():
        meta["source"] = f"{p.name}/{_checkpoint_in_folder(p).relative_to(p)}"
        p = _checkpoint_in_folder(p)
    if p.suffix == ".safetensors":
        from ..weights.tensors import load_weights

        tensors, _ = load_weights(p)
        return canonical_state(tensors), {**meta, "format": "safetensors"}
    if p.suffix not in (".pth", ".pt"):
        raise ConfigError(f"{p}: pretrained weights must be an nnU-Net checkpoint (.pth), a model folder or "
                          ".safetensors")
    ckpt = _torch_load(p)
    state = ckpt.get("network_weights") if isinstance(ckpt, dict) and "network_weights" in ckpt else ckpt
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"{p}: holds no network weights (an nnU-Net checkpoint has 'network_weights')")
    meta["format"] = "nnunet-checkpoint"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("trainer_name"), str):
        meta["trainer_name"] = ckpt["trainer_name"]
    return canonical_state(state), meta


def write_pretrained(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, str]:
    """Convert ``path`` (see :func:`read_pretrained`) to the safetensors file ``out``; return its metadata."""
    from ..weights.tensors import save_weights

    import json

    tensors, meta = read_pretrained(path)
    # one metadata key: safetensors writes its metadata map in a random order (a Rust HashMap), and the
    # same file must give the same bytes (sha256) for a repeated `fedfs init` to be a no-op
    save_weights(str(out), tensors, {"fedfs_pretrained": json.dumps(meta, sort_keys=True)})
    return meta


def apply_pretrained(trainer: Any, tensors: Mapping[str, torch.Tensor], *, partial: bool = False) -> dict[str, Any]:
    """Load pretrained ``tensors`` into ``trainer``'s network, checked against the shapes its plans give.

    Every tensor but the segmentation heads must be present with the network's shape (NnunetError
    naming the first few that are not), as nnU-Net's ``load_pretrained_weights`` asserts; heads
    whose shape differs (another label count) are skipped. ``partial`` (AsymFedAvg, where a site's
    own plans may differ from the pretrained model's) loads what matches and keeps the rest.
    Returns ``{"loaded", "skipped_heads", "kept"}`` (counts)."""
    import torch

    from .network import canonical_tensors

    target = canonical_tensors(trainer)
    bad = sorted(k for k, t in target.items() if SEG_HEAD not in k
                 and (k not in tensors or tuple(tensors[k].shape) != tuple(t.shape)))
    if bad and not partial:
        detail = ", ".join(f"{k} ({tuple(tensors[k].shape) if k in tensors else 'missing'} vs {tuple(target[k].shape)})"
                           for k in bad[:3])
        raise NnunetError(f"the pretrained weights do not fit this site's network from its plans: {len(bad)} tensor(s) "
                          f"differ, e.g. {detail}; they must come from a model with the same plans (planner, patch "
                          "size, stages)")
    loaded, heads = 0, 0
    with torch.no_grad():
        for k, dst in target.items():
            src = tensors.get(k)
            if src is None or tuple(src.shape) != tuple(dst.shape):
                heads += SEG_HEAD in k
                continue
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
            loaded += 1
    return {"loaded": loaded, "skipped_heads": heads, "kept": len(target) - loaded}
