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

__all__ = ["MemoryStore", "Store", "open_store", "sha256_file", "translate_errors"]


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open the bucket at ``url`` with backend ``storage_options``."""
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
        return LocalStore(url, path, **opts)
    if scheme in ("s3", "s3a"):
        from .s3 import S3Store

        if not parsed.netloc or len(parsed.netloc) < 3:
            raise ConfigError(f"{url}: an S3 URL needs a bucket name of at least 3 characters (s3://bucket/prefix)")
        return S3Store(url, f"{parsed.netloc}{parsed.path}", **opts)
    if scheme == "smb":
        from .smb import SMBStore

        return SMBStore(url, **opts)
    if scheme == "memory":
        if opts:
            raise ConfigError(f"{url}: a memory bucket takes no storage options (got {', '.join(sorted(opts))})")
        return MemoryStore.named((parsed.netloc + parsed.path).strip("/") or "memory")
    raise ConfigError(f"{url}: unsupported bucket URL scheme {scheme!r} (use a path, file://, s3:// or smb://)")
