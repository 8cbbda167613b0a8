"""A corrupt masked update costs its site the round, not the federation: the aggregator checks
every masked input before it names the survivors, so a site whose payload does not verify is
a dropout (its pairwise masks removed with its mask key, rebuilt from the survivors' shares),
recorded with the reason, and the round completes with the others."""

from __future__ import annotations

import os

import pytest
import torch

from fedfs import layout
from fedfs.errors import ValidationError
from fedfs.privacy import secagg
from fedfs.privacy.secagg_documents import SecAggMasked, SecAggRoster, roster_key, site_stage_key
from fedfs.protocol.schema import GlobalManifest, StatusDocument
from fedfs.testing.toy import toy_federation
from fedfs.weights.tensors import load_weights


def corrupt_blob(fed, key: str) -> str:
    """Flip bytes of the payload ``key`` names, in place, in the folder bucket (same size)."""
    blob = fed.bucket.read(key, SecAggMasked).doc.blob
    path = os.path.join(fed.store.root, *blob.key.split("/"))
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    with open(path, "wb") as f:
        f.write(bytes(data))
    return blob.key


def test_a_corrupt_masked_update_is_a_dropout_and_the_round_completes(tmp_path):
    # Prepare: three toy sites; C's masked update of round 0 is altered in the bucket after it is published
    fed, agg, sites = toy_federation(tmp_path, "ABC", mode="fedavg", rounds=2, secure_aggregation=True)
    masked_c = site_stage_key("C", "v000000", "masked")
    planted = None
    # Execute
    for _ in range(80):
        if all(s.state.finished for s in sites.values()):
            break
        agg.step()
        for s in sites.values():
            s.step()
        if planted is None and fed.store.exists(masked_c):
            planted = corrupt_blob(fed, masked_c)
    # Assert: the federation finished; v1 was summed from A and B only, C refused with the reason
    assert planted is not None and all(s.state.final_version == 2 for s in sites.values())
    roster = fed.bucket.read(roster_key("v000000", "masked"), SecAggRoster).doc
    assert roster.sites == ["A", "B"] and roster.dropped == ["C"] and "sha256" in roster.rejected["C"]
    m1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert sorted(c.site for c in m1.contributions) == ["A", "B"] and "refused" in m1.report["reason"]
    m2 = fed.bucket.read(layout.global_version(2), GlobalManifest).doc
    assert sorted(c.site for c in m2.contributions) == ["A", "B", "C"]  # C is back the next round
    # the unmasked sum equals plain FedAvg over A and B (uniform weights here) within the fixed-point step
    w1 = load_weights(fed.bucket.get_blob_file(m1.blob, str(tmp_path / "v1.safetensors")))[0]
    a = load_weights(str(tmp_path / "A" / "updates" / "r000000.safetensors"))[0]
    b = load_weights(str(tmp_path / "B" / "updates" / "r000000.safetensors"))[0]
    for k, t in w1.items():  # two fixed-point steps (2^-28 each), plus the float32 rounding of the stored global
        want = (a[k].double() + b[k].double()) / 2
        assert torch.all((t.double() - want).abs() <= 2 * 2.0 ** -28 + want.abs() * 2.0 ** -24), k
    # the refusal is in the aggregator's signed status and its journal, naming the payload and the reason
    status = fed.bucket.read(layout.AGG_STATUS, StatusDocument).doc
    rec = [r for r in status.rejected if r.key == masked_c]
    assert rec and planted in rec[0].reason and "treated as dropped" in rec[0].reason and "C" in rec[0].sites
    assert masked_c in (tmp_path / "agg" / "rejections.jsonl").read_text()
    assert not (tmp_path / "agg" / "secagg" / "v000000").exists()  # verified copies gone once v1 is out


def test_too_many_refused_inputs_fail_the_session_naming_them():
    params = secagg.SessionParams.make("v000000", ["A", "B", "C"])
    shares = secagg.make_roster(params, "shares", ["A", "B", "C"], secagg.make_roster(params, "keys", ["A", "B", "C"],
                                                                                       None))
    with pytest.raises(ValidationError, match=r"B's masked input was refused: bad sha256.*C's masked input was "
                                              r"refused: not safetensors"):
        secagg.make_roster(params, "masked", ["A", "B", "C"], shares, {"B": "bad sha256", "C": "not safetensors"})
    one = secagg.make_roster(params, "masked", ["A", "B", "C"], shares, {"C": "bad sha256"})
    assert one.sites == ["A", "B"] and one.dropped == ["C"] and one.rejected == {"C": "bad sha256"}


def test_a_masked_update_altered_after_the_roster_is_summed_from_the_verified_copy(tmp_path):
    # Prepare: C's masked update is altered in the bucket only after the masked roster named it a survivor
    fed, agg, sites = toy_federation(tmp_path, "ABC", mode="fedavg", rounds=1, secure_aggregation=True)
    masked_c, roster = site_stage_key("C", "v000000", "masked"), roster_key("v000000", "masked")
    planted = None
    # Execute
    for _ in range(60):
        if all(s.state.finished for s in sites.values()):
            break
        agg.step()
        if planted is None and fed.store.exists(roster):
            planted = corrupt_blob(fed, masked_c)
        for s in sites.values():
            s.step()
    # Assert: the aggregator summed the copy it verified when it closed the masked roster; C is in v1
    assert planted is not None and all(s.state.final_version == 1 for s in sites.values())
    m1 = fed.bucket.read(layout.global_version(1), GlobalManifest).doc
    assert sorted(c.site for c in m1.contributions) == ["A", "B", "C"]


def test_a_masked_manifest_whose_blob_is_not_content_addressed_is_refused():
    body = {"kind": "secagg-masked", "schema_version": 1, "site": "C", "session": "v000000", "roster": "a" * 64,
            "layout": "b" * 64, "blob": {"kind": "blob", "schema_version": 1, "key": "sites/C/blobs/x.safetensors",
                                         "sha256": "../../agg/cache/x", "size": 8}}
    with pytest.raises(ValidationError):
        SecAggMasked.from_dict(body, "sites/C/secagg/v000000/masked.json")
