"""fedfs: federated nnU-Net training over shared storage (folders, SMB, S3).

The public API is re-exported here lazily, so ``import fedfs`` is cheap and
never imports torch or nnunetv2::

    from fedfs import Federation, Site, Aggregator, SiteClient, layout, FedfsError

The layers behind these names (docs/architecture.md): ``protocol/`` and ``fl/`` are the
pure core, ``store/ trust/ weights/ nnunet/`` the I/O edges, ``roles/`` the parties,
:mod:`fedfs.federation` the facade, ``ops/`` and ``cli/`` the shells, ``testing/`` test support.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import (
    ConfigError,
    Conflict,
    FedfsError,
    IntegrityError,
    InvalidName,
    NotFound,
    SchemaError,
    SignatureError,
    StateUnknown,
    StoreError,
    StoreUnavailable,
    TooLarge,
    ValidationError,
)

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use). ``layout`` is a module.
_LAZY = {
    "Federation": "fedfs.federation",
    "config_from_key_dir": "fedfs.federation",
    "open_store": "fedfs.store",
    "Store": "fedfs.store",
    "Bucket": "fedfs.trust.bucket",
    "Identity": "fedfs.trust.signing",
    "load_identity": "fedfs.trust.signing",
    "generate_keypair": "fedfs.trust.signing",
    "Site": "fedfs.roles.site",
    "LocalWork": "fedfs.roles.site",
    "Aggregator": "fedfs.roles.aggregator",
    "SiteClient": "fedfs.roles.client",
    "StepResult": "fedfs.roles.steps",
    "Action": "fedfs.roles.steps",
    "run_loop": "fedfs.roles.loop",
    "make_trigger": "fedfs.store.watch",
    "NnunetOptions": "fedfs.nnunet.work",
    "NnunetWork": "fedfs.nnunet.work",
    "ToyWork": "fedfs.testing.toy",
    "make_federation": "fedfs.testing.synthetic",
    "aggregate": "fedfs.weights.combine",
    "aggregate_asym": "fedfs.weights.combine",
    "extract_site": "fedfs.weights.combine",
    "Update": "fedfs.fl.aggregate",
    "FedAvg": "fedfs.fl.aggregate",
    "FedBuff": "fedfs.fl.aggregate",
    "FedAsync": "fedfs.fl.aggregate",
    "Median": "fedfs.fl.robust",
    "TrimmedMean": "fedfs.fl.robust",
    "Staleness": "fedfs.fl.aggregate",
    "collect_status": "fedfs.ops.status",
    "build_report": "fedfs.ops.report",
    "run_doctor": "fedfs.ops.doctor",
    "SimulationSpec": "fedfs.ops.simulate",
    "simulate": "fedfs.ops.simulate",
    "nnunet_environment": "fedfs.ops.simulate",
    "export_site_model": "fedfs.ops.export",
}
_LAZY_MODULES = {"layout": "fedfs.protocol.layout"}

__all__ = sorted(
    [
        "ConfigError",
        "Conflict",
        "FedfsError",
        "IntegrityError",
        "InvalidName",
        "NotFound",
        "SchemaError",
        "SignatureError",
        "StateUnknown",
        "StoreError",
        "StoreUnavailable",
        "TooLarge",
        "ValidationError",
        "__version__",
        *_LAZY,
        *_LAZY_MODULES,
    ]
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _LAZY_MODULES:
        return import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'fedfs' has no attribute {name!r}")
