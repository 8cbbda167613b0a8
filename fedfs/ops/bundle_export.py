"""Bundle export: the bucket files one party needs (``--for SITE``) or produced (``--from SITE``), as a signed tar.

Every document is verified before it is packed (an export never passes on what an
import would reject) and every payload against the sha256 its name carries.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import ConfigError
from ..protocol import layout
from ..protocol.documents import MAX_DOCUMENT_BYTES, canonical_json
from ..protocol.timestamps import utcnow
from .bundle_format import MANIFEST_NAME, MEMBER_PREFIX, BundleFile, BundleManifest, verify_document

if TYPE_CHECKING:
    from ..federation import Federation

__all__ = ["ExportResult", "export_bundle", "files_for_site", "files_from_site"]


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


def _existing(fed: Federation, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if fed.store.exists(key)]


def _revisions(fed: Federation, *families: Callable[[int], str]) -> list[str]:
    """Every revision of each superseding set-up document family (a census redo before v0)."""
    return [key for key_of in families for key in layout.all_revisions(key_of, fed.store.exists)]


def files_for_site(fed: Federation, site: str) -> list[str]:
    """Keys a site needs for its next step: the set-up documents and the newest global with its weights."""
    keys = [layout.FEDERATION] + _revisions(fed, layout.census_key, layout.global_fingerprint_key,
                                            partial(layout.site_census, site), partial(layout.site_fingerprint, site))
    keys += _existing(fed, (layout.LATEST, layout.site_plans(site)))
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

    latest = _latest_global(fed)
    cursor = 0 if latest is None or everything else latest.doc.next_rounds.get(site, 0)
    keys = _revisions(fed, partial(layout.site_census, site), partial(layout.site_fingerprint, site))
    keys += _existing(fed, (layout.site_plans(site),))
    if layout.site_plans(site) in keys and (latest is None or everything):
        init = fed.bucket.read(layout.site_plans(site), PlansDocument).doc.init_blob
        if init is not None:
            keys.append(init.key)  # the aggregator needs it to build v0
    for key in fed.store.list(layout.site_updates_prefix(site)):
        parsed = layout.parse_update_key(key)
        if parsed is None or parsed[1] < cursor:
            continue
        # a decided update's payload may have been removed under retention: the manifest goes alone
        keys += [key, *_existing(fed, (fed.bucket.read(key, UpdateManifest).doc.blob.key,))]
    return keys + _existing(fed, (layout.site_heartbeat(site), layout.site_status(site)))


def export_bundle(fed: Federation, out_path: str | os.PathLike[str], *, for_site: str | None = None,
                  from_site: str | None = None, everything: bool = False) -> ExportResult:
    """Write a bundle of what ``for_site`` needs, or of what ``from_site`` produced, signed by ``fed.identity``."""
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
                    verify_document(fed.config, key, data, fed.store.url)  # never pass on what we would reject
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
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = int(time.time())
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.size = size or 0
        tar.addfile(info, data)
