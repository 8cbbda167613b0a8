"""Which tensors of differently shaped networks are "the same layer". Pure, no I/O.

nnU-Net's networks (dynamic_network_architectures' PlainConvUNet and
ResidualEncoderUNet) name encoder stages from the input (``encoder.stages.0`` is
full resolution) but decoder parts from the bottleneck: ``decoder.stages.i``,
``decoder.transpconvs.i`` and ``decoder.seg_layers.i`` produce resolution level
``n_stages - 2 - i``. Matching by name therefore pairs layers at different
resolutions; a 5-stage and a 7-stage 2D net share 44 of the 5-stage net's 88
tensors by name and shape, but all 88 once decoder parts are keyed by level.

Modes (``ALIGN_MODES``):

- ``"level"``: encoder keys as they are, decoder indices replaced by the resolution
  level, written ``decoder.stages.r3...`` (the ``r`` keeps canonical keys from ever
  colliding with real ones). Networks without a ``decoder.`` part align by name.
- ``"name"``: plain name and shape, the reference behaviour, for comparison.

A *group* is an aligned key plus a shape, rendered ``"<canonical>[d0,d1,...]"``: the
tensors of all sites in one group are averaged together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ALIGN_MODES",
    "SiteShare",
    "decoder_depth",
    "canonical_keys",
    "group_name",
    "group_keys",
    "align_sites",
    "sharing",
]

ALIGN_MODES = ("level", "name")
Shape = tuple[int, ...]

_DECODER_RE = re.compile(r"^decoder\.(stages|transpconvs|seg_layers)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SiteShare:
    """How much of one site's network is averaged with at least one other site."""

    site: str
    tensors: int
    params: int
    shared_tensors: int
    shared_params: int


def _check_mode(align: str) -> None:
    if align not in ALIGN_MODES:
        from ..errors import ConfigError

        raise ConfigError(f"align must be one of {ALIGN_MODES}, got {align!r}")


def decoder_depth(keys: Iterable[str]) -> int:
    """Number of decoder stages (``n_stages - 1``), from the highest decoder index; 0 if none."""
    depth = 0
    for key in keys:
        m = _DECODER_RE.match(key)
        if m:
            depth = max(depth, int(m.group(2)) + 1)
    return depth


def canonical_keys(keys: Iterable[str], align: str = "level") -> dict[str, str]:
    """Map each actual key to its aligned (canonical) key."""
    _check_mode(align)
    keys = list(keys)
    if align == "name":
        return {k: k for k in keys}
    depth = decoder_depth(keys)
    out = {}
    for key in keys:
        m = _DECODER_RE.match(key)
        if m:
            level = depth - 1 - int(m.group(2))
            out[key] = f"decoder.{m.group(1)}.r{level}.{m.group(3)}"
        else:
            out[key] = key
    return out


def group_name(canonical: str, shape: Sequence[int]) -> str:
    """The group a tensor belongs to: aligned key plus shape."""
    return f"{canonical}[{','.join(str(int(d)) for d in shape)}]"


def group_keys(shapes: Mapping[str, Sequence[int]], align: str = "level") -> dict[str, str]:
    """Map each actual key of one network to its group name."""
    canon = canonical_keys(shapes, align)
    groups = {k: group_name(canon[k], shapes[k]) for k in shapes}
    if len(set(groups.values())) != len(groups):
        from ..errors import SchemaError

        raise SchemaError("two tensors of one network fall into the same aligned group")
    return groups


def align_sites(site_shapes: Mapping[str, Mapping[str, Sequence[int]]],
                align: str = "level") -> dict[str, dict[str, str]]:
    """Group name -> {site: that site's actual key}, groups and sites in sorted order."""
    table: dict[str, dict[str, str]] = {}
    for site in sorted(site_shapes):
        for key, group in group_keys(site_shapes[site], align).items():
            table.setdefault(group, {})[site] = key
    return {g: table[g] for g in sorted(table)}


def sharing(site_shapes: Mapping[str, Mapping[str, Sequence[int]]], align: str = "level") -> dict[str, SiteShare]:
    """Per site: its tensors and parameters, and how many of them align with another site's."""
    table = align_sites(site_shapes, align)
    out = {}
    for site in sorted(site_shapes):
        shapes = site_shapes[site]
        groups = group_keys(shapes, align)
        shared = [k for k, g in groups.items() if len(table[g]) > 1]
        out[site] = SiteShare(
            site=site,
            tensors=len(shapes),
            params=sum(math.prod(s) for s in shapes.values()),
            shared_tensors=len(shared),
            shared_params=sum(math.prod(shapes[k]) for k in shared),
        )
    return out
