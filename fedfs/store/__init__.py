"""Bucket backends. :func:`open_store` turns a URL into a :class:`Store`.

=========================================  ============================================
URL                                        backend
=========================================  ============================================
``/path``, ``file:///path``                :class:`~fedfs.store.local.LocalStore` (also mounted NFS/CIFS shares)
``s3://bucket/prefix``                     :class:`~fedfs.store.s3.S3Store` (s3fs)
``smb://[user@]host[:port]/share/prefix``  :class:`~fedfs.store.smb.SMBStore` (smbprotocol)
``memory://NAME``                          :class:`~fedfs.store.memory.MemoryStore`: the process-wide
                                           space NAME (tests, simulations; nothing leaves the process)
=========================================  ============================================

Each backend's module declares the table that translates its library's exceptions into
:mod:`fedfs.errors` (``Store.error_table``, see :mod:`fedfs.store.base`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError
from .base import Store, sha256_file, translate_errors
from .memory import MemoryStore
from .options import check_storage_options

__all__ = ["MemoryStore", "Store", "open_store", "sha256_file", "translate_errors"]


def open_store(url: str, storage_options: dict[str, Any] | None = None, *, create: bool = True) -> Store:
    """Open the bucket at ``url`` with backend ``storage_options`` (checked against the backend's
    ``accepted_options``). ``create=False`` never makes anything: a missing folder stays missing."""
    opts = dict(storage_options or {})
    if not url:
        raise ConfigError("bucket URL is empty")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        from .local import LocalStore

        path = parsed.path if scheme == "file" else url
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file:// URLs must name a local path (file:///path)")
        _check(url, LocalStore, opts)
        return LocalStore(url, path, create=create)
    if scheme in ("s3", "s3a"):
        from .s3 import S3Store

        if not parsed.netloc or len(parsed.netloc) < 3:
            raise ConfigError(f"{url}: an S3 URL needs a bucket name of at least 3 characters (s3://bucket/prefix)")
        _check(url, S3Store, opts)
        return S3Store(url, f"{parsed.netloc}{parsed.path}", **opts)
    if scheme == "smb":
        from .smb import SMBStore

        _check(url, SMBStore, opts)
        return SMBStore(url, **opts)
    if scheme == "memory":
        _check(url, MemoryStore, opts)
        return MemoryStore.named((parsed.netloc + parsed.path).strip("/") or "memory")
    raise ConfigError(f"{url}: unsupported bucket URL scheme {scheme!r} (use a path, file://, s3:// or smb://)")


def _check(url: str, backend: type[Store], opts: dict[str, Any]) -> None:
    check_storage_options(url, backend.kind, opts, backend.accepted_options)
