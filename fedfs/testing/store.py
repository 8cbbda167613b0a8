"""One conformance suite for every bucket backend, shipped in the package as zarr ships
``zarr.testing.store``: a backend's test is a short subclass that supplies the ``url`` (and,
where needed, ``options``) fixtures::

    from fedfs.testing.store import StoreTests

    class TestMyBackend(StoreTests):
        @pytest.fixture
        def url(self, tmp_path):
            return str(tmp_path / "bucket")

Every backend must behave the same for the protocol to be trustworthy: primitives, key
checks, exclusive publish under races, and the signed protocol on top. The suite needs
pytest, so :mod:`fedfs.testing` does not import this module.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..errors import ConfigError, Conflict, IntegrityError, InvalidName, NotFound, SignatureError, TooLarge
from ..federation import Federation, config_from_key_dir
from ..protocol import layout
from ..protocol.schema import SiteCensus
from ..store import Store, open_store
from ..trust.bucket import Bucket

__all__ = ["StoreTests"]


def _publish_racing(store: Store, key: str, writer: str, barrier: Any, results: Any) -> None:
    """One racer: wait for the others, publish ``key`` as ``writer``, report the outcome."""
    barrier.wait()
    try:
        store.publish(key, f'{{"writer":"{writer}"}}'.encode())
        results.put(("win", writer))
    except Conflict:
        results.put(("conflict", writer))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", f"{writer}: {type(exc).__name__}: {exc}"))


def _race_publish(url: str, options: dict[str, Any], key: str, writer: str, barrier: Any, results: Any) -> None:
    """A racer with a store of its own (in a process of its own where the backend allows)."""
    store = open_store(url, options)
    try:
        _publish_racing(store, key, writer, barrier, results)
    finally:
        store.close()


def _race(racers: list[Any], results: Any, store: Store, key: str) -> None:
    """Run ``racers``; exactly one must win, every other must see Conflict, the winner's bytes must stay."""
    [r.start() for r in racers]
    outcomes = [results.get(timeout=120) for _ in racers]
    [r.join(timeout=60) for r in racers]
    assert [o for o in outcomes if o[0] == "error"] == [], outcomes
    wins = [writer for kind, writer in outcomes if kind == "win"]
    assert len(wins) == 1 and sum(kind == "conflict" for kind, _ in outcomes) == len(racers) - 1, outcomes
    assert store.read_bytes(key) == f'{{"writer":"{wins[0]}"}}'.encode()


class StoreTests:
    """Generic tests; subclasses define the ``url`` fixture and, if needed, ``options``."""

    #: False for a backend whose URL means nothing in another process (``memory://``):
    #: the separate-stores race then runs its racers as threads instead of processes.
    shared_between_processes = True

    @pytest.fixture
    def options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def store(self, url: str, options: dict[str, Any]) -> Iterator[Store]:
        s = open_store(url, options)
        yield s
        s.close()

    @pytest.fixture
    def keys(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """Keys for an aggregator and sites A, B, C (generated once per session)."""
        from ..trust.signing import generate_keypair

        d = tmp_path_factory.getbasetemp() / "fedfs-store-tests-keys"
        if not (d / "agg.key").exists():
            generate_keypair("agg", "aggregator", d)
            for site in ("A", "B", "C"):
                generate_keypair(site, "site", d)
        return d

    # ---- primitives ------------------------------------------------------------
    def test_write_read_round_trip(self, store):
        store.write_bytes("a/b/c.json", b'{"x":1}')
        assert store.read_bytes("a/b/c.json") == b'{"x":1}'
        assert store.exists("a/b/c.json")
        assert store.size("a/b/c.json") == 7

    def test_overwrite_is_allowed_for_hints(self, store):
        store.write_bytes("hint.json", b"1")
        store.write_bytes("hint.json", b"22")
        assert store.read_bytes("hint.json") == b"22"

    def test_missing_key(self, store):
        assert not store.exists("nope/x.json")
        with pytest.raises(NotFound) as exc:
            store.read_bytes("nope/x.json")
        assert "nope/x.json" in str(exc.value) and exc.value.key == "nope/x.json"
        assert isinstance(exc.value, FileNotFoundError)
        with pytest.raises(NotFound) as exc:
            store.size("nope/x.json")
        assert exc.value.key == "nope/x.json"

    def test_list_by_prefix_is_recursive_and_sorted(self, store):
        for k in ("p/one.json", "p/sub/two.json", "q/three.json"):
            store.write_bytes(k, b"x")
        store.publish("p/sub/four.json", b"y")
        assert store.list("p/") == ["p/one.json", "p/sub/four.json", "p/sub/two.json"]
        assert store.list("missing/") == []
        assert set(store.list()) >= {"p/one.json", "q/three.json"}

    def test_max_size(self, store):
        store.write_bytes("big.bin", b"x" * 1000)
        assert store.read_bytes("big.bin", max_size=1000) == b"x" * 1000
        with pytest.raises(TooLarge) as exc:
            store.read_bytes("big.bin", max_size=999)
        assert "big.bin" in str(exc.value) and exc.value.key == "big.bin"

    def test_exclusive_publish(self, store):
        store.publish("m/manifest.json", b"first")
        with pytest.raises(Conflict) as exc:
            store.publish("m/manifest.json", b"second")
        assert isinstance(exc.value, FileExistsError) and exc.value.key == "m/manifest.json"
        assert store.read_bytes("m/manifest.json") == b"first"
        assert store.list("m/") == ["m/manifest.json"]  # no temporary file left behind

    def test_unsafe_keys_are_refused_before_io(self, store):
        for bad in ("../x", "/abs", "a//b", "a/../b", "", "a\\b", "a/./b"):
            with pytest.raises(InvalidName):
                store.write_bytes(bad, b"x")
        assert store.list() == []

    def test_upload_download_stream_with_sha(self, store, tmp_path):
        src = tmp_path / "src.bin"
        data = os.urandom(3 * 1024 * 1024 + 17)
        src.write_bytes(data)
        store.upload("blobs/big.bin", str(src))
        dst = tmp_path / "dst.bin"
        digest = store.download("blobs/big.bin", str(dst), expected_sha256=hashlib.sha256(data).hexdigest())
        assert dst.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
        with pytest.raises(IntegrityError):
            store.download("blobs/big.bin", str(tmp_path / "bad.bin"), expected_sha256="0" * 64)
        assert not (tmp_path / "bad.bin").exists()

    # ---- races -----------------------------------------------------------------
    def test_race_threads(self, store):
        """Threads racing to publish one key through one store."""
        key, n = "race/threads.json", 8
        barrier, results = threading.Barrier(n), queue.Queue()
        racers = [threading.Thread(target=_publish_racing, args=(store, key, f"t{i}", barrier, results))
                  for i in range(n)]
        _race(racers, results, store, key)

    def test_race_separate_stores(self, url, options):
        """Racers that each open their own store: processes, or threads where the URL is per-process."""
        key, n = "race/separate.json", 8
        if self.shared_between_processes:
            ctx = mp.get_context("spawn")
            barrier, results, racer = ctx.Barrier(n), ctx.Queue(), ctx.Process
        else:
            barrier, results, racer = threading.Barrier(n), queue.Queue(), threading.Thread
        racers = [racer(target=_race_publish, args=(url, options, key, f"p{i}", barrier, results)) for i in range(n)]
        _race(racers, results, open_store(url, options), key)

    # ---- the signed protocol on this backend -------------------------------------
    def test_signed_documents_round_trip(self, store, keys):
        config, agg = config_from_key_dir(keys, ["A", "B", "C"])
        fed, created = Federation.create(store, config, agg)
        assert created
        a = fed.as_party(keys / "A.key")
        a.bucket.publish(layout.site_census("A"), SiteCensus(site="A", num_cases=3, num_channels=1), a.identity)
        got = fed.bucket.read(layout.site_census("A"), SiteCensus)
        assert got.doc.num_cases == 3 and got.signer == "A"
        # re-running the same deterministic step is idempotent; different content conflicts
        a.bucket.publish(layout.site_census("A"), SiteCensus(site="A", num_cases=3, num_channels=1), a.identity)
        with pytest.raises(Conflict):
            a.bucket.publish(layout.site_census("A"), SiteCensus(site="A", num_cases=4, num_channels=1), a.identity)
        # a site cannot write into another site's folder, and a forgery placed there is refused
        with pytest.raises(ConfigError):
            a.bucket.publish(layout.site_census("B"), SiteCensus(site="A", num_cases=3, num_channels=1), a.identity)
        assert not store.exists(layout.site_census("B"))
        store.publish(layout.site_census("B"), json.dumps(a.identity.sign(SiteCensus("B", 3, 1).to_dict())).encode())
        with pytest.raises(SignatureError):
            fed.bucket.read(layout.site_census("B"), SiteCensus)

    def test_blob_round_trip_and_corruption(self, store, keys, tmp_path):
        config, agg = config_from_key_dir(keys, ["A", "B", "C"])
        fed, _ = Federation.create(store, config, agg)
        b = Bucket(store, fed.config)
        data = os.urandom(200_000)
        ref = b.put_blob_bytes(lambda sha, ext: layout.site_blob("A", sha, ext), data)
        assert b.get_blob_bytes(ref, max_size=1 << 20) == data
        path = b.get_blob_file(ref, str(tmp_path / "x.safetensors"))
        assert open(path, "rb").read() == data
        store.write_bytes(ref.key, data[:-1] + bytes([data[-1] ^ 1]))  # bit flip, same size
        with pytest.raises(IntegrityError):
            b.get_blob_bytes(ref, max_size=1 << 20)
        with pytest.raises(IntegrityError):
            b.get_blob_file(ref, str(tmp_path / "y.safetensors"))

    def test_doctor_reports_usable(self, store):
        from ..ops.doctor import run_doctor

        report = run_doctor(store)
        assert report.ok, report.render()
        names = [c.name for c in report.checks]
        assert "exclusive publish" in names and "concurrent exclusive publish" in names
