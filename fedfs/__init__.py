"""fedfs: federated nnU-Net training over shared storage (folders, SMB, S3).

The public API is re-exported here lazily, so ``import fedfs`` is cheap and
never imports torch or nnunetv2::

    from fedfs import Federation, open_store, FedfsError
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

_LAZY = {
    "Federation": "fedfs.federation",
    "open_store": "fedfs.store",
    "Store": "fedfs.store",
    "Bucket": "fedfs.bucket",
    "Identity": "fedfs.signing",
    "load_identity": "fedfs.signing",
    "generate_keypair": "fedfs.signing",
    "run_doctor": "fedfs.doctor",
}

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
    ]
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedfs' has no attribute {name!r}")
