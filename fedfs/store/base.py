"""The Store interface every backend implements, and how backend errors become fedfs errors.

A store is a flat key/value space of bytes under one root URL. Keys are relative,
``/``-separated, validated by :func:`fedfs.protocol.layout.check_key`. Backends implement
six primitives; everything about signatures, digests and documents lives above,
in :mod:`fedfs.trust.bucket`, so a new backend is only these few methods.

``publish`` is the one that matters: it is *exclusive* (put-if-absent) and
atomic, so a reader never sees a half-written published file and two writers of
the same key cannot both succeed.

Errors: every public method runs its primitive inside :func:`translate_errors`. Each backend
declares, in its own module, an :data:`ErrorTable` (``Store.error_table``) mapping its
library's exception classes and status codes to an :class:`Outcome`; the generic
:data:`OS_ERRORS` table here covers builtins and errno codes. The first matching row decides,
so nothing parses a message, and every translated error carries the key it concerns.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO, ClassVar

from ..errors import (
    Conflict,
    FedfsError,
    IntegrityError,
    NotFound,
    StateUnknown,
    StoreError,
    StoreUnavailable,
    TooLarge,
)
from ..protocol.layout import check_key

__all__ = [
    "CHUNK", "ErrorTable", "OS_ERRORS", "Outcome", "Rule", "Store", "errno_in", "sha256_file", "too_large",
    "translate", "translate_errors",
]

CHUNK = 8 * 1024 * 1024


class Store(ABC):
    """A bucket backend: bytes under keys, with an exclusive publish."""

    #: URL scheme(s) this backend serves, for messages.
    scheme: str = ""
    #: True where changes can be watched with inotify (a local, non-network folder).
    local_path: str | None = None
    #: This backend's own exceptions, tried before :data:`OS_ERRORS` (see :func:`translate`).
    error_table: ClassVar[ErrorTable] = ()
    #: The storage options (``-so KEY=VALUE``) this backend takes; ``open_store`` refuses others.
    accepted_options: ClassVar[frozenset[str]] = frozenset()
    #: What this backend is, for messages ("an S3 bucket").
    kind: ClassVar[str] = "this bucket"

    def __init__(self, url: str) -> None:
        self.url = url

    # ---- primitives every backend implements ---------------------------------
    @abstractmethod
    def _read(self, key: str, max_size: int | None) -> bytes:
        """Return the bytes at ``key``; raise TooLarge past ``max_size`` (read at most max_size+1)."""

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key`` (only for hints and status documents)."""

    @abstractmethod
    def _publish(self, key: str, data: bytes) -> None:
        """Atomically create ``key``; raise Conflict if it exists. Never overwrites."""

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursive), relative to the store root."""

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` (used by tests, ``doctor`` clean-up and nothing in the protocol)."""

    def _upload(self, key: str, local_path: str) -> None:
        """Create or replace ``key`` from a local file. Backends override to stream."""
        with open(local_path, "rb") as fh:
            self._write(key, fh.read())

    def _download(self, key: str, fh: BinaryIO) -> None:
        """Copy ``key`` into an open local file. Backends override to stream."""
        fh.write(self._read(key, None))

    # ---- public API: key checks + error translation ---------------------------
    def read_bytes(self, key: str, *, max_size: int | None = None) -> bytes:
        check_key(key)
        with translate_errors(self, key):
            return self._read(key, max_size)

    def write_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        with translate_errors(self, key, writing=True):
            self._write(key, data)

    def publish(self, key: str, data: bytes) -> None:
        """Exclusive create. Raises Conflict if ``key`` exists, StateUnknown if undecidable."""
        check_key(key)
        with translate_errors(self, key, writing=True):
            self._publish(key, data)

    def exists(self, key: str) -> bool:
        check_key(key)
        with translate_errors(self, key):
            return self._exists(key)

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        with translate_errors(self, prefix or "/"):
            return sorted(self._list(prefix))

    def size(self, key: str) -> int:
        check_key(key)
        with translate_errors(self, key):
            return self._size(key)

    def delete(self, key: str) -> None:
        check_key(key)
        with translate_errors(self, key, writing=True):
            self._delete(key)

    #: False where exclusivity holds by construction (the in-process memory store): no probe needed.
    probe_exclusive: ClassVar[bool] = True

    def check_exclusive(self, prefix: str) -> None:
        """Probe once that ``publish`` really is exclusive here (a second publish of a key must fail),
        under ``prefix`` (a folder this party may write); raise ConfigError with the reason if not.

        Write-once files rest on it: a server that ignores ``If-None-Match`` (or a share whose
        create-exclusive is not) lets two parties overwrite each other's manifests silently."""
        if not self.probe_exclusive:
            return
        import uuid

        for _attempt in range(3):
            key = f"{prefix.rstrip('/')}/exclusive-probe-{uuid.uuid4().hex[:12]}.json"
            try:  # a first publish whose answer was lost (a transport retry meets its own write) proves nothing:
                self.publish(key, b'{"probe": 1}')  # try again under a new key
            except (Conflict, StateUnknown):
                with contextlib.suppress(FedfsError):
                    self.delete(key)
                continue
            try:
                self.publish(key, b'{"probe": 2}')
            except (Conflict, StateUnknown):  # refused (or undecided): exclusive as far as this probe can tell
                return
            finally:
                with contextlib.suppress(FedfsError):
                    self.delete(key)
            break
        else:
            raise StateUnknown(f"{self.describe(prefix)}: the exclusivity probe's first publish never got a clear "
                               "answer; try again when the storage answers", key=prefix)
        from ..errors import ConfigError

        raise ConfigError(
            f"{self.describe(key)}: a second exclusive publish of the same key succeeded, so this storage does "
            "not honour put-if-absent (an S3 server ignoring If-None-Match, or a share without create-exclusive). "
            "fedfs's write-once files would be overwritten silently; use storage that honours it "
            f"(run `fedfs doctor {self.url}` for the full check; docs/operations.md, Storage)", key=key)

    def upload(self, key: str, local_path: str) -> None:
        check_key(key)
        with translate_errors(self, key, writing=True):
            self._upload(key, local_path)

    def download(self, key: str, local_path: str, *, expected_sha256: str | None = None) -> str:
        """Download ``key`` to ``local_path`` via ``local_path + '.incomplete'``; return its sha256."""
        check_key(key)
        tmp = local_path + ".incomplete"
        with translate_errors(self, key):
            with open(tmp, "wb") as raw:
                fh = _HashingWriter(raw)  # hash while writing: one pass over the payload, not two
                self._download(key, fh)  # type: ignore[arg-type]
        digest = fh.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            os.unlink(tmp)
            raise IntegrityError(
                f"{self.describe(key)}: sha256 {digest} does not match the manifest's {expected_sha256}", key=key
            )
        os.replace(tmp, local_path)
        return digest

    def missing_root(self) -> str | None:
        """Why the bucket itself is absent (no such folder, no such S3 bucket), or None when it
        exists or the backend cannot tell. Asked once, after a file expected there was not found."""
        return None

    def describe(self, key: str) -> str:
        """A human name for ``key`` in this store, for error messages."""
        return f"{self.url.rstrip('/')}/{key}"

    def close(self) -> None:
        """Release connections (optional)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class _HashingWriter:
    """A write-only file wrapper that sha256-hashes what passes through."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh, self._h = fh, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ---- error translation: the generic table here, one table per backend in its module --------
class Outcome(Enum):
    """What a backend exception means for fedfs; each outcome is one class of :mod:`fedfs.errors`."""

    CONFLICT = "already exists"  # the key exists (an exclusive publish lost): Conflict
    NOT_FOUND = "not found"  # NotFound
    DENIED = "permission denied"  # the server refused the operation: StoreError
    UNAVAILABLE = "unavailable"  # nothing can have reached the server (refused connect, no login): StoreUnavailable
    CONNECTION_LOST = "connection lost"  # a write may have landed: StateUnknown; a read: StoreUnavailable
    FAILED = "failed"  # anything else the backend reports: StoreError


_LABELLED = (Outcome.CONFLICT, Outcome.NOT_FOUND, Outcome.DENIED)


@dataclass(frozen=True)
class Rule:
    """One row of an error table: an exception of ``cls`` for which ``when`` holds means ``outcome``.

    The message is ``"<where>: <label>"`` for the labelled outcomes (``"permission denied (<detail>)"``
    when ``detail`` is given), else ``"<where>: <detail>"``, by default the exception's class and text.
    """

    cls: type[BaseException] | tuple[type[BaseException], ...]
    outcome: Outcome
    when: Callable[[BaseException], bool] | None = None
    detail: Callable[[BaseException], str] | None = None

    def matches(self, exc: BaseException) -> bool:
        return isinstance(exc, self.cls) and (self.when is None or self.when(exc))

    def error(self, exc: BaseException, where: str, key: str, *, writing: bool) -> FedfsError:
        """The fedfs error this row makes of ``exc`` at ``key`` (described as ``where``)."""
        detail = self.detail(exc) if self.detail else None
        if self.outcome in _LABELLED:
            label = self.outcome.value
            text = f"{label} ({detail})" if detail and self.outcome is Outcome.DENIED else label
        else:
            text = detail or f"{type(exc).__name__}: {exc}"
        if self.outcome is Outcome.CONNECTION_LOST:
            cls: type[FedfsError] = StateUnknown if writing else StoreUnavailable
        else:
            cls = _ERROR_CLASS[self.outcome]
        return cls(f"{where}: {text}", key=key)


_ERROR_CLASS: dict[Outcome, type[FedfsError]] = {
    Outcome.CONFLICT: Conflict,
    Outcome.NOT_FOUND: NotFound,
    Outcome.DENIED: StoreError,
    Outcome.UNAVAILABLE: StoreUnavailable,
    Outcome.FAILED: StoreError,
}

#: A backend's table: rows tried in order, the first that matches decides.
ErrorTable = tuple[Rule, ...]


def errno_in(*codes: int) -> Callable[[BaseException], bool]:
    """A ``Rule.when`` that holds for an OSError carrying one of ``codes``."""
    return lambda exc: getattr(exc, "errno", None) in codes


#: The generic table, tried after the backend's own: builtins and errno codes, as a folder (and
#: anything that already speaks OSError, s3fs included) raises them.
OS_ERRORS: ErrorTable = (
    Rule(FileExistsError, Outcome.CONFLICT),
    Rule(FileNotFoundError, Outcome.NOT_FOUND),
    Rule(PermissionError, Outcome.DENIED, detail=str),
    Rule((ConnectionError, TimeoutError), Outcome.CONNECTION_LOST),
    Rule(OSError, Outcome.CONFLICT, when=errno_in(errno.EEXIST)),
    Rule(OSError, Outcome.NOT_FOUND, when=errno_in(errno.ENOENT)),
    Rule(OSError, Outcome.CONNECTION_LOST, when=errno_in(errno.EHOSTUNREACH, errno.ENETUNREACH)),
)
_ANYTHING_ELSE = Rule(BaseException, Outcome.FAILED)


def translate(store: Store, exc: BaseException, key: str, *, writing: bool = False) -> FedfsError:
    """The fedfs error for backend exception ``exc``: the store's table first, then :data:`OS_ERRORS`."""
    rule = next((r for r in (*store.error_table, *OS_ERRORS) if r.matches(exc)), _ANYTHING_ELSE)
    return rule.error(exc, store.describe(key), key, writing=writing)


@contextlib.contextmanager
def translate_errors(store: Store, key: str, *, writing: bool = False) -> Iterator[None]:
    """Raise every backend exception inside as its fedfs error (:func:`translate`), carrying ``key``.

    ``writing`` marks a step whose effect may already be visible: a connection lost there
    is :class:`StateUnknown`, elsewhere :class:`StoreUnavailable`.
    """
    try:
        yield
    except FedfsError as exc:
        if exc.key is None:
            exc.key = key
        raise
    except Exception as exc:
        raise translate(store, exc, key, writing=writing) from exc


def too_large(store: Store, key: str, limit: int) -> TooLarge:
    return TooLarge(f"{store.describe(key)}: larger than the {limit}-byte limit for this kind of file", key=key)
