"""FFE through real buckets (a folder and moto S3) with the real site and aggregator roles:
the merged fingerprint the aggregator publishes equals nnU-Net's on the pooled data, every
site's plans equal the centralized plans, and the aggregator checks they are identical."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedfs.fl import fingerprint as fp

from fedfs.fl import plans as pl
from fedfs import layout
from fedfs.nnunet import adapter as nn
from fedfs.roles.aggregator import Aggregator
from fedfs.federation import Federation, config_from_key_dir
from fedfs.nnunet.work import NnunetOptions, NnunetWork
from fedfs.protocol.schema import GlobalFingerprint, GlobalManifest, PlansDocument
from fedfs.trust.signing import generate_keypair
from fedfs.roles.site import Site
from test_ffe_nnunet import POOLED, SITES, _case, _write


@pytest.fixture(params=["folder", "s3"])
def bucket_url(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "bucket")
    return request.getfixturevalue("s3_url")


def test_ffe_through_a_bucket_reproduces_pooled_nnunet(bucket_url, tmp_path, monkeypatch):
    # Prepare: three CT-like sites and their pooled dataset
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    rs = np.random.RandomState(11)
    pooled = []
    for site, (ds_id, n, spacing, hu) in SITES.items():
        cases = [(f"{site}{i}", *_case(rs, spacing, hu)) for i in range(n)]
        _write(str(tmp_path / "nnUNet_raw"), ds_id, f"Site{site}", cases)
        pooled += cases
    _write(str(tmp_path / "nnUNet_raw"), POOLED, "Pooled", pooled)
    central_fp = nn.local_fingerprint(POOLED, num_processes=1)
    central_plans = nn.plan(POOLED)
    keys = tmp_path / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in SITES:
        generate_keypair(s, "site", keys)
    config, agg_key = config_from_key_dir(keys, list(SITES), mode="ffe", rounds=1)
    fed, _ = Federation.create(bucket_url, config, agg_key)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "w-agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"),
                     NnunetWork(NnunetOptions(dataset=str(ds), num_processes=1, num_processes_fingerprint=1)),
                     tmp_path / f"w-{s}") for s, (ds, *_) in SITES.items()}

    # Execute: the set-up phase, step by step, until v0
    for _ in range(8):
        aggregator.step()
        if fed.store.exists(layout.global_version(0)):
            break
        for s in sites.values():
            s.step()

    # Assert: the published fingerprint is nnU-Net's pooled one
    merged = fed.bucket.read(layout.GLOBAL_FINGERPRINT, GlobalFingerprint).doc.fingerprint
    multiset = lambda xs: Counter(tuple(x) for x in xs)  # noqa: E731
    assert multiset(merged["spacings"]) == multiset(central_fp["spacings"])
    assert multiset(merged["shapes_after_crop"]) == multiset(central_fp["shapes_after_crop"])
    c = central_fp["foreground_intensity_properties_per_channel"]["0"]
    m = merged["foreground_intensity_properties_per_channel"]["0"]
    for k in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
        assert m[k] == c[k], k
    for k in ("mean", "std"):
        assert m[k] == pytest.approx(c[k], rel=1e-6), k
    # every site planned what centralized nnU-Net plans, and the aggregator accepted them as identical
    digests = set()
    for s in SITES:
        doc = fed.bucket.read(layout.site_plans(s), PlansDocument).doc
        assert pl.diff_plans(doc.summary["plans"], central_plans, rel_tol=1e-6) == [], s
        digests.add(doc.digest)
    assert len(digests) == 1
    v0 = fed.bucket.read(layout.global_version(0), GlobalManifest).doc
    assert v0.blob is not None and v0.next_rounds == {s: 0 for s in SITES}
    for s in sites.values():
        s.work.close()
