"""The weights of an nnU-Net trainer's network, in and out, as fedfs exchanges them.

The canonical tensors are ``named_parameters()`` + ``named_buffers()`` of the bare network
(no DDP ``module``, no torch.compile ``_orig_mod.`` wrapper): ``state_dict()`` lists some
tensors under several names, which safetensors refuses. torch is imported inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import NnunetError

if TYPE_CHECKING:
    import torch

__all__ = ["bare_network", "canonical_tensors", "network_weights", "load_network_weights", "strip_compiled"]

_ORIG_MOD = "_orig_mod."


def strip_compiled(name: str) -> str:
    """A key without torch.compile's ``_orig_mod.`` prefix."""
    return name.replace(_ORIG_MOD, "")


def bare_network(trainer: Any) -> Any:
    """The bare network: without DDP's ``module`` or torch.compile's ``_orig_mod`` wrapper."""
    from torch._dynamo import OptimizedModule

    net = trainer.network
    if trainer.is_ddp:
        net = net.module
    if isinstance(net, OptimizedModule):
        net = net._orig_mod
    return net

def canonical_tensors(trainer: Any) -> dict[str, torch.Tensor]:
    mod = bare_network(trainer)
    out: dict[str, Any] = dict(mod.named_parameters())
    out.update(mod.named_buffers())
    return {strip_compiled(k): v for k, v in out.items()}

def network_weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The network's canonical tensors: ``named_parameters()`` + ``named_buffers()``.

    ``state_dict()`` lists some tensors under several names (240 keys, 88 tensors for a
    5-stage 2D net), which safetensors refuses; these are the distinct ones, as detached,
    contiguous CPU copies, without any ``_orig_mod.`` prefix.
    """
    import torch

    return {k: v.detach().to(device="cpu", copy=True, memory_format=torch.contiguous_format)
            for k, v in canonical_tensors(trainer).items()}

def load_network_weights(trainer: Any, tensors: Mapping[str, torch.Tensor], *,
                     partial: bool = False) -> tuple[list[str], list[str]]:
    """Copy ``tensors`` into the network; return ``(loaded_keys, kept_keys)``.

    Strict by default: the key set and every shape must match the network's canonical
    tensors. With ``partial=True`` (AsymFedAvg) only keys present with the right shape are
    loaded and the rest keep their local values. Aliased ``state_dict`` names follow
    automatically because they are the same tensors. ``_orig_mod.`` prefixes are ignored.
    The optimizer's state is left as it is.
    """
    import torch

    target = canonical_tensors(trainer)
    incoming: dict[str, Any] = {}
    for k, v in tensors.items():
        name = strip_compiled(k)
        if name in incoming:
            raise NnunetError(f"two tensors map to the same network key {name!r}")
        incoming[name] = v
    mismatched = sorted(k for k in incoming.keys() & target.keys()
                        if tuple(incoming[k].shape) != tuple(target[k].shape))
    if not partial:
        missing, unexpected = sorted(target.keys() - incoming.keys()), sorted(incoming.keys() - target.keys())
        if missing or unexpected or mismatched:
            parts = [f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
                     for label, keys in (("missing", missing), ("unexpected", unexpected),
                                         ("shape-mismatched", mismatched)) if keys]
            raise NnunetError("weights do not fit the network: " + "; ".join(parts))
    loaded = []
    with torch.no_grad():
        for name, dst in target.items():
            src = incoming.get(name)
            if src is None or name in mismatched:
                continue
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
            loaded.append(name)
    kept = sorted(target.keys() - set(loaded))
    return sorted(loaded), kept
