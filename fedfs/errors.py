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
    ├── NnunetError (RuntimeError)         nnU-Net could not do what was asked
    └── Blocked                            a step cannot go on until a person acts

Each class declares the CLI's exit code for it (``exit_code``) and what the code means
(``exit_meaning``); :func:`exit_code_for` and the reference in docs/cli.md read them from
here. An error about one bucket file carries its key (``exc.key``), so callers that record
or quarantine it never parse the message. Backend-specific exceptions are translated into
this tree by one table per backend (each backend's ``error_table``, applied by
:func:`fedfs.store.base.translate_errors`).
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
    "Blocked",
    "EXIT_CODES",
    "exit_code_for",
]


class FedfsError(Exception):
    """Root of every error fedfs raises deliberately; ``key`` is the bucket key it concerns, if any."""

    exit_code = 1
    exit_meaning = ("other fedfs error, or an unexpected error (rerun with `--debug` or `FEDFS_DEBUG=1` "
                    "for the traceback)")

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class ConfigError(FedfsError, ValueError):
    """Options or federation configuration that cannot work."""

    exit_code, exit_meaning = 2, "bad options or configuration"


class ValidationError(FedfsError, ValueError):
    """A file or value from the bucket was rejected; the message names it and why."""

    exit_code, exit_meaning = 3, "a file from the bucket was rejected (malformed, wrong schema, bad name)"


class InvalidName(ValidationError):
    """A site name or bucket key that is unsafe (path traversal, empty, too long)."""


class SchemaError(ValidationError):
    """Malformed JSON, unknown schema version, missing or mistyped field."""


class SignatureError(ValidationError):
    """Missing or invalid signature, unknown signer, or a signer of the wrong role."""

    exit_code, exit_meaning = 4, "a signature or integrity (sha256) check failed"


class IntegrityError(ValidationError):
    """A payload whose sha256 or size does not match what its manifest says."""

    exit_code, exit_meaning = 4, SignatureError.exit_meaning


class TooLarge(ValidationError):
    """A document or header larger than the limit fedfs accepts for it."""


class StoreError(FedfsError, OSError):
    """The storage backend failed."""

    exit_code, exit_meaning = 7, "the bucket could not be reached or failed"


class NotFound(StoreError, FileNotFoundError):
    """The key does not exist in the bucket."""


class Conflict(StoreError, FileExistsError):
    """An exclusive publish found the key already written by someone else."""

    exit_code, exit_meaning = 5, "conflict: a write-once file already exists with other content"


class StateUnknown(StoreError):
    """A write failed in a way that leaves unknown whether it took effect."""

    exit_code, exit_meaning = 6, "state unknown: a write may or may not have happened; run the step again"


class StoreUnavailable(StoreError, ConnectionError):
    """The backend could not be reached (network, credentials, server down)."""


class NnunetError(FedfsError, RuntimeError):
    """nnU-Net is missing or failed at a step fedfs asked of it."""

    exit_code, exit_meaning = 8, "nnU-Net failed"


class Blocked(FedfsError):
    """A role's step cannot go on until a person acts (a rejected file, plans that differ, ...).

    ``fedfs site step`` and ``fedfs aggregator step`` exit with this code and print the reason;
    the daemons keep polling instead."""

    exit_code, exit_meaning = 10, "blocked: the step cannot go on until a person acts (the reason is printed)"


#: Codes the CLI uses without an exception class.
OTHER_EXIT_CODES = {0: "success (also: a step that found nothing due)",
                    9: "`fedfs doctor`: the bucket is not usable from here"}

_CLASSES = [FedfsError, ConfigError, ValidationError, InvalidName, SchemaError, SignatureError, IntegrityError,
            TooLarge, StoreError, NotFound, Conflict, StateUnknown, StoreUnavailable, NnunetError, Blocked]

#: Every exit code and its meaning, in code order (docs/cli.md is rendered from this).
EXIT_CODES: dict[int, str] = dict(sorted({**{c.exit_code: c.exit_meaning for c in reversed(_CLASSES)},
                                          **OTHER_EXIT_CODES}.items()))


def exit_code_for(exc: BaseException) -> int:
    """The CLI exit code for ``exc``: its class's ``exit_code`` (1 for anything not a FedfsError)."""
    return exc.exit_code if isinstance(exc, FedfsError) else 1
