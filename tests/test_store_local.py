"""The conformance suite on a local folder (``path`` and ``file://`` URLs)."""

from __future__ import annotations

import os

import pytest

from fedfs.errors import InvalidName
from fedfs.store import open_store
from fedfs.testing.store import StoreTests


class TestLocalPath(StoreTests):
    @pytest.fixture
    def url(self, tmp_path):
        return str(tmp_path / "bucket")


class TestFileURL(StoreTests):
    @pytest.fixture
    def url(self, tmp_path):
        return f"file://{tmp_path / 'bucket'}"


def test_symlinks_and_fifos_are_refused(tmp_path):
    store = open_store(str(tmp_path / "bucket"))
    store.write_bytes("sites/A/ok.json", b"{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("patient data")
    os.symlink(secret, tmp_path / "bucket" / "sites" / "A" / "link.json")
    os.mkfifo(tmp_path / "bucket" / "sites" / "A" / "fifo.json")
    os.symlink(tmp_path, tmp_path / "bucket" / "sites" / "B")
    with pytest.raises(InvalidName, match="symbolic link") as exc:
        store.read_bytes("sites/A/link.json")
    assert exc.value.key == "sites/A/link.json"
    with pytest.raises(InvalidName, match="not a regular file"):
        store.read_bytes("sites/A/fifo.json")  # would block forever if opened blindly
    with pytest.raises(InvalidName, match="outside the bucket"):
        store.read_bytes("sites/B/secret.txt")
    assert not store.exists("sites/A/link.json")
    assert "sites/A/link.json" not in store.list("sites/")


def test_os_errors_translate_by_class_and_errno(tmp_path):
    """The generic table: builtins and errno codes, each to its fedfs class, with the key."""
    import errno

    from fedfs.errors import Conflict, NotFound, StateUnknown, StoreError, StoreUnavailable
    from fedfs.store.base import translate

    store = open_store(str(tmp_path / "bucket"))
    where = store.describe("k.json")
    cases = [
        (FileExistsError("x"), False, Conflict, f"{where}: already exists"),
        (OSError(errno.EEXIST, "exists"), False, Conflict, f"{where}: already exists"),
        (OSError(errno.ENOENT, "gone"), False, NotFound, f"{where}: not found"),
        (PermissionError("no"), True, StoreError, f"{where}: permission denied (no)"),
        (ConnectionResetError("reset"), True, StateUnknown, f"{where}: ConnectionResetError: reset"),
        (TimeoutError("slow"), False, StoreUnavailable, f"{where}: TimeoutError: slow"),
        (OSError(errno.EHOSTUNREACH, "no route"), False, StoreUnavailable, None),
        (OSError(errno.EIO, "io"), False, StoreError, f"{where}: OSError: [Errno {errno.EIO}] io"),
        (RuntimeError("odd"), False, StoreError, f"{where}: RuntimeError: odd"),
    ]
    for exc, writing, cls, message in cases:
        err = translate(store, exc, "k.json", writing=writing)
        assert type(err) is cls and err.key == "k.json", (exc, err)
        assert message is None or str(err) == message
