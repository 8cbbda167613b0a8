"""One conformance suite for every bucket backend (subclass and provide ``url``/``options``).

Modelled on zarr's ``StoreTests`` and fsspec's abstract tests: every backend
must behave the same for the protocol to be trustworthy.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import threading

import pytest

from fedfs import layout
from fedfs.trust.bucket import Bucket
from fedfs.errors import ConfigError, Conflict, IntegrityError, InvalidName, NotFound, SignatureError, TooLarge
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import SiteCensus

from fedfs.store import open_store


def _race_publish(url, options, key, i, barrier, results):
    store = open_store(url, options)
    barrier.wait()
    try:
        store.publish(key, f'{{"writer":"p{i}"}}'.encode())
        results.put(("win", f"p{i}"))
    except Conflict:
        results.put(("conflict", f"p{i}"))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))


class StoreConformance:
    """Generic tests; subclasses define the ``url`` and ``options`` fixtures."""

    @pytest.fixture
    def options(self):
        return {}

    @pytest.fixture
    def store(self, url, options):
        s = open_store(url, options)
        yield s
        s.close()

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
        assert "nope/x.json" in str(exc.value)
        assert isinstance(exc.value, FileNotFoundError)

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
        assert "big.bin" in str(exc.value)

    def test_exclusive_publish(self, store):
        store.publish("m/manifest.json", b"first")
        with pytest.raises(Conflict) as exc:
            store.publish("m/manifest.json", b"second")
        assert isinstance(exc.value, FileExistsError)
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
        key = "race/threads.json"
        n = 8
        barrier = threading.Barrier(n)
        wins, conflicts, errors = [], [], []

        def go(i):
            barrier.wait()
            try:
                store.publish(key, f'{{"writer":"t{i}"}}'.encode())
                wins.append(i)
            except Conflict:
                conflicts.append(i)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
        assert len(wins) == 1 and len(conflicts) == n - 1
        assert store.read_bytes(key) == f'{{"writer":"t{wins[0]}"}}'.encode()

    def test_race_processes(self, url, options):
        key = "race/processes.json"
        n = 8
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race_publish, args=(url, options, key, i, barrier, results)) for i in range(n)]
        [p.start() for p in procs]
        outcomes = [results.get(timeout=120) for _ in range(n)]
        [p.join(timeout=60) for p in procs]
        wins = [w for kind, w in outcomes if kind == "win"]
        assert [o for o in outcomes if o[0] == "error"] == []
        assert len(wins) == 1 and sum(kind == "conflict" for kind, _ in outcomes) == n - 1
        assert open_store(url, options).read_bytes(key) == f'{{"writer":"{wins[0]}"}}'.encode()

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
        from fedfs.ops.doctor import run_doctor

        report = run_doctor(store)
        assert report.ok, report.render()
        names = [c.name for c in report.checks]
        assert "exclusive publish" in names and "concurrent exclusive publish" in names
