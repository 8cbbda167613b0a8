"""nnU-Net plans as data: the digest every FFE site must agree on, a summary, and a field-by-field diff.

Pure: plans are the JSON dicts nnU-Net writes (``nnUNetPlans.json``); nothing here imports nnU-Net.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ValidationError
from ..protocol.documents import canonical_json

__all__ = ["DATASET_NAME_FIELDS", "plans_digest", "resolve_configuration", "plans_summary", "diff_plans"]

#: Fields that name the dataset; sites may differ in them and still share one plan.
DATASET_NAME_FIELDS = ("dataset_name",)

def _strip_names(plans: Mapping[str, Any]) -> dict:
    return {k: v for k, v in plans.items() if k not in DATASET_NAME_FIELDS}


def plans_digest(plans: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``plans`` without dataset-name fields."""
    return hashlib.sha256(canonical_json(_strip_names(plans))).hexdigest()


def resolve_configuration(plans: Mapping[str, Any], configuration: str) -> dict:
    """A configuration with ``inherits_from`` resolved, as nnU-Net's PlansManager does."""
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise ValidationError(f"plans have no configuration {configuration!r} "
                              f"(available: {', '.join(sorted(configs))})")
    conf = dict(configs[configuration])
    seen = {configuration}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ValidationError(f"configuration {configuration!r}: bad inherits_from {parent!r}")
        seen.add(parent)
        conf = {**configs[parent], **conf}
    return conf


def plans_summary(plans: Mapping[str, Any], configuration: str) -> dict:
    """What AsymFedAvg needs to know about a site's network: stages, features, kernels."""
    conf = resolve_configuration(plans, configuration)
    arch = conf.get("architecture", {})
    kw = arch.get("arch_kwargs", {})
    return {
        "configuration": configuration,
        "network_class_name": arch.get("network_class_name"),
        "n_stages": kw.get("n_stages"),
        "features_per_stage": kw.get("features_per_stage"),
        "kernel_sizes": kw.get("kernel_sizes"),
        "strides": kw.get("strides"),
        "patch_size": conf.get("patch_size"),
        "batch_size": conf.get("batch_size"),
        "spacing": conf.get("spacing"),
        "num_input_channels": len(plans.get("foreground_intensity_properties_per_channel", {})),
    }


def diff_plans(a: Any, b: Any, rel_tol: float = 0.0, ignore: Sequence[str] = DATASET_NAME_FIELDS,
               _path: str = "") -> list[str]:
    """Paths (``configurations.2d.patch_size[1]``) where two plans differ.

    Top-level fields in ``ignore`` are skipped; floats within ``rel_tol`` count as equal.
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if not _path and k in ignore:
                continue
            p = f"{_path}.{k}" if _path else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out.extend(diff_plans(a[k], b[k], rel_tol, ignore, p))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [_path]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(diff_plans(x, y, rel_tol, ignore, f"{_path}[{i}]"))
        return out
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        if a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0):
            return []
        return [_path]
    return [] if a == b else [_path]
