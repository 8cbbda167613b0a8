"""The fedfs exception tree.

Every error fedfs raises on purpose derives from :class:`FedfsError`. Where a
builtin exception means the same thing, the fedfs class inherits it too, so
``except FileNotFoundError`` keeps working for callers who do not know fedfs::

    FedfsError
    ├── ConfigError (ValueError)           bad options, bad federation set-up
    ├── ValidationError (ValueError)       a file from the bucket is not acceptable
    │   ├── InvalidName                    site name or key that is unsafe to use
    │   ├── SchemaError                    malformed JSON, unknown schema, wrong field
    │   ├── SignatureError                 missing, forged or wrong-role signature
    │   ├── IntegrityError                 sha256 or size does not match the manifest
    │   └── TooLarge                       a document or header over its size limit
    ├── StoreError (OSError)               the bucket itself failed
    │   ├── NotFound (FileNotFoundError)
    │   ├── Conflict (FileExistsError)     exclusive publish lost to another writer
    │   ├── StateUnknown                   a write may or may not have happened
    │   └── StoreUnavailable (ConnectionError)
    └── NnunetError (RuntimeError)         nnU-Net could not do what was asked

Backend-specific exceptions are translated into this tree in one place,
:func:`fedfs.store.base.translate_errors`.
"""

from __future__ import annotations

__all__ = [
    "FedfsError",
    "ConfigError",
    "ValidationError",
    "InvalidName",
    "SchemaError",
    "SignatureError",
    "IntegrityError",
    "TooLarge",
    "StoreError",
    "NotFound",
    "Conflict",
    "StateUnknown",
    "StoreUnavailable",
    "NnunetError",
    "EXIT_CODES",
    "exit_code_for",
]


class FedfsError(Exception):
    """Root of every error fedfs raises deliberately."""


class ConfigError(FedfsError, ValueError):
    """Options or federation configuration that cannot work."""


class ValidationError(FedfsError, ValueError):
    """A file or value from the bucket was rejected; the message names it and why."""


class InvalidName(ValidationError):
    """A site name or bucket key that is unsafe (path traversal, empty, too long)."""


class SchemaError(ValidationError):
    """Malformed JSON, unknown schema version, missing or mistyped field."""


class SignatureError(ValidationError):
    """Missing or invalid signature, unknown signer, or a signer of the wrong role."""


class IntegrityError(ValidationError):
    """A payload whose sha256 or size does not match what its manifest says."""


class TooLarge(ValidationError):
    """A document or header larger than the limit fedfs accepts for it."""


class StoreError(FedfsError, OSError):
    """The storage backend failed."""


class NotFound(StoreError, FileNotFoundError):
    """The key does not exist in the bucket."""


class Conflict(StoreError, FileExistsError):
    """An exclusive publish found the key already written by someone else."""


class StateUnknown(StoreError):
    """A write failed in a way that leaves unknown whether it took effect."""


class StoreUnavailable(StoreError, ConnectionError):
    """The backend could not be reached (network, credentials, server down)."""


class NnunetError(FedfsError, RuntimeError):
    """nnU-Net is missing or failed at a step fedfs asked of it."""


#: Process exit codes of the CLI, most specific class first (documented in docs/cli.md).
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (ConfigError, 2),
    (SignatureError, 4),
    (IntegrityError, 4),
    (ValidationError, 3),
    (Conflict, 5),
    (StateUnknown, 6),
    (StoreUnavailable, 7),
    (StoreError, 7),
    (NnunetError, 8),
    (FedfsError, 1),
]


def exit_code_for(exc: BaseException) -> int:
    """The CLI exit code for ``exc`` (1 for anything not listed)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1
