"""The conformance suite on a local folder (``path`` and ``file://`` URLs)."""

from __future__ import annotations

import pytest

from store_conformance import StoreConformance


class TestLocalPath(StoreConformance):
    @pytest.fixture
    def url(self, tmp_path):
        return str(tmp_path / "bucket")


class TestFileURL(StoreConformance):
    @pytest.fixture
    def url(self, tmp_path):
        return f"file://{tmp_path / 'bucket'}"


def test_symlinks_and_fifos_are_refused(tmp_path):
    import os

    import pytest

    from fedfs.errors import InvalidName
    from fedfs.store import open_store

    store = open_store(str(tmp_path / "bucket"))
    store.write_bytes("sites/A/ok.json", b"{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("patient data")
    os.symlink(secret, tmp_path / "bucket" / "sites" / "A" / "link.json")
    os.mkfifo(tmp_path / "bucket" / "sites" / "A" / "fifo.json")
    os.symlink(tmp_path, tmp_path / "bucket" / "sites" / "B")
    with pytest.raises(InvalidName, match="symbolic link"):
        store.read_bytes("sites/A/link.json")
    with pytest.raises(InvalidName, match="not a regular file"):
        store.read_bytes("sites/A/fifo.json")  # would block forever if opened blindly
    with pytest.raises(InvalidName, match="outside the bucket"):
        store.read_bytes("sites/B/secret.txt")
    assert not store.exists("sites/A/link.json")
    assert "sites/A/link.json" not in store.list("sites/")
