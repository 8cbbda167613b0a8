"""``fedfs demo``: a federation on a local folder, end to end, with what fedfs can do so far.

Creates keys for an aggregator and three sites, initialises the federation,
has each site publish a signed census document, has the aggregator read and
verify them and publish the merged census, shows that a forged document is
rejected, and prints ``fedfs doctor``'s report for the bucket.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from . import layout
from .doctor import run_doctor
from .errors import SignatureError
from .federation import Federation, config_from_key_dir
from .schema import Census, SiteCensus
from .signing import generate_keypair, load_identity

SITES = {"A": 12, "B": 8, "C": 5}


def run_demo(workdir: str | None = None, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    say = echo or (lambda _msg: None)
    root = Path(workdir or tempfile.mkdtemp(prefix="fedfs-demo-"))
    keys, bucket_dir = root / "keys", root / "bucket"
    if not (keys / "aggregator.key").exists():
        generate_keypair("aggregator", "aggregator", keys)
        for site in SITES:
            generate_keypair(site, "site", keys)
    config, agg = config_from_key_dir(keys, list(SITES), mode="ffe", configuration="2d", rounds=2)
    fed, created = Federation.create(str(bucket_dir), config, agg)
    say(f"federation {'created' if created else 'reopened'} at {bucket_dir} (sha256 {fed.digest[:16]}...)")

    for site, n in SITES.items():
        site_fed = Federation.open(str(bucket_dir), identity=keys / f"{site}.key", pin=fed.digest)
        site_fed.bucket.publish(layout.site_census(site), SiteCensus(site=site, num_cases=n, num_channels=1),
                                site_fed.identity)
        say(f"site {site}: published a signed census ({n} cases)")

    agg_fed = Federation.open(str(bucket_dir), identity=keys / "aggregator.key", pin=fed.digest)
    counts = {s: agg_fed.bucket.read(layout.site_census(s), SiteCensus).doc.num_cases for s in SITES}
    census = Census(total_cases=sum(counts.values()), num_channels=1, sites=counts)
    agg_fed.bucket.publish(layout.CENSUS, census, agg_fed.identity)
    back = agg_fed.bucket.read(layout.CENSUS, Census)
    say(f"aggregator: verified {len(counts)} census documents, published the census ({back.doc.total_cases} cases)")

    # A site that signs a document in another site's folder is refused.
    mallory = load_identity(keys / "A.key")
    forged_key = "sites/B/fingerprint/forged.json"
    agg_fed.store.publish(forged_key, __import__("json").dumps(mallory.sign(SiteCensus("B", 99, 1).to_dict())).encode())
    try:
        agg_fed.bucket.read(forged_key, SiteCensus)
        forged = "accepted (BUG)"
    except SignatureError as exc:
        forged = f"rejected: {exc}"
    say(f"a census for B signed by A: {forged}")

    report = run_doctor(agg_fed.store)
    say(report.render())
    return {"bucket": str(bucket_dir), "mode": fed.config.mode, "sites": fed.config.site_names,
            "total_cases": back.doc.total_cases, "forged_document": forged, "doctor_ok": report.ok}
