"""The SMB (CIFS) backend, spoken directly with smbclient (smbprotocol), no mount needed.

URL ``smb://[user@]host[:port]/share[/prefix/...]``; the options, the credentials and the
session are :mod:`fedfs.store.smb_session`'s. This module is the file operations.

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

Errors: :data:`SMB_ERRORS` translates smbprotocol's exceptions by class and NTSTATUS code
(``SMBOSError`` with errno 17 is not a ``FileExistsError``; a refused TCP connect surfaces
as a ``ValueError`` caused by the socket's ``OSError``). A failure before anything could
have become visible is :class:`~fedfs.errors.StoreUnavailable`; one during the step that
makes data visible (link, replace, delete) is :class:`~fedfs.errors.StateUnknown`.
"""

from __future__ import annotations

import errno
import logging
import ntpath
import os
import stat as stat_mod
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import smbclient
from smbprotocol.exceptions import (
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus

from ..errors import NotFound
from .base import CHUNK, ErrorTable, Outcome, Rule, Store, too_large, translate_errors
from .smb_session import OPTIONS, SMBLocation, SMBSession

__all__ = ["SMBStore", "SMB_ERRORS", "is_temp_name"]

log = logging.getLogger(__name__)

#: NTSTATUS codes some smbprotocol releases do not name.
_UNNAMED = {"STATUS_NOT_IMPLEMENTED": 0xC0000002, "STATUS_WRONG_PASSWORD": 0xC000006A,
            "STATUS_PASSWORD_EXPIRED": 0xC0000071, "STATUS_ACCOUNT_DISABLED": 0xC0000072}


def _statuses(*names: str) -> frozenset[int]:
    return frozenset(getattr(NtStatus, name, None) or _UNNAMED[name] for name in names)


# Statuses meaning "this server/filesystem does not do hard links": fall back to rename.
_NO_LINK = _statuses("STATUS_NOT_SUPPORTED", "STATUS_INVALID_DEVICE_REQUEST", "STATUS_INVALID_INFO_CLASS",
                     "STATUS_INVALID_PARAMETER", "STATUS_NOT_IMPLEMENTED")
# Statuses of a replace that a reader or a pending delete is holding up: retry.
_BUSY = _statuses("STATUS_SHARING_VIOLATION", "STATUS_ACCESS_DENIED", "STATUS_DELETE_PENDING")
# Statuses meaning "wrong share or login": nothing was done.
_UNREACHABLE = _statuses("STATUS_LOGON_FAILURE", "STATUS_BAD_NETWORK_NAME", "STATUS_USER_SESSION_DELETED",
                         "STATUS_NETWORK_NAME_DELETED", "STATUS_WRONG_PASSWORD", "STATUS_PASSWORD_EXPIRED",
                         "STATUS_ACCOUNT_DISABLED")


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, SMBOSError):
        return exc.ntstatus
    if isinstance(exc, SMBResponseException):
        return exc.status
    return None


def _status_name(status: int | None) -> str:
    if status is None:
        return "SMB error"
    for name, value in (*vars(NtStatus).items(), *_UNNAMED.items()):
        if name.startswith("STATUS_") and value == status:
            return name
    return f"NTSTATUS 0x{status:08x}"


def _status_in(statuses: frozenset[int]) -> Callable[[BaseException], bool]:
    return lambda exc: _status_of(exc) in statuses


_SMB_STATUS = (SMBOSError, SMBResponseException)

#: smbprotocol's exceptions -> fedfs outcomes (tried before base.OS_ERRORS).
SMB_ERRORS: ErrorTable = (
    Rule(_SMB_STATUS, Outcome.CONFLICT, when=_status_in(_statuses("STATUS_OBJECT_NAME_COLLISION"))),
    Rule(_SMB_STATUS, Outcome.NOT_FOUND, when=_status_in(_statuses(
        "STATUS_OBJECT_NAME_NOT_FOUND", "STATUS_OBJECT_PATH_NOT_FOUND", "STATUS_NOT_FOUND"))),
    Rule(_SMB_STATUS, Outcome.UNAVAILABLE, when=_status_in(_UNREACHABLE),
         detail=lambda exc: f"{_status_name(_status_of(exc))} (check share name and credentials)"),
    Rule(_SMB_STATUS, Outcome.DENIED, when=_status_in(_statuses("STATUS_ACCESS_DENIED"))),
    Rule(_SMB_STATUS, Outcome.FAILED, detail=lambda exc: f"{_status_name(_status_of(exc))}: {exc}"),
    Rule(SMBAuthenticationError, Outcome.UNAVAILABLE, detail=lambda exc: f"SMB login failed ({exc})"),
    Rule(SMBConnectionClosed, Outcome.CONNECTION_LOST),
    # smbprotocol raises a failed TCP connect as ValueError("Failed to connect ...") from the OSError.
    Rule(ValueError, Outcome.UNAVAILABLE, when=lambda exc: isinstance(exc.__cause__, OSError)),
)


def is_temp_name(name: str) -> bool:
    """True for this backend's in-flight temporary files, which listings hide."""
    return name.startswith(".") and name.endswith(".tmp")


class SMBStore(Store):
    """A bucket on an SMB share (Samba, Windows, NAS), with a hard-link exclusive publish."""

    scheme = "smb"
    error_table = SMB_ERRORS
    accepted_options = OPTIONS
    kind = "an SMB bucket"

    def __init__(self, url: str, **options: Any) -> None:
        location = SMBLocation.parse(url, options)
        super().__init__(location.url)
        self.host, self.port, self.share = location.host, location.port, location.share
        self.prefix, self.username = location.prefix, location.username
        self._hardlinks = location.hardlinks
        #: How publish is made exclusive, for ``fedfs doctor``: "link", or "rename" where links are refused.
        self.publish_mechanism = "link" if self._hardlinks else "rename"
        self._root = location.root
        self._session = SMBSession(location)

    # ---- plumbing -------------------------------------------------------------
    @property
    def _kw(self) -> dict[str, Any]:
        return self._session.kw

    def _path(self, key: str) -> str:
        return self._root + ("\\" + key.replace("/", "\\") if key else "")

    def _connect(self, key: str) -> None:
        with translate_errors(self, key):
            self._session.connect()

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
        with translate_errors(self, key, writing=True):
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
        with translate_errors(self, key, writing=False):  # nothing is visible before the commit
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
        with translate_errors(self, key):
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
        with translate_errors(self, key):
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
        with translate_errors(self, key):
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
            raise NotFound(f"{self.describe(key)}: not found", key=key)
        return st.st_size

    def _delete(self, key: str) -> None:
        self._connect(key)
        with translate_errors(self, key, writing=True):
            smbclient.remove(self._path(key), **self._kw)

    def _list(self, prefix: str) -> list[str]:
        """Keys in the folder ``prefix`` (recursive; ``[prefix]`` if it is a key), temp files hidden.

        Same semantics as the local and S3 backends: ``prefix`` names a folder, not a
        string prefix, and folders whose name starts with '.' are skipped.
        """
        self._connect(prefix or "/")
        folder = prefix.rstrip("/")
        keys: list[str] = []
        with translate_errors(self, prefix or "/"):
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
        self._session.close()
