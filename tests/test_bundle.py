"""Air-gap bundles: a site with no bucket access takes part through signed tar files.

Site C never opens the shared bucket. The coordinator exports what C needs, C imports
it into its private folder, runs its steps there with :class:`fedfs.testing.toy.ToyWork`,
exports what it produced, and the coordinator imports that into the bucket, where the
aggregator folds C's update into the next global. Tampered bundles are refused with
the reason and leave the bucket untouched.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedfs import layout
from fedfs.roles.aggregator import Aggregator
from fedfs.ops.bundle import MANIFEST_NAME, BundleFile, BundleManifest, import_bundle
from fedfs.cli import main
from fedfs.protocol.documents import canonical_json, loads_strict
from fedfs.errors import Conflict, IntegrityError, InvalidName, SignatureError
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import BlobRef, GlobalManifest, Heartbeat, LatestHint, SiteCensus
from fedfs.trust.signing import generate_keypair, load_identity
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork

FEDFS = str(Path(sys.executable).with_name("fedfs"))


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A 2-round sync FFE federation where C contributes only through bundles, run up to v1."""
    root = tmp_path_factory.mktemp("airgap")
    keys = root / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in "ABC":
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, ["A", "B", "C"], rounds=2)
    bucket = root / "bucket"
    fed, _ = Federation.create(str(bucket), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), root / "agg")
    online = {s: Site(fed.as_party(keys / f"{s}.key"), ToyWork(s, cases=c, seed=i + 1), root / f"site-{s}")
              for i, (s, c) in enumerate([("A", 4), ("B", 2)])}
    private = root / "C-private"  # C's own folder: the only storage C ever touches
    c_work, c_site = ToyWork("C", cases=3, seed=3), None
    exchanges = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a busy machine
    try:
        for i in range(10):
            aggregator.step()
            for s in online.values():
                s.step()
            to_c, from_c = root / f"to-C-{i}.tar", root / f"from-C-{i}.tar"
            cli("bundle", "export", bucket, "--for", "C", "--key", keys / "agg.key", "-o", to_c)
            cli("bundle", "import", to_c, private, "--federation-digest", fed.digest)
            if c_site is None:
                c_site = Site(Federation.open(str(private), identity=keys / "C.key", pin=fed.digest), c_work,
                              root / "site-C")
            step = c_site.step()
            cli("bundle", "export", private, "--from", "C", "--key", keys / "C.key", "-o", from_c)
            cli("bundle", "import", from_c, bucket)
            exchanges.append((str(step).split(":")[0], to_c, from_c))
            if step.action == "update":
                break
    finally:
        torch.set_num_threads(threads)
    assert aggregator.step().action == "aggregated"
    return {"fed": fed, "keys": keys, "bucket": bucket, "private": private, "exchanges": exchanges,
            "aggregator": aggregator, "c_site": c_site}


def test_offline_site_contributes_an_update(offline):
    fed, exchanges = offline["fed"], offline["exchanges"]
    # C went through the whole FFE set-up and a round, one bundle exchange per step
    assert [e[0] for e in exchanges] == ["census", "fingerprint", "planned", "update"]
    v1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert [(c.site, c.round, c.weight) for c in v1.contributions] == [("A", 0, 4.0), ("B", 0, 2.0), ("C", 0, 3.0)]
    assert v1.contributions[2].key == layout.site_update("C", 0)
    # everything C wrote reached the bucket signed by C, and its heartbeat too
    assert fed.store.exists(layout.site_census("C")) and fed.store.exists(layout.site_plans("C"))
    assert fed.bucket.read(layout.site_heartbeat("C"), Heartbeat).signer == "C"
    # the from-bundle of the last step carried exactly C's new update, its payload and the hints
    with tarfile.open(exchanges[-1][2]) as tar:
        names = sorted(m.name for m in tar)
    blobs = [n for n in names if "/blobs/" in n]
    assert len(blobs) == 1 and blobs[0].startswith("bucket/sites/C/blobs/")
    assert "bucket/sites/C/updates/r000000.json" in names and "bucket/sites/C/heartbeat.json" in names
    assert not any(n.startswith("bucket/aggregator/") or n.startswith("bucket/sites/A") for n in names)
    # the to-bundle that let C train held the newest global with its weights, and the hint
    with tarfile.open(exchanges[-1][1]) as tar:
        names = {m.name for m in tar}
    assert {MANIFEST_NAME, "bucket/federation.json", "bucket/aggregator/latest.json",
            "bucket/aggregator/globals/v000000.json"} <= names


def test_next_round_reaches_the_offline_site(offline, tmp_path):
    fed, keys, private = offline["fed"], offline["keys"], offline["private"]
    to_c = tmp_path / "to-C.tar"
    cli("bundle", "export", fed.store.url, "--for", "C", "--key", keys / "agg.key", "-o", to_c)
    out = cli("bundle", "import", to_c, private)
    assert "written" in out
    local = Federation.open(str(private))
    assert local.bucket.read(layout.LATEST, LatestHint).doc.version == 1
    assert local.store.exists(layout.global_version(1))


def test_import_is_idempotent(offline):
    bucket, from_c = offline["bucket"], offline["exchanges"][-1][2]
    before = snapshot(bucket)
    result = import_bundle(from_c, str(bucket))
    assert result.published == []
    assert layout.site_update("C", 0) in result.present
    assert snapshot(bucket) == before


# ---- tampering ---------------------------------------------------------------------------------
def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _resign(members: dict[str, bytes], identity) -> dict[str, bytes]:
    """Re-list every member and sign the manifest with ``identity`` (a valid bundle by that signer)."""
    env = loads_strict(members[MANIFEST_NAME], "manifest")
    body = env["body"]
    files = [BundleFile(key=n[len("bucket/"):], sha256=hashlib.sha256(d).hexdigest(), size=len(d))
             for n, d in members.items() if n != MANIFEST_NAME]
    manifest = BundleManifest(federation_id=body["federation_id"], federation_digest=body["federation_digest"],
                              purpose=body["purpose"], party=body["party"], created=body["created"], files=files)
    return {**members, MANIFEST_NAME: canonical_json(identity.sign(manifest.to_dict()))}


@pytest.fixture
def update_bundle(offline):
    return _members(offline["exchanges"][-1][2])


def _refused(offline, bad: Path, exc_type, match: str):
    bucket = offline["bucket"]
    before = snapshot(bucket)
    with pytest.raises(exc_type, match=match):
        import_bundle(bad, str(bucket))
    assert snapshot(bucket) == before  # nothing written


def test_changed_byte_is_refused(offline, update_bundle, tmp_path):
    name = next(n for n in update_bundle if "/blobs/" in n)
    data = bytearray(update_bundle[name])
    data[-1] ^= 0x01
    bad = _write(tmp_path / "bad.tar", {**update_bundle, name: bytes(data)})
    _refused(offline, bad, IntegrityError, "does not match the bundle manifest's sha256/size")


def test_path_traversal_and_unlisted_files_are_refused(offline, update_bundle, tmp_path):
    evil = _write(tmp_path / "evil.tar", {**update_bundle, "bucket/../../etc/cron.d/evil": b"* * * * * root sh"})
    _refused(offline, evil, InvalidName, "not a safe bucket key")
    outside = _write(tmp_path / "outside.tar", {**update_bundle, "../evil.json": b"{}"})
    _refused(offline, outside, InvalidName, "lies outside bucket/")
    extra = _write(tmp_path / "extra.tar", {**update_bundle, "bucket/sites/C/notes.json": b"{}"})
    _refused(offline, extra, IntegrityError, "not listed in the signed bundle manifest")


def test_wrong_signer_is_refused(offline, update_bundle, tmp_path):
    # a key that claims to be C but is not the one federation.json lists
    impostor = tmp_path / "impostor"
    generate_keypair("C", "site", impostor)
    bad = _write(tmp_path / "impostor.tar", _resign(update_bundle, load_identity(impostor / "C.key")))
    _refused(offline, bad, SignatureError, "signature by 'C' does not verify")
    generate_keypair("mallory", "site", impostor)
    bad = _write(tmp_path / "mallory.tar", _resign(update_bundle, load_identity(impostor / "mallory.key")))
    _refused(offline, bad, SignatureError, "'mallory', who is not a member")


def test_document_in_another_partys_location_is_refused(offline, update_bundle, tmp_path):
    # a valid bundle by C that smuggles a global "signed" by C into the aggregator's folder
    c = load_identity(offline["keys"] / "C.key")
    ref = BlobRef(key=layout.site_blob("C", "1" * 64), sha256="1" * 64, size=1)
    fake = GlobalManifest(version=7, site_blobs={"C": ref})
    members = {**update_bundle, "bucket/" + layout.global_version(7): canonical_json(c.sign(fake.to_dict()))}
    bad = _write(tmp_path / "smuggle.tar", _resign(members, c))
    _refused(offline, bad, SignatureError, "only the aggregator may write here")


def test_conflicting_document_is_refused(offline, update_bundle, tmp_path):
    # C re-signs a different census at a key the bucket already holds: write-once wins
    c = load_identity(offline["keys"] / "C.key")
    census = SiteCensus(site="C", num_cases=99, num_channels=1)
    members = {**update_bundle, "bucket/" + layout.site_census("C"): canonical_json(c.sign(census.to_dict()))}
    bad = _write(tmp_path / "conflict.tar", _resign(members, c))
    _refused(offline, bad, Conflict, "already holds a different document")


def test_cli_error_is_one_line_with_exit_code(offline, update_bundle, tmp_path):
    name = next(n for n in update_bundle if n.endswith("r000000.json"))
    bad = _write(tmp_path / "bad.tar", {**update_bundle, name: update_bundle[name].replace(b'"round":0', b'"round":1')})
    proc = subprocess.run([FEDFS, "bundle", "import", str(bad), str(offline["bucket"])], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("fedfs: error: bad.tar: ") and len(proc.stderr.strip().splitlines()) == 1
    # exporting needs a key, and a bundle into an empty folder needs the federation pin
    result = CliRunner().invoke(main, ["bundle", "export", str(offline["bucket"]), "--for", "C", "-o",
                                       str(tmp_path / "x.tar")])
    assert result.exit_code != 0 and "needs this party's private key" in str(result.exception)
    with pytest.raises(Exception, match="give --federation-digest"):
        import_bundle(offline["exchanges"][0][1], str(tmp_path / "empty"))
