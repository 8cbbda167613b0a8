"""The conformance suite on the in-memory backend, and what is particular to it."""

from __future__ import annotations

import uuid

import pytest

from fedfs.errors import ConfigError, StoreError
from fedfs.store import MemoryStore, open_store
from fedfs.store import memory
from fedfs.testing.store import StoreTests


class TestMemory(StoreTests):
    shared_between_processes = False  # memory://NAME is one space per process

    @pytest.fixture
    def url(self):
        name = f"t-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        memory.forget(name)


def test_one_url_is_one_space_per_process():
    name = f"t-{uuid.uuid4().hex[:12]}"
    open_store(f"memory://{name}").publish("a/b.json", b"1")
    again = open_store(f"memory://{name}")
    assert again.read_bytes("a/b.json") == b"1"
    assert again.url == f"memory://{name}" and again.describe("a/b.json") == f"{name}:a/b.json"
    memory.forget(name)
    assert not open_store(f"memory://{name}").exists("a/b.json")
    with pytest.raises(ConfigError):
        open_store(f"memory://{name}", {"colour": "blue"})


def test_own_files_and_folder_listing():
    files = {"sites/A/plans.json": b"{}", "sites/A/updates/r000001.json": b"x", "sites/AB/plans.json": b"y"}
    store = MemoryStore(files, name="bundle.tar")
    store.publish("aggregator/latest.json", b"z")
    assert "aggregator/latest.json" not in files  # the store keeps its own copy
    assert store.list("sites/A/") == ["sites/A/plans.json", "sites/A/updates/r000001.json"]
    assert store.list("sites/A") == store.list("sites/A/")  # a folder, not a string prefix
    assert store.list("sites/A/plans.json") == ["sites/A/plans.json"]
    assert store.list("sites/A/upd") == []
    assert store.size("sites/AB/plans.json") == 1


def test_read_only_refuses_writes_as_permission_denied():
    store = MemoryStore({"federation.json": b"{}"}, name="site-A.tar", read_only=True)
    assert store.read_bytes("federation.json") == b"{}"
    for write in (lambda: store.write_bytes("x.json", b"1"), lambda: store.publish("x.json", b"1"),
                  lambda: store.delete("federation.json")):
        with pytest.raises(StoreError) as exc:
            write()
        assert type(exc.value) is StoreError and exc.value.key in ("x.json", "federation.json")
        assert str(exc.value).endswith(": permission denied (site-A.tar is read-only)")
    assert store.list() == ["federation.json"]
