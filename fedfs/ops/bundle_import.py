"""Bundle import: verify everything a bundle carries, then publish it into a bucket.

The order of checks (see :mod:`fedfs.ops.bundle`): safe members within limits,
the bundle's signature against the trust root, every file's sha256 and size, every
document like :meth:`fedfs.trust.bucket.Bucket.read`, every payload against a
document that may name it, the destination's write-once files; only then writes.
Any failure before the writes writes nothing.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, Conflict, FedfsError, IntegrityError, InvalidName, NotFound, SchemaError, SignatureError
from ..protocol import layout
from ..protocol.documents import MAX_DOCUMENT_BYTES, loads_strict
from .bundle_format import (MANIFEST_NAME, MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, MAX_MEMBERS, MEMBER_PREFIX,
                            BundleManifest, blob_refs, is_mutable, verify_document)

if TYPE_CHECKING:
    from ..federation import Federation
    from ..store import Store
    from ..trust.bucket import Signed

__all__ = ["ImportResult", "import_bundle"]

Members = dict[str, tuple[str, str, int]]  # key -> (local path, sha256, size)


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


#: What a damaged archive raises while it is read (tarfile, gzip's CRC and EOF, zlib, bz2/lzma's OSError).
_DAMAGED = (tarfile.TarError, OSError, EOFError, zlib.error)


def _read_members(tar_path: Path, tmp: str) -> tuple[bytes, Members]:
    """(manifest bytes, key -> (local path, sha256, size)) from a bundle, refusing anything unsafe."""
    name = tar_path.name
    members: Members = {}
    manifest: bytes | None = None
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise SchemaError(f"{tar_path}: not a readable bundle ({exc})") from None
    with tar:
        try:
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
        except _DAMAGED as exc:  # a torn or altered archive, however the decompressor notices it
            raise SchemaError(f"{name}: damaged bundle ({type(exc).__name__}: {exc})") from None
    if manifest is None:
        raise SchemaError(f"{name}: no {MANIFEST_NAME}: not a fedfs bundle")
    return manifest, members


def _members(tar: tarfile.TarFile, name: str) -> Iterator[tarfile.TarInfo]:
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS:
            raise SchemaError(f"{name}: more than {MAX_MEMBERS} members")
        yield m


def _trust_root(store: Store, members: Members, pin: str | None, name: str) -> Federation:
    """The destination's federation, or (for an empty destination) the bundle's, pinned."""
    from ..federation import Federation
    from ..store.memory import MemoryStore

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
    return Federation.open(MemoryStore({layout.FEDERATION: data}, name=name, read_only=True), pin=pin)


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
        _check_listing(manifest, members, name)
        raw, docs = _verify_contents(fed, members, name)
        plan = _preflight(store, fed, members, raw, docs, name)
        result = ImportResult(signer=signer, purpose=manifest.purpose, party=manifest.party)
        _apply(store, plan, members, raw, result)
    return result


def _check_listing(manifest: BundleManifest, members: Members, name: str) -> None:
    """Every member is listed in the signed manifest, and every listed file is there, unaltered."""
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


def _verify_contents(fed: Federation, members: Members, name: str) -> tuple[dict[str, bytes], dict[str, Signed[Any]]]:
    """(raw bytes, verified document) of every document; every payload named by a document that may name it."""
    docs: dict[str, Signed[Any]] = {}
    raw: dict[str, bytes] = {}
    for key, (path, _, _) in members.items():
        if key == layout.FEDERATION or layout.parse_blob_key(key):
            continue
        raw[key] = Path(path).read_bytes()
        docs[key] = verify_document(fed.config, key, raw[key], name)
    for key, (_, digest, size) in members.items():
        m = layout.parse_blob_key(key)
        if not m:
            continue
        if m[1] != digest:
            raise IntegrityError(f"{name}: {key}: content sha256 {digest[:12]} differs from its name (altered)")
        if not any(ref.key == key and ref.sha256 == digest and ref.size == size and _may_name(s, key)
                   for s in docs.values() for ref in blob_refs(s.doc)):
            raise IntegrityError(f"{name}: {key} is not named by any document in the bundle that may name it")
    return raw, docs


def _apply(store: Store, plan: list[tuple[str, str]], members: Members, raw: dict[str, bytes],
           result: ImportResult) -> None:
    """Carry out the preflight's plan, in its order, recording what happened to each file in ``result``."""
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


def _preflight(store: Store, fed: Federation, members: Members, raw: dict[str, bytes],
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
