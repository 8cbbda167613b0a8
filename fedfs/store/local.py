"""A folder as a bucket: a local disk or a mounted NFS/CIFS share.

Exclusive publish writes a unique temporary file in the target folder, fsyncs
it, then ``os.link``s it to the final name: ``link`` fails with EEXIST when the
name is taken (``rename`` would silently replace it), and the final name never
points at a partial file. Shares whose server refuses hard links (some CIFS
mounts) fall back to an ``O_CREAT|O_EXCL`` open of the final name, which is
still exclusive; readers treat a manifest that does not parse as not yet
committed only on such shares (``fedfs doctor`` reports which mechanism is in use).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from typing import BinaryIO

from ..errors import InvalidName
from .base import CHUNK, Store, too_large

__all__ = ["LocalStore"]

_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".incomplete"))


class LocalStore(Store):
    """A folder as a bucket, with an ``os.link`` exclusive publish."""

    scheme = "file"
    #: A folder raises only OSErrors: the generic table (base.OS_ERRORS) is this backend's table.
    error_table = ()

    kind = "a folder bucket"

    def __init__(self, url: str, root: str, *, create: bool = True) -> None:
        """``create=False`` (read-only commands, opening a federation) leaves a missing folder missing:
        a mistyped path must not appear on disk; :meth:`missing_root` then names it."""
        super().__init__(url)
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)
        self.local_path = self.root
        self.real_root = os.path.realpath(self.root)
        self.publish_mechanism = "link"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def missing_root(self) -> str | None:
        if os.path.isdir(self.root):
            return None
        return f"{self.root}: no such folder (a mistyped path? `fedfs init` creates the bucket folder)"

    def _tmp_for(self, path: str) -> str:
        d, name = os.path.split(path)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")

    @staticmethod
    def _write_file(path: str, data: bytes, flags: int) -> None:
        fd = os.open(path, flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_regular(self, key: str) -> int:
        """Open ``key`` for reading only if it is a regular file inside the bucket: a symbolic
        link (to /etc/passwd, say) or a FIFO planted in a shared folder is refused, not followed."""
        path = self._path(key)
        parent = os.path.realpath(os.path.dirname(path))
        if parent != self.real_root and not parent.startswith(self.real_root + os.sep):
            raise InvalidName(f"{self.describe(key)}: lies outside the bucket through a symbolic link", key=key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidName(f"{self.describe(key)}: is a symbolic link; refusing to follow it", key=key) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidName(f"{self.describe(key)}: is not a regular file", key=key)
        return fd

    def _read(self, key: str, max_size: int | None) -> bytes:
        with os.fdopen(self._open_regular(key), "rb") as fh:
            if max_size is not None:
                data = fh.read(max_size + 1)
                if len(data) > max_size:
                    raise too_large(self, key, max_size)
                return data
            return fh.read()

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            self._write_file(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            self._write_file(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                os.link(tmp, path)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                self.publish_mechanism = "o_excl"
                self._write_file(path, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._path(key)).st_mode)
        except FileNotFoundError:
            return False

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if os.path.isfile(base):
            return [prefix]
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if _is_temp(name) or os.path.islink(os.path.join(dirpath, name)):
                    continue
                out.append(name if rel == "." else f"{rel}/{name}")
        return out

    def _size(self, key: str) -> int:
        st = os.lstat(self._path(key))
        if not stat.S_ISREG(st.st_mode):
            raise InvalidName(f"{self.describe(key)}: is not a regular file", key=key)
        return st.st_size

    def _delete(self, key: str) -> None:
        os.unlink(self._path(key))

    def _upload(self, key: str, local_path: str) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            shutil.copyfile(local_path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _download(self, key: str, fh: BinaryIO) -> None:
        with os.fdopen(self._open_regular(key), "rb") as src:
            shutil.copyfileobj(src, fh, CHUNK)
