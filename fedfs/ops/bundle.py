"""Air-gap bundles: carry exactly the bucket files one step needs across removable media.

A site with no access to the shared bucket still takes part. The coordinator
exports what the site needs (``--for SITE``): ``federation.json``, the census
and merged fingerprint, the newest global manifest with the site's weights, the
``latest`` hint. The site imports that into a private folder bucket, runs its
steps there, exports what it produced (``--from SITE``: census, fingerprint
summary, plans, new update manifests with their payloads, heartbeat), and the
coordinator imports that into the real bucket, where the aggregator picks it up.

A bundle is a tar file: ``fedfs-bundle.json`` (a signed envelope listing each
file's key, sha256 and size, signed by the exporting party) and the files under
``bucket/<key>``. Nothing in a bundle is trusted for being there. Import:

1. reads every member as a regular file with a safe key (no ``..``, no absolute
   path, no link), within size limits, and refuses any member not listed and
   any listed file that is missing;
2. verifies the bundle's signature against ``federation.json`` (the destination's,
   or, for an empty destination, the bundle's own one pinned with
   ``--federation-digest``) and every file's sha256 and size;
3. verifies each document like :meth:`fedfs.trust.bucket.Bucket.read` (envelope,
   signer, role for its location, signature, schema, key binding), and each
   payload against a document in the bundle that names it;
4. checks that write-once files already at the destination are identical;
5. only then writes: payloads, then documents with exclusive publish (identical
   files already there are fine, so an import may be repeated), then the mutable
   hints, each only if newer than the destination's.

Any failure in 1-4 writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..protocol import layout
from ..protocol.documents import MAX_DOCUMENT_BYTES, Document, canonical_json, document, loads_strict, require
from ..errors import ConfigError, Conflict, FedfsError, IntegrityError, InvalidName, NotFound, SchemaError, SignatureError

if TYPE_CHECKING:
    from ..trust.bucket import Signed
    from ..federation import Federation
    from ..store import Store

__all__ = ["BundleManifest", "BundleFile", "export_bundle", "import_bundle", "ImportResult", "ExportResult"]

MANIFEST_NAME = "fedfs-bundle.json"
MEMBER_PREFIX = "bucket/"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_BLOB_BYTES = 4 * 1024**3
MAX_MEMBERS = 100_000


@document("bundle-file")
class BundleFile(Document):
    key: str
    sha256: str
    size: int


@document("bundle")
class BundleManifest(Document):
    """The signed table of contents of a bundle."""

    federation_id: str
    federation_digest: str
    purpose: str  # "for": what ``party`` needs; "from": what ``party`` produced
    party: str
    created: str
    files: list[BundleFile]

    def validate(self, where: str) -> None:
        require(self.purpose in ("for", "from"), where, f"purpose must be 'for' or 'from', got {self.purpose!r}")
        layout.check_name(self.party, "party name")
        seen = set()
        for f in self.files:
            layout.check_key(f.key)
            layout.check_sha256(f.sha256)
            require(f.size >= 0, where, f"{f.key}: size must be >= 0")
            require(f.key not in seen, where, f"{f.key} is listed twice")
            seen.add(f.key)


# ---- which documents live where ------------------------------------------------------------
MUTABLE_SUFFIXES = ("heartbeat.json", "status.json")


def document_class(key: str) -> type[Document] | None:
    """The document class a key holds, or None if it is not a fedfs document key."""
    from ..protocol.schema import (Census, FingerprintSummary, GlobalFingerprint, GlobalManifest, Heartbeat, LatestHint,
                         PlansDocument, SiteCensus, StatusDocument, UpdateManifest)

    fixed = {layout.CENSUS: Census, layout.GLOBAL_FINGERPRINT: GlobalFingerprint, layout.LATEST: LatestHint,
             layout.AGG_STATUS: StatusDocument}
    if key in fixed:
        return fixed[key]
    if layout.parse_version_key(key) is not None:
        return GlobalManifest
    if layout.parse_update_key(key) is not None:
        return UpdateManifest
    parts = key.split("/")
    if parts[0] == layout.SITES and len(parts) >= 3:
        try:
            layout.check_name(parts[1])
        except InvalidName:
            return None
        return {"fingerprint/census.json": SiteCensus, "fingerprint/summary.json": FingerprintSummary,
                "plans.json": PlansDocument, "heartbeat.json": Heartbeat,
                "status.json": StatusDocument}.get("/".join(parts[2:]))
    return None


def is_mutable(key: str) -> bool:
    return key == layout.LATEST or key == layout.AGG_STATUS or (
        key.startswith(layout.SITES + "/") and key.count("/") == 2 and key.endswith(MUTABLE_SUFFIXES))


def _blob_refs(doc: Document) -> list[Any]:
    refs = []
    for name in ("blob", "init_blob"):
        ref = getattr(doc, name, None)
        if ref is not None:
            refs.append(ref)
    refs.extend(getattr(doc, "site_blobs", {}).values())
    return refs


# ---- an in-memory store: reuse Bucket.read's checks on bundle contents ----------------------
def _memory_store(files: dict[str, bytes], name: str) -> Store:
    from ..store import Store

    class MemoryStore(Store):
        scheme = "bundle"

        def _read(self, key: str, max_size: int | None) -> bytes:
            if key not in files:
                raise FileNotFoundError(key)
            data = files[key]
            if max_size is not None and len(data) > max_size:
                from ..store.base import too_large

                raise too_large(self, key, max_size)
            return data

        def _write(self, key: str, data: bytes) -> None:
            raise PermissionError("a bundle is read-only")

        _publish = _write

        def _exists(self, key: str) -> bool:
            return key in files

        def _list(self, prefix: str) -> list[str]:
            return [k for k in files if k.startswith(prefix)]

        def _size(self, key: str) -> int:
            return len(self._read(key, None))

        def _delete(self, key: str) -> None:
            raise PermissionError("a bundle is read-only")

        def describe(self, key: str) -> str:
            return f"{name}:{key}"

    return MemoryStore(name)


def _verify_document(config: Any, key: str, data: bytes, source: str) -> Signed[Any]:
    """Bucket.read's checks on ``data`` as if it lay at ``key``."""
    from ..trust.bucket import Bucket

    cls = document_class(key)
    if cls is None:
        raise SchemaError(f"{source}:{key}: not a fedfs document key")
    return Bucket(_memory_store({key: data}, source), config).read(key, cls)


# ---- export ------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    purpose: str
    party: str
    files: list[tuple[str, int]]

    def __str__(self) -> str:
        size = sum(s for _, s in self.files)
        return (f"wrote {self.path}: {len(self.files)} file(s), {size / 1e6:.1f} MB, "
                f"{'for' if self.purpose == 'for' else 'from'} {self.party}")


def _latest_global(fed: Federation) -> Any:
    from ..protocol.schema import GlobalManifest

    v = fed.bucket.latest_version()
    return None if v is None else fed.bucket.read(layout.global_version(v), GlobalManifest)


def files_for_site(fed: Federation, site: str) -> list[str]:
    """Keys a site needs for its next step: the set-up documents and the newest global with its weights."""
    store = fed.store
    keys = [layout.FEDERATION]
    for key in (layout.CENSUS, layout.GLOBAL_FINGERPRINT, layout.LATEST,
                layout.site_census(site), layout.site_fingerprint(site), layout.site_plans(site)):
        if store.exists(key):
            keys.append(key)
    latest = _latest_global(fed)
    if latest is not None:
        keys.append(latest.key)
        ref = latest.doc.blob_for(site)
        if ref is not None:
            keys.append(ref.key)
    return keys


def files_from_site(fed: Federation, site: str, everything: bool = False) -> list[str]:
    """Keys a site produced that the aggregator has not yet seen (all of them with ``everything``)."""
    from ..protocol.schema import PlansDocument, UpdateManifest

    store = fed.store
    latest = _latest_global(fed)
    cursor = 0 if latest is None or everything else latest.doc.next_rounds.get(site, 0)
    keys = []
    for key in (layout.site_census(site), layout.site_fingerprint(site), layout.site_plans(site)):
        if store.exists(key):
            keys.append(key)
    if store.exists(layout.site_plans(site)) and (latest is None or everything):
        init = fed.bucket.read(layout.site_plans(site), PlansDocument).doc.init_blob
        if init is not None:
            keys.append(init.key)  # the aggregator needs it to build v0
    for key in store.list(layout.site_updates_prefix(site)):
        parsed = layout.parse_update_key(key)
        if parsed is None or parsed[1] < cursor:
            continue
        keys += [key, fed.bucket.read(key, UpdateManifest).doc.blob.key]
    for key in (layout.site_heartbeat(site), layout.site_status(site)):
        if store.exists(key):
            keys.append(key)
    return keys


def export_bundle(fed: Federation, out_path: str | os.PathLike[str], *, for_site: str | None = None,
                  from_site: str | None = None, everything: bool = False) -> ExportResult:
    """Write a bundle of what ``for_site`` needs, or of what ``from_site`` produced, signed by ``fed.identity``."""
    from ..protocol.timestamps import utcnow

    if fed.identity is None:
        raise ConfigError("exporting a bundle needs this party's private key (--key or FEDFS_KEY): it signs the bundle")
    if (for_site is None) == (from_site is None):
        raise ConfigError("give exactly one of --for SITE (what it needs) or --from SITE (what it produced)")
    site = layout.check_name(for_site or from_site)
    if site not in fed.config.site_names:
        raise ConfigError(f"{site!r} is not a site of this federation (sites: {', '.join(fed.config.site_names)})")
    keys = files_for_site(fed, site) if for_site else files_from_site(fed, site, everything)
    keys = list(dict.fromkeys(keys))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedfs-bundle-") as tmp:
        listed: list[BundleFile] = []
        paths: dict[str, str] = {}
        for i, key in enumerate(keys):
            path = os.path.join(tmp, f"{i:06d}")
            m = layout.parse_blob_key(key)
            if m:  # content-addressed: its name is its sha256
                digest = fed.store.download(key, path, expected_sha256=m[1])
            else:
                data = fed.store.read_bytes(key, max_size=MAX_DOCUMENT_BYTES)
                if key != layout.FEDERATION:
                    _verify_document(fed.config, key, data, fed.store.url)  # never pass on what we would reject
                Path(path).write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
            paths[key] = path
            listed.append(BundleFile(key=key, sha256=digest, size=os.path.getsize(path)))
        manifest = BundleManifest(federation_id=fed.config.federation_id, federation_digest=fed.digest,
                                  purpose="for" if for_site else "from", party=site, created=utcnow(), files=listed)
        env = fed.identity.sign(manifest.to_dict())
        part = out.with_name(f".{out.name}.incomplete")
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST_NAME, canonical_json(env))
            for f in listed:
                with open(paths[f.key], "rb") as fh:
                    _add(tar, MEMBER_PREFIX + f.key, fh, size=f.size)
        os.replace(part, out)
    return ExportResult(out, manifest.purpose, site, [(f.key, f.size) for f in listed])


def _add(tar: tarfile.TarFile, name: str, data: bytes | BinaryIO, size: int | None = None) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = int(time.time())
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.size = size or 0
        tar.addfile(info, data)


# ---- import ------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    signer: str
    purpose: str
    party: str
    published: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    kept_newer: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"bundle {self.purpose} {self.party} (signed by {self.signer}): {len(self.published)} file(s) written, "
                f"{len(self.present)} already present" + (f", {len(self.kept_newer)} newer hint(s) kept"
                                                          if self.kept_newer else ""))


def _read_members(tar_path: Path, tmp: str) -> tuple[bytes, dict[str, tuple[str, str, int]]]:
    """(manifest bytes, key -> (local path, sha256, size)) from a bundle, refusing anything unsafe."""
    name = tar_path.name
    members: dict[str, tuple[str, str, int]] = {}
    manifest: bytes | None = None
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise SchemaError(f"{tar_path}: not a readable bundle ({exc})") from None
    with tar:
        try:
            entries = list(_members(tar, name))
        except tarfile.TarError as exc:
            raise SchemaError(f"{name}: damaged bundle ({exc})") from None
        for m in entries:
            if not m.isreg():
                raise InvalidName(f"{name}: member {m.name!r} is not a regular file (links and folders are refused)")
            if m.name == MANIFEST_NAME:
                if manifest is not None:
                    raise SchemaError(f"{name}: two {MANIFEST_NAME} members")
                if m.size > MAX_MANIFEST_BYTES:
                    raise SchemaError(f"{name}: {MANIFEST_NAME} is {m.size} bytes, over the limit")
                manifest = tar.extractfile(m).read()  # type: ignore[union-attr]
                continue
            if not m.name.startswith(MEMBER_PREFIX):
                raise InvalidName(f"{name}: member {m.name!r} lies outside {MEMBER_PREFIX} (refused)")
            key = m.name[len(MEMBER_PREFIX):]
            try:
                layout.check_key(key)
            except InvalidName as exc:
                raise InvalidName(f"{name}: member {m.name!r} is not a safe bucket key ({exc})") from None
            if key in members:
                raise SchemaError(f"{name}: {key} appears twice")
            limit = MAX_BLOB_BYTES if layout.parse_blob_key(key) else MAX_DOCUMENT_BYTES
            if m.size > limit:
                raise SchemaError(f"{name}: {key} is {m.size} bytes, over the {limit}-byte limit")
            path = os.path.join(tmp, f"{len(members):06d}")
            h = hashlib.sha256()
            src = tar.extractfile(m)
            with open(path, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):  # type: ignore[union-attr]
                    h.update(block)
                    out.write(block)
            members[key] = (path, h.hexdigest(), m.size)
    if manifest is None:
        raise SchemaError(f"{name}: no {MANIFEST_NAME}: not a fedfs bundle")
    return manifest, members


def _members(tar: tarfile.TarFile, name: str):
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS:
            raise SchemaError(f"{name}: more than {MAX_MEMBERS} members")
        yield m


def _trust_root(store: Store, members: dict[str, tuple[str, str, int]], pin: str | None, name: str) -> Federation:
    """The destination's federation, or (for an empty destination) the bundle's, pinned."""
    from ..federation import Federation

    if store.exists(layout.FEDERATION):
        fed = Federation.open(store, pin=pin)
        if layout.FEDERATION in members and members[layout.FEDERATION][1] != fed.digest:
            raise IntegrityError(f"{name}: carries a different federation.json than {store.describe(layout.FEDERATION)} "
                                 "(a bundle of another federation?)")
        return fed
    if layout.FEDERATION not in members:
        raise NotFound(f"{store.describe(layout.FEDERATION)}: no federation here and the bundle carries none")
    digest = members[layout.FEDERATION][1]
    if not pin:
        raise ConfigError(f"{store.url} has no federation.json yet: give --federation-digest (the sha256 `fedfs init` "
                          f"printed) to trust the bundle's; this bundle's is {digest}")
    data = Path(members[layout.FEDERATION][0]).read_bytes()
    return Federation.open(_memory_store({layout.FEDERATION: data}, name), pin=pin)


def _verify_manifest(raw: bytes, fed: Federation, name: str) -> tuple[BundleManifest, str]:
    from ..trust.signing import parse_envelope, parse_public_key, verify_envelope

    where = f"{name}:{MANIFEST_NAME}"
    env = parse_envelope(loads_strict(raw, where), where)
    party = fed.config.party(env["signer"])
    if party is None:
        raise SignatureError(f"{where}: signed by {env['signer']!r}, who is not a member of this federation")
    if party.role != env["role"]:
        raise SignatureError(f"{where}: {env['signer']!r} signed as {env['role']!r} but is a {party.role!r}")
    verify_envelope(env, parse_public_key(party.public_key, where), where)
    manifest = BundleManifest.from_dict(env["body"], where)
    if manifest.federation_digest != fed.digest or manifest.federation_id != fed.config.federation_id:
        raise IntegrityError(f"{where}: made for federation {manifest.federation_id[:12]} "
                             f"(federation.json {manifest.federation_digest[:12]}), not this one "
                             f"({fed.config.federation_id[:12]}, {fed.digest[:12]})")
    return manifest, env["signer"]


def import_bundle(bundle: str | os.PathLike[str], url: str | Store, *, pin: str | None = None,
                  storage_options: dict[str, Any] | None = None) -> ImportResult:
    """Verify every file of ``bundle`` and publish them into the bucket at ``url`` (see the module doc)."""
    from ..store import Store, open_store

    tar_path = Path(bundle)
    name = tar_path.name
    store = url if isinstance(url, Store) else open_store(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="fedfs-import-") as tmp:
        raw_manifest, members = _read_members(tar_path, tmp)
        fed = _trust_root(store, members, pin, name)
        manifest, signer = _verify_manifest(raw_manifest, fed, name)

        listed = {f.key: f for f in manifest.files}
        for key in members:
            if key not in listed:
                raise IntegrityError(f"{name}: {key} is not listed in the signed bundle manifest (added?)")
        for key, f in listed.items():
            if key not in members:
                raise IntegrityError(f"{name}: {key} is listed but missing from the bundle")
            _, digest, size = members[key]
            if digest != f.sha256 or size != f.size:
                raise IntegrityError(f"{name}: {key} does not match the bundle manifest's sha256/size (altered)")

        docs: dict[str, Signed[Any]] = {}
        raw: dict[str, bytes] = {}
        for key, (path, _, _) in members.items():
            if key == layout.FEDERATION or layout.parse_blob_key(key):
                continue
            raw[key] = Path(path).read_bytes()
            docs[key] = _verify_document(fed.config, key, raw[key], name)
        for key, (_, digest, size) in members.items():
            m = layout.parse_blob_key(key)
            if not m:
                continue
            if m[1] != digest:
                raise IntegrityError(f"{name}: {key}: content sha256 {digest[:12]} differs from its name (altered)")
            if not any(ref.key == key and ref.sha256 == digest and ref.size == size and _may_name(s, key)
                       for s in docs.values() for ref in _blob_refs(s.doc)):
                raise IntegrityError(f"{name}: {key} is not named by any document in the bundle that may name it")

        plan = _preflight(store, fed, members, raw, docs, name)

        result = ImportResult(signer=signer, purpose=manifest.purpose, party=manifest.party)
        for key, action in plan:
            if action == "present":
                result.present.append(key)
            elif action == "kept":
                result.kept_newer.append(key)
            elif action == "blob":
                store.upload(key, members[key][0])
                result.published.append(key)
            elif action == "publish":
                data = raw.get(key) if key in raw else Path(members[key][0]).read_bytes()
                try:
                    store.publish(key, data)
                    result.published.append(key)
                except Conflict:  # someone published it meanwhile: fine only if it is the same
                    if _same_document(store.read_bytes(key, max_size=MAX_DOCUMENT_BYTES), data):
                        result.present.append(key)
                    else:
                        raise
            elif action == "write":
                store.write_bytes(key, raw[key])
                result.published.append(key)
    return result


def _may_name(signed: Signed[Any], blob_key: str) -> bool:
    """A site's document may name only payloads in its own folder; the aggregator's may name any."""
    return signed.role == "aggregator" or blob_key.startswith(layout.site_prefix(signed.signer))


def _same_document(existing: bytes, new: bytes) -> bool:
    if existing == new:
        return True
    try:
        a, b = loads_strict(existing, "existing"), loads_strict(new, "bundle")
    except SchemaError:
        return False
    return isinstance(a, dict) and isinstance(b, dict) and a.get("signer") == b.get("signer") \
        and a.get("body") == b.get("body")


_ORDER = {"federation": 0, "blob": 1, "doc": 2, "global": 3, "hint": 4}


def _preflight(store: Store, fed: Federation, members: dict[str, tuple[str, str, int]], raw: dict[str, bytes],
               docs: dict[str, Signed[Any]], name: str) -> list[tuple[str, str]]:
    """What to do with each file, decided before anything is written; raises if the destination disagrees."""
    from ..trust.bucket import Bucket

    dest = Bucket(store, fed.config)
    plan: list[tuple[int, str, str]] = []
    for key, (_, _, size) in sorted(members.items()):
        if key == layout.FEDERATION:
            plan.append((_ORDER["federation"], key, "present" if store.exists(key) else "publish"))
        elif layout.parse_blob_key(key):
            try:
                same = store.size(key) == size
            except NotFound:
                same = False
            plan.append((_ORDER["blob"], key, "present" if same else "blob"))
        elif is_mutable(key):
            try:
                current = dest.read(key, type(docs[key].doc))
                action = ("present" if current.raw_sha256 == members[key][1] else
                          "kept" if current.signed_at >= docs[key].signed_at else "write")
            except NotFound:
                action = "write"
            except FedfsError:
                action = "write"  # an unverifiable hint at the destination gives way to a verified one
            plan.append((_ORDER["hint"], key, action))
        else:
            try:
                existing = store.read_bytes(key, max_size=MAX_DOCUMENT_BYTES)
            except NotFound:
                existing = None
            if existing is not None and not _same_document(existing, raw[key]):
                raise Conflict(f"{name}: {store.describe(key)} already holds a different document; "
                               "nothing was imported")
            order = _ORDER["global"] if layout.parse_version_key(key) is not None else _ORDER["doc"]
            plan.append((order, key, "present" if existing is not None else "publish"))
    return [(k, a) for _, k, a in sorted(plan)]
