"""The Store interface every backend implements, and the one error-translation table.

A store is a flat key/value space of bytes under one root URL. Keys are relative,
``/``-separated, validated by :func:`fedfs.protocol.layout.check_key`. Backends implement
six primitives; everything about signatures, digests and documents lives above,
in :mod:`fedfs.trust.bucket`, so a new backend is only these few methods.

``publish`` is the one that matters: it is *exclusive* (put-if-absent) and
atomic, so a reader never sees a half-written published file and two writers of
the same key cannot both succeed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import (
    Conflict,
    FedfsError,
    NotFound,
    StateUnknown,
    StoreError,
    StoreUnavailable,
    TooLarge,
)
from ..protocol.layout import check_key

CHUNK = 8 * 1024 * 1024


class Store(ABC):
    """A bucket backend: bytes under keys, with an exclusive publish."""

    #: URL scheme(s) this backend serves, for messages.
    scheme: str = ""
    #: True where changes can be watched with inotify (a local, non-network folder).
    local_path: str | None = None

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
            from ..errors import IntegrityError

            raise IntegrityError(
                f"{self.describe(key)}: sha256 {digest} does not match the manifest's {expected_sha256}"
            )
        os.replace(tmp, local_path)
        return digest

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


# Errors that mean "nothing was written, the server said no": conflict or absence.
_CONFLICT_ERRNOS = {errno.EEXIST}
_NOTFOUND_ERRNOS = {errno.ENOENT}
_UNAVAILABLE_NAMES = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionClosed",
    "SMBConnectionClosed",
    "NoCredentialsError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
)


@contextlib.contextmanager
def translate_errors(store: Store, key: str, *, writing: bool = False) -> Iterator[None]:
    """Translate backend exceptions into the fedfs tree. The one place that does it.

    A write that dies with a connection error may have reached the server:
    for writes it becomes :class:`StateUnknown`; for reads, :class:`StoreUnavailable`.
    """
    where = store.describe(key)
    try:
        yield
    except FedfsError:
        raise
    except FileExistsError as exc:
        raise Conflict(f"{where}: already exists") from exc
    except FileNotFoundError as exc:
        raise NotFound(f"{where}: not found") from exc
    except PermissionError as exc:
        raise StoreError(f"{where}: permission denied ({exc})") from exc
    except (ConnectionError, TimeoutError) as exc:
        cls = StateUnknown if writing else StoreUnavailable
        raise cls(f"{where}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        if exc.errno in _CONFLICT_ERRNOS:
            raise Conflict(f"{where}: already exists") from exc
        if exc.errno in _NOTFOUND_ERRNOS:
            raise NotFound(f"{where}: not found") from exc
        raise StoreError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # botocore / aiohttp / smbprotocol specific classes
        name = type(exc).__name__
        text = str(exc)
        if "PreconditionFailed" in text or "412" in text and "Precondition" in text:
            raise Conflict(f"{where}: already exists") from exc
        if "NoSuchKey" in text or "404" in text or "STATUS_OBJECT_NAME_NOT_FOUND" in text:
            raise NotFound(f"{where}: not found") from exc
        if "STATUS_OBJECT_NAME_COLLISION" in text:
            raise Conflict(f"{where}: already exists") from exc
        if name in _UNAVAILABLE_NAMES or any(n in text for n in _UNAVAILABLE_NAMES):
            cls = StateUnknown if writing else StoreUnavailable
            raise cls(f"{where}: {name}: {text}") from exc
        raise StoreError(f"{where}: {name}: {text}") from exc


def too_large(store: Store, key: str, limit: int) -> TooLarge:
    return TooLarge(f"{store.describe(key)}: larger than the {limit}-byte limit for this kind of file")
