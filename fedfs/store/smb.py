"""The SMB (CIFS) backend, spoken directly with smbclient (smbprotocol), no mount needed.

URL: ``smb://[user@]host[:port]/share[/prefix/...]``. Options ``host``, ``port``,
``username`` and ``password`` override the URL; the username may also come from
``FEDFS_SMB_USER`` and the password from ``FEDFS_SMB_PASSWORD``. A password inside
the URL is refused (:class:`~fedfs.errors.ConfigError`): URLs end up in logs and
error messages, passwords must not.

How ``publish`` is exclusive and atomic
---------------------------------------
The payload is written to a unique hidden temporary file next to the target
(``.{name}.{uuid}.tmp``), closed, then *hard-linked* to the final name with an
SMB2 ``FileLinkInformation`` whose ``ReplaceIfExists`` is false; the temporary
name is removed afterwards whatever happened. A reader therefore sees either no
file or the complete file, and of two racing writers exactly one link succeeds:
the server answers ``STATUS_OBJECT_NAME_COLLISION`` to the other, which becomes
:class:`~fedfs.errors.Conflict`. This mirrors the local backend's ``os.link``.

Why a hard link and not a rename without replace: Samba implements
``ReplaceIfExists=False`` on rename as "stat the target, then rename(2)", which
silently overwrites when two clients (two smbd processes) race; measured here, 4
processes racing 300 keys produced 21 keys with two "winners". ``link(2)`` fails
atomically with EEXIST, so Samba's link has no such window (0 of 300). A create-
exclusive open of the final name is atomic too, but the file would be visible
while it is being written, and a crash would leave a truncated file under a
write-once name. Servers that refuse hard links (some NAS, FAT volumes) fall
back to rename without replace, which Windows/NTFS performs atomically; set the
option ``hardlinks=False`` to use that path from the start.

``write`` (hints, overwrite allowed) is temporary file + rename *with* replace.
Readers open files with full sharing (read/write/delete) so that such a replace
is never blocked by a reader, and keep reading the old content if it happens.

Errors: SMB status codes are translated here (smbprotocol's ``SMBOSError`` with
errno 17 is not a ``FileExistsError``; a refused TCP connect surfaces as
``ValueError``). A failure before anything could have become visible is
:class:`~fedfs.errors.StoreUnavailable`; one during the step that makes data
visible (link, replace, delete) is :class:`~fedfs.errors.StateUnknown`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import ntpath
import os
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import smbclient
from smbprotocol.connection import Connection
from smbprotocol.exceptions import (
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus

from ..errors import ConfigError, Conflict, FedfsError, NotFound, StateUnknown, StoreError, StoreUnavailable
from ..protocol.layout import check_key
from .base import CHUNK, Store, too_large

__all__ = ["SMBStore"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 445
_OPTIONS = {"host", "port", "username", "password", "encrypt", "timeout", "hardlinks"}

# Statuses meaning "this server/filesystem does not do hard links": fall back to rename.
_NO_LINK = {
    NtStatus.STATUS_NOT_SUPPORTED,
    NtStatus.STATUS_INVALID_DEVICE_REQUEST,
    NtStatus.STATUS_INVALID_INFO_CLASS,
    NtStatus.STATUS_INVALID_PARAMETER,
    getattr(NtStatus, "STATUS_NOT_IMPLEMENTED", 0xC0000002),
}
_BUSY = {NtStatus.STATUS_SHARING_VIOLATION, NtStatus.STATUS_ACCESS_DENIED, NtStatus.STATUS_DELETE_PENDING}
_UNREACHABLE = {
    NtStatus.STATUS_LOGON_FAILURE,
    NtStatus.STATUS_BAD_NETWORK_NAME,
    NtStatus.STATUS_USER_SESSION_DELETED,
    NtStatus.STATUS_NETWORK_NAME_DELETED,
    getattr(NtStatus, "STATUS_WRONG_PASSWORD", 0xC000006A),
    getattr(NtStatus, "STATUS_PASSWORD_EXPIRED", 0xC0000071),
    getattr(NtStatus, "STATUS_ACCOUNT_DISABLED", 0xC0000072),
}


def is_temp_name(name: str) -> bool:
    """True for this backend's in-flight temporary files, which listings hide."""
    return name.startswith(".") and name.endswith(".tmp")


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, SMBOSError):
        return exc.ntstatus
    if isinstance(exc, SMBResponseException):
        return exc.status
    return None


def _is_connection_failure(exc: BaseException) -> bool:
    """A transport-level failure: refused/dropped TCP, timeouts, closed SMB connection."""
    if isinstance(exc, (ConnectionError, TimeoutError, SMBConnectionClosed)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, SMBOSError) and exc.errno is not None:
        return exc.errno in {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EPIPE}
    # smbprotocol wraps a failed TCP connect as ValueError("Failed to connect to 'host:port': ...").
    return isinstance(exc, ValueError) and str(exc).startswith("Failed to connect to")


class SMBStore(Store):
    """A bucket on an SMB share (Samba, Windows, NAS), with a hard-link exclusive publish."""

    scheme = "smb"

    def __init__(self, url: str, **options: Any) -> None:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigError(f"unknown SMB option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
        parts = urlsplit(url)
        if parts.scheme != "smb":
            raise ConfigError(f"{url!r} is not an smb:// URL")
        if parts.password is not None:
            raise ConfigError("put the SMB password in FEDFS_SMB_PASSWORD or the 'password' option, not in the URL")
        self.host: str = options.get("host") or parts.hostname or ""
        if not self.host:
            raise ConfigError(f"{url!r} names no SMB host")
        try:
            self.port = int(options.get("port") or parts.port or DEFAULT_PORT)
        except ValueError as exc:
            raise ConfigError(f"bad SMB port in {url!r}") from exc
        self.username: str | None = (
            options.get("username")
            or (unquote(parts.username) if parts.username else None)
            or os.environ.get("FEDFS_SMB_USER")
            or None
        )
        self._password: str | None = options.get("password") or os.environ.get("FEDFS_SMB_PASSWORD") or None
        self._encrypt: bool | None = options.get("encrypt")
        self._timeout = float(options.get("timeout", 30))
        self._hardlinks = bool(options.get("hardlinks", True))
        #: How publish is made exclusive, for ``fedfs doctor``: "link", or "rename" where links are refused.
        self.publish_mechanism = "link" if self._hardlinks else "rename"

        segments = [unquote(s) for s in parts.path.split("/") if s]
        if not segments:
            raise ConfigError(f"{url!r} names no share: use smb://host/share[/prefix]")
        self.share, prefix = segments[0], "/".join(segments[1:])
        if prefix:
            check_key(prefix)
        self.prefix = prefix
        user = f"{self.username}@" if self.username else ""
        super().__init__(f"smb://{user}{self.host}:{self.port}/{'/'.join(segments)}")

        self._root = "\\\\" + self.host + "\\" + self.share + ("\\" + prefix.replace("/", "\\") if prefix else "")
        self._cache: dict[str, Any] = {}  # this store's own smbclient connection pool
        self._lock = threading.Lock()
        self._share_seen = False
        self._client_guid = uuid.uuid4()
        self._pool_key = f"{self.host.lower()}:{self.port}"  # smbclient's key for its connection pool

    # ---- plumbing -------------------------------------------------------------
    @property
    def _kw(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "password": self._password,
            "port": self.port,
            "connection_timeout": self._timeout,
            "connection_cache": self._cache,
            **({"encrypt": self._encrypt} if self._encrypt is not None else {}),
        }

    def _path(self, key: str) -> str:
        return self._root + ("\\" + key.replace("/", "\\") if key else "")

    def _connect(self, key: str) -> None:
        """Make sure a session exists (serialised, so threads share one connection)."""
        with self._errors(key, writing=False), self._lock:
            # Our own connection with our own client GUID: smbclient would give every connection
            # of the process the same GUID, and Samba (multichannel) then hands concurrent
            # connections between its processes, which was seen to hang session setup.
            pooled = self._cache.get(self._pool_key)
            if pooled is None or not pooled.transport.connected:
                connection = Connection(self._client_guid, self.host, self.port)
                connection.connect(timeout=self._timeout)
                self._cache[self._pool_key] = connection
            smbclient.register_session(
                self.host,
                username=self.username,
                password=self._password,
                port=self.port,
                encrypt=self._encrypt,
                connection_timeout=self._timeout,
                connection_cache=self._cache,
            )
            if not self._share_seen:
                # A missing share otherwise looks like a missing key (STATUS_NOT_FOUND from DFS).
                try:
                    smbclient.stat(f"\\\\{self.host}\\{self.share}", **self._kw)
                except SMBOSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    raise StoreUnavailable(f"{self.url}: no share {self.share!r} on {self.host}") from exc
                self._share_seen = True

    @contextlib.contextmanager
    def _errors(self, key: str, *, writing: bool) -> Iterator[None]:
        """Translate smbprotocol's exceptions; ``writing`` marks steps whose effect may be visible."""
        where = self.describe(key)
        try:
            yield
        except FedfsError:
            raise
        except (SMBOSError, SMBResponseException) as exc:
            status = _status_of(exc)
            if status == NtStatus.STATUS_OBJECT_NAME_COLLISION or getattr(exc, "errno", None) == errno.EEXIST:
                raise Conflict(f"{where}: already exists") from exc
            if getattr(exc, "errno", None) == errno.ENOENT or status in {
                NtStatus.STATUS_OBJECT_NAME_NOT_FOUND,
                NtStatus.STATUS_OBJECT_PATH_NOT_FOUND,
                NtStatus.STATUS_NOT_FOUND,
            }:
                raise NotFound(f"{where}: not found") from exc
            if status in _UNREACHABLE:
                raise StoreUnavailable(f"{where}: {_status_name(status)} (check share name and credentials)") from exc
            if status == NtStatus.STATUS_ACCESS_DENIED:
                raise StoreError(f"{where}: permission denied") from exc
            raise StoreError(f"{where}: {_status_name(status)}: {exc}") from exc
        except SMBAuthenticationError as exc:
            raise StoreUnavailable(f"{where}: SMB login failed ({exc})") from exc
        except Exception as exc:
            if _is_connection_failure(exc):
                cls = StateUnknown if writing else StoreUnavailable
                raise cls(f"{where}: {type(exc).__name__}: {exc}") from exc
            raise

    def _ensure_parent(self, path: str) -> None:
        smbclient.makedirs(ntpath.dirname(path), exist_ok=True, **self._kw)

    def _open_temp(self, final: str) -> tuple[str, BinaryIO]:
        """Create ``.{name}.{uuid}.tmp`` beside ``final`` (making parents on demand)."""
        tmp = ntpath.join(ntpath.dirname(final), f".{ntpath.basename(final)}.{uuid.uuid4().hex}.tmp")
        try:
            fd = smbclient.open_file(tmp, mode="xb", buffering=0, **self._kw)
        except SMBOSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self._ensure_parent(final)
            fd = smbclient.open_file(tmp, mode="xb", buffering=0, **self._kw)
        return tmp, fd

    def _write_temp(self, final: str, chunks: Iterator[bytes]) -> str:
        tmp, fd = self._open_temp(final)
        try:
            with fd:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[fd.write(view) :]
        except BaseException:
            self._discard(tmp)
            raise
        return tmp

    def _discard(self, tmp: str) -> None:
        """Best-effort removal of a temporary file; a leftover is hidden from listings."""
        try:
            smbclient.remove(tmp, **self._kw)
        except SMBOSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not remove temporary file %s: %s", tmp, exc)
        except Exception as exc:  # connection gone: leave it, it is invisible
            log.warning("could not remove temporary file %s: %s", tmp, exc)

    def _commit(self, key: str, tmp: str, *, replace: bool) -> bool:
        """Make ``tmp`` visible as ``key``, exclusively or replacing; True if ``tmp`` is gone."""
        final = self._path(key)
        with self._errors(key, writing=True):
            if replace:
                self._replace(tmp, final)
                return True
            if self._hardlinks:
                try:
                    smbclient.link(tmp, final, **self._kw)
                    return False  # tmp is now a second name of the published file
                except SMBOSError as exc:
                    if exc.ntstatus not in _NO_LINK:
                        raise
                    log.warning("%s: server refuses hard links (%s); publishing by rename", self.url, exc)
                    self._hardlinks = False
                    self.publish_mechanism = "rename"
            smbclient.rename(tmp, final, **self._kw)
            return True

    def _replace(self, tmp: str, final: str, attempts: int = 8) -> None:
        for attempt in range(attempts):
            try:
                smbclient.replace(tmp, final, **self._kw)
                return
            except SMBOSError as exc:
                if exc.ntstatus not in _BUSY or attempt == attempts - 1:
                    raise
                time.sleep(0.02 * 2**attempt)  # e.g. a Windows reader holding the old file open

    def _put(self, key: str, chunks: Iterator[bytes], *, replace: bool) -> None:
        self._connect(key)
        with self._errors(key, writing=False):  # nothing is visible before the commit
            tmp = self._write_temp(self._path(key), chunks)
        try:
            consumed = self._commit(key, tmp, replace=replace)
        except BaseException:
            self._discard(tmp)
            raise
        if not consumed:
            self._discard(tmp)

    # ---- primitives -------------------------------------------------------------
    def _read(self, key: str, max_size: int | None) -> bytes:
        self._connect(key)
        limit = None if max_size is None else max_size + 1
        out = bytearray()
        with self._errors(key, writing=False):
            with smbclient.open_file(self._path(key), mode="rb", buffering=0, share_access="rwd", **self._kw) as fd:
                while limit is None or len(out) < limit:
                    want = CHUNK if limit is None else min(CHUNK, limit - len(out))
                    block = fd.read(want)
                    if not block:
                        break
                    out += block
        if max_size is not None and len(out) > max_size:
            raise too_large(self, key, max_size)
        return bytes(out)

    def _download(self, key: str, fh: BinaryIO) -> None:
        self._connect(key)
        with self._errors(key, writing=False):
            with smbclient.open_file(self._path(key), mode="rb", buffering=0, share_access="rwd", **self._kw) as fd:
                while block := fd.read(CHUNK):
                    fh.write(block)

    def _write(self, key: str, data: bytes) -> None:
        self._put(key, iter((data,)), replace=True)

    def _publish(self, key: str, data: bytes) -> None:
        self._put(key, iter((data,)), replace=False)

    def _upload(self, key: str, local_path: str) -> None:
        with open(local_path, "rb") as fh:
            self._put(key, iter(lambda: fh.read(CHUNK), b""), replace=True)

    def _stat(self, key: str) -> os.stat_result | None:
        self._connect(key)
        with self._errors(key, writing=False):
            try:
                st = smbclient.stat(self._path(key), **self._kw)
            except SMBOSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                raise
        return st if stat_mod.S_ISREG(st.st_mode) else None

    def _exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def _size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise NotFound(f"{self.describe(key)}: not found")
        return st.st_size

    def _delete(self, key: str) -> None:
        self._connect(key)
        with self._errors(key, writing=True):
            smbclient.remove(self._path(key), **self._kw)

    def _list(self, prefix: str) -> list[str]:
        """Keys in the folder ``prefix`` (recursive; ``[prefix]`` if it is a key), temp files hidden.

        Same semantics as the local and S3 backends: ``prefix`` names a folder, not a
        string prefix, and folders whose name starts with '.' are skipped.
        """
        self._connect(prefix or "/")
        folder = prefix.rstrip("/")
        keys: list[str] = []
        with self._errors(prefix or "/", writing=False):
            if folder and self._stat(folder) is not None:
                return [folder]
            self._walk(folder, keys)
        return keys

    def _walk(self, rel_dir: str, out: list[str]) -> None:
        try:
            found = [(e.name, e.is_dir()) for e in smbclient.scandir(self._path(rel_dir), **self._kw)]
        except SMBOSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # a missing folder lists as empty
            raise
        for name, is_dir in found:
            key = f"{rel_dir}/{name}" if rel_dir else name
            if is_dir:
                if not name.startswith("."):
                    self._walk(key, out)
            elif not is_temp_name(name):
                out.append(key)

    def close(self) -> None:
        with self._lock:
            smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self._cache)


def _status_name(status: int | None) -> str:
    if status is None:
        return "SMB error"
    for name, value in vars(NtStatus).items():
        if name.startswith("STATUS_") and value == status:
            return name
    return f"NTSTATUS 0x{status:08x}"
