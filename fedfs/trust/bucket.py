"""The fedfs protocol over a :class:`~fedfs.store.Store`: signed documents and blobs.

Commit order (docs/protocol.md): a payload goes first, under a content-addressed
name ``<writer prefix>/blobs/<sha256>.<ext>``; then a small signed manifest that
names its sha256 and size is published *exclusively*. Readers act only on
manifests, and check size limit, envelope, signature, the signer's role for the
key's location, and the schema, in that order, before the body is used; payloads
are verified against the manifest's sha256 before they are parsed.

Write-once manifests (plans, updates, globals) are *slots* (``layout.is_slot``): a read
returns the first candidate that verifies, a file that does not verify is recorded as junk
(``Bucket.junk``, reported through ``on_junk``) and skipped, and a publish that meets junk
moves to the next alternative. So nothing at a predictable key can block a party.

A publish that reports "exists" is resolved by reading the existing document
back: the same writer token (our own earlier attempt) or the same signer and
body (a deterministic step re-run after a crash) is success; anything else is a
:class:`~fedfs.errors.Conflict`. If the outcome cannot be read back,
:class:`~fedfs.errors.StateUnknown`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..protocol import layout
from ..protocol.documents import MAX_DOCUMENT_BYTES, Document, canonical_json, loads_strict
from ..errors import (
    ConfigError,
    Conflict,
    IntegrityError,
    NotFound,
    SchemaError,
    SignatureError,
    StateUnknown,
    StoreUnavailable,
    ValidationError,
)
from ..protocol.schema import BlobRef, FederationConfig
from .signing import Identity, installation_of, parse_envelope, parse_public_key, verify_envelope
from ..store import Store, sha256_file

D = TypeVar("D", bound=Document)
log = logging.getLogger("fedfs.trust.bucket")

#: How often a publish is retried when the backend leaves the outcome unknown.
PUBLISH_ATTEMPTS = 3


@dataclass(frozen=True)
class Signed(Generic[D]):
    """A verified document and who signed it."""

    key: str
    doc: D
    signer: str
    role: str
    writer_token: str
    signed_at: str
    raw_sha256: str


@contextmanager
def _naming(key: str) -> Iterator[None]:
    """Give a ValidationError raised inside the bucket key it concerns, unless it names one already."""
    try:
        yield
    except ValidationError as exc:
        if exc.key is None:
            exc.key = key
        raise


def _probable_cause(existing: dict[str, Any], mine: dict[str, Any]) -> str:
    """What probably put a different document where ``mine`` was to be published (for the Conflict)."""
    signer = mine["signer"]
    if existing.get("signer") != signer:
        return f"another party wrote it, not {signer!r}"
    theirs, ours = installation_of(str(existing.get("writer_token", ""))), installation_of(mine["writer_token"])
    if theirs is not None and ours is not None and theirs != ours:
        return (f"installation {theirs} wrote it and this is {ours}, so two machines publish as {signer!r}: two "
                f"daemons share one key, or a key was copied; stop one, or give each party its own key")
    if theirs is not None and theirs == ours:
        return ("this machine wrote it before and now computes something else: its local state was reset (state.json "
                "moved away) or its data or options changed since; a write-once file is never replaced")
    return (f"either another machine publishes as {signer!r} (two daemons share one key, or a key was copied), "
            "or this party's local state was reset and it now computes something else")


class _Junk(Conflict):
    """A publish met a file that does not verify (a slot moves on; any other key reports a Conflict)."""

    @property
    def reason(self) -> str:
        return str(self)


class Bucket:
    """Signed documents and blobs in one store, verified against one federation config."""

    def __init__(self, store: Store, config: FederationConfig | None = None) -> None:
        self.store = store
        self.config = config
        #: Slot candidates found not to verify: key -> reason. A party seeds it from its durable
        #: rejection memory at start, so known junk costs no request.
        self.junk: dict[str, str] = {}
        #: Called as ``on_junk(key, reason)`` the first time a slot candidate is found not to verify.
        self.on_junk: Callable[[str, str], None] | None = None
        self._slots: dict[str, Signed[Any]] = {}  # verified slot values (write-once: safe to keep)

    # ---- reading --------------------------------------------------------------
    def read_raw_envelope(self, key: str, *, max_size: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
        """Fetch and parse the envelope at ``key`` without verifying the signature."""
        where = self.store.describe(key)
        data = self.store.read_bytes(key, max_size=max_size)
        return parse_envelope(loads_strict(data, where), where)

    def read(self, key: str, cls: type[D], *, max_size: int = MAX_DOCUMENT_BYTES) -> Signed[D]:
        """Read, verify and parse the document at ``key``; raise a ValidationError saying why not
        (its ``key`` names the file, so a caller can quarantine it without parsing the message).

        For a slot key, the slot's value: the first candidate that verifies (its ``Signed.key``
        says which); NotFound if none does yet. Junk on the way is recorded, never raised."""
        if layout.is_slot(key):
            return self._read_slot(key, cls, max_size)
        with _naming(key):
            return self._read(key, cls, max_size)

    def read_exact(self, key: str, cls: type[D], *, max_size: int = MAX_DOCUMENT_BYTES) -> Signed[D]:
        """Read and verify exactly the file at ``key``, a slot candidate or not (no slot resolution)."""
        with _naming(key):
            return self._read(key, cls, max_size)

    def _read_slot(self, key: str, cls: type[D], max_size: int) -> Signed[D]:
        primary = layout.slot_primary(key)
        cached = self._slots.get(primary)
        if cached is not None and isinstance(cached.doc, cls):
            return cached
        for n in range(layout.MAX_ALTERNATIVES + 1):
            cand = layout.slot_candidate(primary, n)
            if cand in self.junk:
                continue
            try:
                with _naming(cand):
                    signed = self._read(cand, cls, max_size)
            except NotFound:
                raise NotFound(f"{self.store.describe(primary)}: not published yet", key=primary) from None
            except ValidationError as exc:
                self.record_junk(cand, str(exc))
                continue
            self._remember_slot(primary, signed)
            return signed
        raise NotFound(f"{self.store.describe(primary)}: every one of {layout.MAX_ALTERNATIVES} alternatives is junk",
                       key=primary)

    def _remember_slot(self, primary: str, signed: Signed[Any]) -> None:
        if len(self._slots) >= 8192:  # the pending updates of a thousand sites, and then some
            self._slots.pop(next(iter(self._slots)))
        self._slots[primary] = signed

    def record_junk(self, key: str, reason: str) -> None:
        """Remember that ``key`` (a slot candidate) does not verify, and report it once."""
        if key in self.junk:
            return
        self.junk[key] = reason
        log.warning("skipping %s: %s", self.store.describe(key), reason)
        if self.on_junk is not None:
            self.on_junk(key, reason)

    def published(self, key: str, cls: type[D]) -> Signed[D] | None:
        """The verified value of slot ``key``, or None while no candidate verifies."""
        try:
            return self.read(key, cls)
        except NotFound:
            return None

    def _read(self, key: str, cls: type[D], max_size: int) -> Signed[D]:
        where = self.store.describe(key)
        data = self.store.read_bytes(key, max_size=max_size)
        env = parse_envelope(loads_strict(data, where), where)
        self._check_signer(key, env, where)
        doc = cls.from_dict(env["body"], where)
        self._check_binding(key, doc, env, where)
        return Signed(
            key=key,
            doc=doc,
            signer=env["signer"],
            role=env["role"],
            writer_token=env["writer_token"],
            signed_at=env["signed_at"],
            raw_sha256=hashlib.sha256(data).hexdigest(),
        )

    def read_optional(self, key: str, cls: type[D], **kw: Any) -> Signed[D] | None:
        try:
            return self.read(key, cls, **kw)
        except NotFound:
            return None

    def _check_signer(self, key: str, env: dict[str, Any], where: str) -> None:
        if self.config is None:
            raise SignatureError(f"{where}: cannot verify before federation.json is loaded")
        signer, role = env["signer"], env["role"]
        party = self.config.party(signer)
        if party is None:
            raise SignatureError(f"{where}: signed by {signer!r}, who is not a member of this federation")
        if party.role != role:
            raise SignatureError(f"{where}: {signer!r} signed as role {role!r} but is a {party.role!r}")
        expected = layout.writer_of(key)
        if expected is None:
            ok = role == "aggregator"
            needed = "the aggregator"
        elif expected[0] == "site":
            ok = role == "site" and signer == expected[1]
            needed = f"site {expected[1]!r}"
        else:
            ok = role == "aggregator"
            needed = "the aggregator"
        if not ok:
            raise SignatureError(f"{where}: only {needed} may write here, but it is signed by {role} {signer!r}")
        verify_envelope(env, parse_public_key(party.public_key, where), where)

    def _check_binding(self, key: str, doc: Document, env: dict[str, Any], where: str) -> None:
        """A document's own naming fields must agree with where it lies (no replay elsewhere)."""
        site = getattr(doc, "site", None)
        if site is not None and site != env["signer"]:
            raise SignatureError(f"{where}: document names site {site!r} but is signed by {env['signer']!r}")
        parsed = layout.parse_update_key(key)
        if parsed is not None:
            if getattr(doc, "round", None) != parsed[1]:
                raise SchemaError(
                    f"{where}: update says round {getattr(doc, 'round', None)} but lies at round {parsed[1]} (replayed?)"
                )
        version = layout.parse_version_key(key)
        if version is not None and getattr(doc, "version", None) != version:
            raise SchemaError(f"{where}: global says version {getattr(doc, 'version', None)} but lies at v{version}")

    def latest_version(self) -> int | None:
        """The newest published global version: the ``latest`` hint, then probes forward (the hint
        may lag a crash); one read and one probe when it is current. None before v0."""
        from ..protocol.schema import GlobalManifest, LatestHint

        hint = None
        try:
            hint = self.read(layout.LATEST, LatestHint).doc.version
        except NotFound:
            pass
        except ValidationError as exc:  # a bad hint is only a hint: fall back to probing
            log.warning("ignoring %s: %s", layout.LATEST, exc)
        if hint is not None and (hint < 0 or self.published(layout.global_version(hint), GlobalManifest) is None):
            hint = None  # a hint ahead of the verified globals (or junk) is no hint: probe from v0
        return layout.newest_version(hint, lambda key: self.published(key, GlobalManifest) is not None)

    # ---- writing --------------------------------------------------------------
    def publish(self, key: str, doc: Document, identity: Identity) -> Signed[Any]:
        """Exclusively publish ``doc`` at ``key``, signed; idempotent for re-runs (see module doc)."""
        self.check_may_write(key, identity)
        env = identity.sign(doc.to_dict())
        data = canonical_json(env)
        if not layout.is_slot(key):
            return self._publish_at(key, doc, env, data)
        primary = layout.slot_primary(key)
        for n in range(layout.MAX_ALTERNATIVES + 1):
            cand = layout.slot_candidate(primary, n)
            if cand in self.junk:
                continue
            try:
                signed = self._publish_at(cand, doc, env, data)
            except _Junk as exc:
                self.record_junk(cand, exc.reason)
                continue
            self._remember_slot(primary, signed)
            return signed
        raise Conflict(f"{self.store.describe(primary)}: every one of {layout.MAX_ALTERNATIVES} alternatives "
                       "is occupied by junk; clean the folder (docs/security.md)", key=primary)

    def _publish_at(self, key: str, doc: Document, env: dict[str, Any], data: bytes) -> Signed[Any]:
        where = self.store.describe(key)
        last_exc: Exception | None = None
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                self.store.publish(key, data)
                return self._signed(key, doc, env, data)
            except Conflict:
                return self._resolve_existing(key, doc, env, where)
            except StateUnknown as exc:
                last_exc = exc
                try:
                    return self._resolve_existing(key, doc, env, where)
                except (NotFound, StoreUnavailable):
                    time.sleep(0.2 * (attempt + 1))
        raise StateUnknown(f"{where}: publish outcome unknown after {PUBLISH_ATTEMPTS} attempts: {last_exc}")

    def _resolve_existing(self, key: str, doc: Document, env: dict[str, Any], where: str) -> Signed[Any]:
        try:
            existing = self.read_raw_envelope(key)
            if self.config is not None:  # a forged envelope is neither ours nor another machine's
                self._check_signer(key, existing, where)
        except ValidationError as exc:  # unparsable, forged, too large...: junk, whatever it is
            raise _Junk(f"{where}: already exists and is not a valid document ({exc})", key=key) from None
        same_token = existing.get("writer_token") == env["writer_token"]
        same_content = existing.get("signer") == env["signer"] and existing.get("body") == env["body"]
        if same_token or same_content:
            return self._signed(key, doc, existing, canonical_json(existing))
        raise Conflict(f"{where}: already published by {existing.get('signer')!r} with different content: "
                       f"{_probable_cause(existing, env)}", key=key)

    @staticmethod
    def _signed(key: str, doc: Document, env: dict[str, Any], data: bytes) -> Signed[Any]:
        return Signed(key, doc, env["signer"], env["role"], env["writer_token"], env["signed_at"],
                      hashlib.sha256(data).hexdigest())

    @staticmethod
    def check_may_write(key: str, identity: Identity) -> None:
        """Refuse, before any I/O, to write where readers would reject ``identity``'s signature."""
        expected = layout.writer_of(key)
        if expected is None or expected[0] == "aggregator":
            ok = identity.role == "aggregator"
        else:
            ok = identity.role == "site" and identity.name == expected[1]
        if not ok:
            raise ConfigError(f"{identity.role} {identity.name!r} may not write {key!r} (another party's location)")

    def write_mutable(self, key: str, doc: Document, identity: Identity) -> None:
        """Overwrite a signed *hint* (latest, heartbeat, status). Never used for protocol state."""
        self.check_may_write(key, identity)
        self.store.write_bytes(key, canonical_json(identity.sign(doc.to_dict())))

    # ---- blobs ----------------------------------------------------------------
    def put_blob_bytes(self, prefix_key_fn: Any, data: bytes, ext: str = "safetensors") -> BlobRef:
        """Store ``data`` content-addressed; ``prefix_key_fn(sha, ext)`` gives the key."""
        digest = hashlib.sha256(data).hexdigest()
        key = prefix_key_fn(digest, ext)
        if not self._blob_present(key, len(data)):
            self.store.write_bytes(key, data)
        return BlobRef(key=key, sha256=digest, size=len(data))

    def put_blob_file(self, prefix_key_fn: Any, path: str, ext: str = "safetensors") -> BlobRef:
        digest = sha256_file(path)
        size = os.path.getsize(path)
        key = prefix_key_fn(digest, ext)
        if not self._blob_present(key, size):
            self.store.upload(key, path)
        return BlobRef(key=key, sha256=digest, size=size)

    def _blob_present(self, key: str, size: int) -> bool:
        try:
            return self.store.size(key) == size
        except NotFound:
            return False

    def get_blob_bytes(self, ref: BlobRef, *, max_size: int) -> bytes:
        where = self.store.describe(ref.key)
        if ref.size > max_size:
            raise IntegrityError(f"{where}: manifest says {ref.size} bytes, over the {max_size}-byte limit")
        data = self.store.read_bytes(ref.key, max_size=max_size)
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise IntegrityError(f"{where}: content does not match the manifest's sha256/size (corrupt or altered)")
        return data

    def get_blob_file(self, ref: BlobRef, dest: str | None = None) -> str:
        """Download and verify a blob to ``dest`` (a temp file by default); return the path.
        A ValidationError it raises names the blob's key (``exc.key``)."""
        with _naming(ref.key):
            return self._get_blob_file(ref, dest)

    def _get_blob_file(self, ref: BlobRef, dest: str | None) -> str:
        where = self.store.describe(ref.key)
        if dest is None:
            fd, dest = tempfile.mkstemp(suffix=os.path.splitext(ref.key)[1], prefix="fedfs-")
            os.close(fd)
        size = self.store.size(ref.key)
        if size != ref.size:
            raise IntegrityError(f"{where}: is {size} bytes but the manifest says {ref.size}")
        self.store.download(ref.key, dest, expected_sha256=ref.sha256)
        return dest
