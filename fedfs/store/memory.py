"""A bucket in memory: fast protocol tests, and a read-only view of a bundle's files.

``MemoryStore(files)`` holds its own dict of keys; ``open_store("memory://NAME")`` returns a
store over the process-wide space called NAME, so every store opened with that URL in one
process sees the same files (as fsspec's ``memory://`` does). Nothing is shared between
processes. Exclusive publish is a check-and-set under the space's lock, so threads (and
several stores over one space) race exactly as on the other backends.

A read-only store refuses every write with :class:`PermissionError`, which the error
translation turns into :class:`~fedfs.errors.StoreError` ("permission denied").
"""

from __future__ import annotations

import threading

from .base import Store, too_large

__all__ = ["MemoryStore", "forget"]


class _Space:
    """Files and the lock that guards them; shared by every store opened over it."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.lock = threading.Lock()


_NAMED: dict[str, _Space] = {}
_NAMED_LOCK = threading.Lock()


class MemoryStore(Store):
    """A complete Store over a dict: exclusive publish, thread-safe, optionally read-only."""

    probe_exclusive = False  # exclusive by construction (one lock, one dict)

    scheme = "memory"
    publish_mechanism = "lock"
    kind = "a memory bucket"

    def __init__(self, files: dict[str, bytes] | None = None, *, name: str = "memory",
                 read_only: bool = False) -> None:
        super().__init__(f"memory://{name}")
        self.name = name
        self.read_only = read_only
        self._space = _Space(files)

    @classmethod
    def named(cls, name: str, *, read_only: bool = False) -> MemoryStore:
        """A store over the process-wide space ``name`` (created empty on first use)."""
        with _NAMED_LOCK:
            space = _NAMED.setdefault(name, _Space())
        store = cls(name=name, read_only=read_only)
        store._space = space
        return store

    def describe(self, key: str) -> str:
        return f"{self.name}:{key}"

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.name} is read-only")

    # ---- primitives -------------------------------------------------------------
    def _read(self, key: str, max_size: int | None) -> bytes:
        with self._space.lock:
            data = self._space.files.get(key)
        if data is None:
            raise FileNotFoundError(key)
        if max_size is not None and len(data) > max_size:
            raise too_large(self, key, max_size)
        return data

    def _write(self, key: str, data: bytes) -> None:
        self._check_writable()
        data = bytes(data)
        with self._space.lock:
            self._space.files[key] = data

    def _publish(self, key: str, data: bytes) -> None:
        self._check_writable()
        data = bytes(data)
        with self._space.lock:
            if key in self._space.files:
                raise FileExistsError(key)
            self._space.files[key] = data

    def _exists(self, key: str) -> bool:
        with self._space.lock:
            return key in self._space.files

    def _list(self, prefix: str) -> list[str]:
        """Keys in the folder ``prefix`` (``[prefix]`` if it is a key), as the other backends list."""
        folder = prefix.rstrip("/")
        with self._space.lock:
            keys = list(self._space.files)
        if not folder:
            return keys
        if folder in keys:
            return [folder]
        return [k for k in keys if k.startswith(folder + "/")]

    def _size(self, key: str) -> int:
        return len(self._read(key, None))

    def _delete(self, key: str) -> None:
        self._check_writable()
        with self._space.lock:
            removed = self._space.files.pop(key, None)
        if removed is None:
            raise FileNotFoundError(key)


def forget(name: str) -> None:
    """Drop the process-wide space ``name`` (stores already open over it keep their files)."""
    with _NAMED_LOCK:
        _NAMED.pop(name, None)
