"""What a bundle is: its signed table of contents, its limits, and the rules both directions share.

The shared rules: which document class each bucket key holds (a bundle may carry only
fedfs documents, payloads and ``federation.json``), which of them are mutable hints,
which payloads a document names, and :func:`verify_document`, which applies
:meth:`fedfs.trust.bucket.Bucket.read`'s checks to bytes that are not in a bucket yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidName, SchemaError
from ..protocol import layout
from ..protocol.documents import Document, document, require

if TYPE_CHECKING:
    from ..trust.bucket import Signed

__all__ = ["MANIFEST_NAME", "MEMBER_PREFIX", "MAX_MANIFEST_BYTES", "MAX_BLOB_BYTES", "MAX_MEMBERS",
           "BundleFile", "BundleManifest", "document_class", "is_mutable", "blob_refs", "verify_document"]

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
def document_class(key: str) -> type[Document] | None:
    """The document class a key holds, or None if it is not a fedfs document key."""
    key = layout.revision_zero(key)  # a superseding census or fingerprint holds what revision 0 holds
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
    writer = layout.writer_of(key)
    if writer is None or writer[0] != "site":
        return None
    try:
        site = layout.check_name(writer[1])
    except InvalidName:
        return None
    return {layout.site_census(site): SiteCensus, layout.site_fingerprint(site): FingerprintSummary,
            layout.site_plans(site): PlansDocument, layout.site_heartbeat(site): Heartbeat,
            layout.site_status(site): StatusDocument}.get(key)


def is_mutable(key: str) -> bool:
    """Whether ``key`` holds a hint its writer replaces (``latest``, heartbeats, status documents)."""
    from ..protocol.schema import Heartbeat, LatestHint, StatusDocument

    return document_class(key) in (LatestHint, Heartbeat, StatusDocument)


def blob_refs(doc: Document) -> list[Any]:
    """Every payload (:class:`~fedfs.protocol.schema.BlobRef`) a document names."""
    refs = []
    for name in ("blob", "init_blob"):
        ref = getattr(doc, name, None)
        if ref is not None:
            refs.append(ref)
    refs.extend(getattr(doc, "site_blobs", {}).values())
    return refs


def verify_document(config: Any, key: str, data: bytes, source: str) -> Signed[Any]:
    """Bucket.read's checks on ``data`` as if it lay at ``key`` (``source`` names it in errors)."""
    from ..store.memory import MemoryStore
    from ..trust.bucket import Bucket

    cls = document_class(key)
    if cls is None:
        raise SchemaError(f"{source}:{key}: not a fedfs document key")
    return Bucket(MemoryStore({key: data}, name=source, read_only=True), config).read_exact(key, cls)
