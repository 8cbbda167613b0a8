"""SMBStore against a real Samba server on loopback (fails, never skips, without samba)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

import pytest

from fedfs.errors import ConfigError, Conflict, NotFound, StoreUnavailable, TooLarge
from fedfs.store import smb as smb_module
from fedfs.store import translate_errors
from fedfs.store.smb import SMBStore

try:
    from .samba_server import SambaInfo, samba_server
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from samba_server import SambaInfo, samba_server

# A wedged SMB server makes smbprotocol wait forever: fail fast instead of at the global 900 s.
pytestmark = pytest.mark.timeout(120)

@pytest.fixture(scope="module")
def samba(tmp_path_factory: pytest.TempPathFactory):
    with samba_server(tmp_path_factory.mktemp("samba")) as info:
        yield info


def _store(info: SambaInfo, prefix: str, **options) -> SMBStore:
    return SMBStore(f"{info.url}/{prefix}", password=info.password, **options)


@pytest.fixture
def store(samba: SambaInfo):
    """A store rooted at a fresh prefix of the share, so tests do not see each other."""
    s = _store(samba, f"t-{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


def _share_files(info: SambaInfo, store: SMBStore) -> list[str]:
    """Every file under the store's folder, read from disk behind Samba's back."""
    root = Path(info.root) / store.prefix
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_write_read_round_trip_and_overwrite(store: SMBStore) -> None:
    store.write_bytes("a/b/hint.json", b'{"v": 1}')
    assert store.read_bytes("a/b/hint.json") == b'{"v": 1}'
    store.write_bytes("a/b/hint.json", b'{"v": 2}')
    assert store.read_bytes("a/b/hint.json") == b'{"v": 2}'


def test_read_missing_key_is_not_found(store: SMBStore) -> None:
    with pytest.raises(NotFound):
        store.read_bytes("nothing/here.json")
    with pytest.raises(FileNotFoundError):  # the builtin still catches it
        store.read_bytes("missing.json")


def test_publish_twice_conflicts_and_keeps_first(samba: SambaInfo, store: SMBStore) -> None:
    assert store.publish_mechanism == "link"
    store.publish("sites/A/updates/r000001.json", b"first")
    with pytest.raises(Conflict):
        store.publish("sites/A/updates/r000001.json", b"second")
    assert store.read_bytes("sites/A/updates/r000001.json") == b"first"
    assert _share_files(samba, store) == ["sites/A/updates/r000001.json"]  # temp files removed


def test_publish_by_rename_fallback(samba: SambaInfo) -> None:
    store = _store(samba, f"t-{uuid.uuid4().hex[:12]}", hardlinks=False)
    assert store.publish_mechanism == "rename"
    store.publish("k.json", b"first")
    with pytest.raises(Conflict):
        store.publish("k.json", b"second")
    assert store.read_bytes("k.json") == b"first"
    assert _share_files(samba, store) == ["k.json"]


def test_list_is_recursive_by_prefix_and_hides_temp_files(samba: SambaInfo, store: SMBStore) -> None:
    for key in ("sites/A/plans.json", "sites/A/updates/r000001.json", "sites/B/plans.json", "aggregator/latest.json"):
        store.publish(key, b"x")
    stray = Path(samba.root) / store.prefix / "sites/A/.r000002.json.deadbeef.tmp"
    stray.write_bytes(b"half")
    assert store.list() == [
        "aggregator/latest.json",
        "sites/A/plans.json",
        "sites/A/updates/r000001.json",
        "sites/B/plans.json",
    ]
    assert store.list("sites/A/") == ["sites/A/plans.json", "sites/A/updates/r000001.json"]
    assert store.list("sites/A/updates/") == ["sites/A/updates/r000001.json"]
    assert store.list("sites/A/updates") == ["sites/A/updates/r000001.json"]  # a folder, with or without '/'
    assert store.list("sites/A/upd") == []  # not a string prefix (same as the local and S3 backends)
    assert store.list("sites/A/plans.json") == ["sites/A/plans.json"]
    assert store.list("sites/C/") == []
    assert store.list("nowhere/at/all/") == []


def test_max_size(store: SMBStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.write_bytes("doc.json", b"0123456789" * 1000)
    assert len(store.read_bytes("doc.json", max_size=10_000)) == 10_000
    read_sizes: list[int] = []
    real_open = smb_module.smbclient.open_file

    def counting_open(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        real_read = fd.read

        def read(n: int = -1) -> bytes:
            block = real_read(n)
            read_sizes.append(len(block))
            return block

        fd.read = read
        return fd

    monkeypatch.setattr(smb_module.smbclient, "open_file", counting_open)
    with pytest.raises(TooLarge):
        store.read_bytes("doc.json", max_size=100)
    assert sum(read_sizes) <= 101


def test_size_exists_delete(store: SMBStore) -> None:
    store.publish("a/b.bin", b"12345")
    assert store.size("a/b.bin") == 5
    assert store.exists("a/b.bin")
    assert not store.exists("a/c.bin")
    assert not store.exists("a")  # a folder is not a key
    with pytest.raises(NotFound):
        store.size("a/c.bin")
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    with pytest.raises(NotFound):
        store.delete("a/b.bin")


def test_upload_download_20mb_streams(tmp_path: Path, store: SMBStore, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "weights.safetensors"
    data = os.urandom(20 * 1024 * 1024)
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    def no_whole_file(*_args, **_kwargs):
        raise AssertionError("upload/download must stream, not go through _read/_write")

    monkeypatch.setattr(store, "_write", no_whole_file)
    monkeypatch.setattr(store, "_read", no_whole_file)
    store.upload("blobs/w.safetensors", str(src))
    assert store.size("blobs/w.safetensors") == len(data)
    out = tmp_path / "copy.safetensors"
    assert store.download("blobs/w.safetensors", str(out), expected_sha256=digest) == digest
    assert out.read_bytes() == data


@pytest.mark.parametrize("connections", ["one shared", "one per writer"])
def test_publish_race_has_exactly_one_winner(samba: SambaInfo, connections: str) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    writers = 8
    shared = _store(samba, prefix)
    stores = [shared] * writers if connections == "one shared" else [_store(samba, prefix) for _ in range(writers)]
    for round_ in range(5):
        key = f"aggregator/globals/v{round_:06d}.json"
        barrier = threading.Barrier(writers)
        outcome: dict[int, str] = {}

        def publish(i: int) -> None:
            payload = f"writer {i} ".encode() * 5000
            barrier.wait()
            try:
                stores[i].publish(key, payload)
                outcome[i] = "won"
            except Conflict:
                outcome[i] = "conflict"
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome[i] = repr(exc)

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        assert sorted(outcome.values()).count("conflict") == writers - 1, outcome
        assert shared.read_bytes(key) == f"writer {winners[0]} ".encode() * 5000
    assert len(_share_files(samba, shared)) == 5  # no temp file left behind
    for s in set(stores):
        s.close()


def test_password_from_environment(samba: SambaInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFS_SMB_PASSWORD", samba.password)
    monkeypatch.setenv("FEDFS_SMB_USER", samba.username)
    store = SMBStore(f"smb://{samba.host}:{samba.port}/{samba.share}/t-env")
    store.write_bytes("x.json", b"1")
    assert store.read_bytes("x.json") == b"1"


def test_bad_credentials_and_missing_share_are_unavailable(samba: SambaInfo) -> None:
    with pytest.raises(StoreUnavailable):
        SMBStore(samba.url, password="wrong").read_bytes("x.json")
    with pytest.raises(StoreUnavailable):
        SMBStore(f"smb://{samba.username}@{samba.host}:{samba.port}/nosuch", password=samba.password).publish(
            "x.json", b"1"
        )


def test_unreachable_server_is_unavailable() -> None:
    store = SMBStore("smb://u@127.0.0.1:1/share", password="p", timeout=2)
    with pytest.raises(StoreUnavailable):
        store.read_bytes("x.json")
    with pytest.raises(StoreUnavailable):  # refused before anything was sent: nothing was written
        store.publish("x.json", b"1")


def test_url_validation() -> None:
    with pytest.raises(ConfigError):
        SMBStore("smb://user:secret@host/share")
    with pytest.raises(ConfigError):
        SMBStore("smb://host")
    with pytest.raises(ConfigError):
        SMBStore("smb://host/share", colour="blue")
    store = SMBStore("smb://alice@host:4450/share/fed/one", password="p")
    assert (store.host, store.port, store.share, store.prefix, store.username) == ("host", 4450, "share", "fed/one", "alice")
    assert "p" not in store.url.split("@")[0].split("//")[1].split(":")
    assert store.describe("a/b.json") == "smb://alice@host:4450/share/fed/one/a/b.json"


def _race_worker(url: str, password: str, writer: int, keys: int, barrier, results, hardlinks: bool) -> None:
    """Write the temporary file first, then commit in step with the others: the tightest race."""
    store = SMBStore(url, password=password, hardlinks=hardlinks)
    store._connect("race")
    won = []
    for k in range(keys):
        key = f"race/k{k:04d}.json"
        with translate_errors(store, key):
            tmp = store._write_temp(store._path(key), iter((f"writer {writer}".encode(),)))
        barrier.wait()
        try:
            if not store._commit(key, tmp, replace=False):
                store._discard(tmp)
            won.append(k)
        except Conflict:
            store._discard(tmp)
    store.close()
    results.put((writer, won))


def test_publish_race_across_processes(samba: SambaInfo) -> None:
    """Separate processes = separate smbd processes: the race Samba's rename loses (see smb.py)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    url, procs, keys = f"{samba.url}/t-{uuid.uuid4().hex[:12]}", 4, 100
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_race_worker, args=(url, samba.password, w, keys, barrier, results, True))
        for w in range(procs)
    ]
    for p in workers:
        p.start()
    outcome = [results.get(timeout=120) for _ in workers]
    for p in workers:
        p.join(timeout=30)
    winners: dict[int, list[int]] = {}
    for writer, won in outcome:
        for k in won:
            winners.setdefault(k, []).append(writer)
    assert sorted(winners) == list(range(keys))
    assert {k: w for k, w in winners.items() if len(w) != 1} == {}
    store = SMBStore(url, password=samba.password)
    assert store.read_bytes("race/k0007.json") == f"writer {winners[7][0]}".encode()


def test_smb_error_table() -> None:
    """smbprotocol's classes and NTSTATUS codes map to fedfs classes, with the key, without a server."""
    from smbprotocol.exceptions import SMBAuthenticationError, SMBConnectionClosed, SMBOSError
    from smbprotocol.header import NtStatus

    from fedfs.errors import StateUnknown, StoreError
    from fedfs.store.base import translate

    store = SMBStore("smb://alice@host:4450/share/fed", password="p")
    where = store.describe("k.json")

    def refused_connect() -> ValueError:
        try:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError as err:
                raise ValueError("Failed to connect to 'host:4450': [Errno 111] Connection refused") from err
        except ValueError as exc:
            return exc

    cases = [
        (SMBOSError(NtStatus.STATUS_OBJECT_NAME_COLLISION, "x"), True, Conflict, f"{where}: already exists"),
        (SMBOSError(NtStatus.STATUS_OBJECT_PATH_NOT_FOUND, "x"), False, NotFound, f"{where}: not found"),
        (SMBOSError(NtStatus.STATUS_ACCESS_DENIED, "x"), True, StoreError, f"{where}: permission denied"),
        (SMBOSError(NtStatus.STATUS_LOGON_FAILURE, "x"), True, StoreUnavailable,
         f"{where}: STATUS_LOGON_FAILURE (check share name and credentials)"),
        (SMBOSError(NtStatus.STATUS_DISK_FULL, "x"), True, StoreError, None),
        (SMBAuthenticationError("bad"), False, StoreUnavailable, f"{where}: SMB login failed (bad)"),
        (SMBConnectionClosed("gone"), True, StateUnknown, f"{where}: SMBConnectionClosed: gone"),
        (SMBConnectionClosed("gone"), False, StoreUnavailable, None),
        (refused_connect(), True, StoreUnavailable, None),  # nothing was sent
        (ValueError("not a connect failure"), False, StoreError, None),
    ]
    for exc, writing, cls, message in cases:
        err = translate(store, exc, "k.json", writing=writing)
        assert type(err) is cls and err.key == "k.json", (exc, err)
        assert message is None or str(err) == message, str(err)
    assert str(translate(store, cases[4][0], "k.json")).startswith(f"{where}: STATUS_DISK_FULL: ")
