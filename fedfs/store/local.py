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
import uuid
from typing import BinaryIO

from .base import CHUNK, Store, too_large

_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".incomplete"))


class LocalStore(Store):
    scheme = "file"

    def __init__(self, url: str, root: str, **options: object) -> None:
        super().__init__(url)
        if options:
            from ..errors import ConfigError

            raise ConfigError(f"{url}: a folder bucket takes no storage options (got {', '.join(sorted(options))})")
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.local_path = self.root
        self.publish_mechanism = "link"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

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

    def _read(self, key: str, max_size: int | None) -> bytes:
        with open(self._path(key), "rb") as fh:
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
        return os.path.isfile(self._path(key))

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if os.path.isfile(base):
            return [prefix]
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if _is_temp(name):
                    continue
                out.append(name if rel == "." else f"{rel}/{name}")
        return out

    def _size(self, key: str) -> int:
        return os.stat(self._path(key)).st_size

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
        with open(self._path(key), "rb") as src:
            shutil.copyfileobj(src, fh, CHUNK)
