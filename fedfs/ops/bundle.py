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

The pieces: :mod:`fedfs.ops.bundle_format` (the signed table of contents, limits, which
documents live where), :mod:`fedfs.ops.bundle_export` and :mod:`fedfs.ops.bundle_import`.
"""

from __future__ import annotations

from .bundle_export import ExportResult, export_bundle, files_for_site, files_from_site
from .bundle_format import (MANIFEST_NAME, MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, MAX_MEMBERS, MEMBER_PREFIX, BundleFile,
                            BundleManifest, document_class, is_mutable)
from .bundle_import import ImportResult, import_bundle

__all__ = ["BundleManifest", "BundleFile", "export_bundle", "import_bundle", "ImportResult", "ExportResult",
           "MANIFEST_NAME", "MEMBER_PREFIX", "MAX_MANIFEST_BYTES", "MAX_BLOB_BYTES", "MAX_MEMBERS",
           "document_class", "is_mutable", "files_for_site", "files_from_site"]
