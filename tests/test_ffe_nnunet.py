"""FFE against real nnU-Net: three tiny 2D sites versus nnU-Net on the pooled data.

The merged fingerprint must equal nnU-Net's fingerprint of the pooled dataset
(per-case lists as multisets, exact quantiles/min/max on integer data, mean and
std within 1e-6), and plans made from it must equal the centralized plans.
Documents cross between the parties as JSON text, as they would through a bucket.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from fedfs.fl import fingerprint as fp

from fedfs.fl import plans as pl
from fedfs.nnunet import adapter as nn
from fedfs.errors import NnunetError

import nnunetv2  # noqa: E402,F401 - a missing nnU-Net fails here, it is not skipped
import SimpleITK as sitk  # noqa: E402

SITES = {"A": (611, 5, (0.8, 0.8), (60, 15)), "B": (612, 4, (1.2, 1.1), (150, 40)),
         "C": (613, 3, (0.5, 0.7), (20, 60))}
POOLED = 610


def _case(rs: np.random.RandomState, spacing: tuple, hu: tuple) -> tuple:
    img = np.zeros((64, 64), np.int16)
    y0, x0 = rs.randint(4, 14, 2)
    y1, x1 = 64 - rs.randint(4, 14, 2)
    body = np.zeros_like(img, bool)
    body[y0:y1, x0:x1] = True
    img[body] = np.clip(np.round(rs.normal(40, 20, body.sum())), 1, None)
    seg = np.zeros((64, 64), np.uint8)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    seg[cy - 8:cy + 8, cx - 10:cx + 9] = 1
    organ = seg == 1
    img[organ] = np.round(rs.normal(*hu, organ.sum()) + rs.standard_t(3, organ.sum()) * 10)
    img[organ & (rs.uniform(size=img.shape) < 0.03)] = 1500  # a bright tail
    img[organ & (img == 0)] = 1
    return img, seg, spacing


def _write(raw: str, ds_id: int, name: str, cases: list) -> None:
    folder = os.path.join(raw, f"Dataset{ds_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for cid, img, seg, spacing in cases:
        for arr, rel in ((img, f"imagesTr/{cid}_0000.nii.gz"), (seg, f"labelsTr/{cid}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(reversed(spacing)))
            sitk.WriteImage(im, os.path.join(folder, rel))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                   "numTraining": len(cases), "file_ending": ".nii.gz"}, f)


def _hop(doc: dict) -> dict:
    """A trip through the bucket: JSON text out, JSON text in."""
    return json.loads(json.dumps(doc, allow_nan=False))


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        rs = np.random.RandomState(7)
        pooled = []
        for site, (ds_id, n, spacing, hu) in SITES.items():
            cases = [(f"{site}{i}", *_case(rs, spacing, hu)) for i in range(n)]
            _write(str(root / "nnUNet_raw"), ds_id, f"Site{site}", cases)
            pooled += cases
        _write(str(root / "nnUNet_raw"), POOLED, "Pooled", pooled)

        central_fp = nn.local_fingerprint(POOLED, num_processes=1)
        central_plans = nn.plan(POOLED)

        census = fp.merge_census({s: _hop(nn.site_census(SITES[s][0])) for s in SITES})
        summaries = {s: _hop(nn.site_summary(SITES[s][0], _hop(census)["total_cases"], num_processes=1))
                     for s in SITES}
        merged = _hop(fp.merge_summaries(summaries, census))
        plans = {}
        for s, (ds_id, *_) in SITES.items():
            nn.install_fingerprint(ds_id, merged)
            plans[s] = nn.plan(f"Dataset{ds_id:03d}_Site{s}")
        yield dict(central_fp=central_fp, central_plans=central_plans, census=census,
                   summaries=summaries, merged=merged, plans=plans)


def test_census_counts_cases_by_id_and_name(fed):
    # Assert
    assert nn.site_census(611) == {"num_cases": 5, "num_channels": 1, "channel_names": {"0": "CT"},
                                   "labels": {"background": 0, "organ": 1}}
    assert nn.count_cases("Dataset613_SiteC") == 3
    assert fed["census"] == {"total_cases": 12, "num_channels": 1, "sites": {"A": 5, "B": 4, "C": 3}}


def test_summary_uses_federation_sample_count_and_exact_tables(fed):
    for s, summary in fed["summaries"].items():
        assert summary["samples_per_case"] == int(10e7 // 12)
        assert summary["channels"][0]["mantissa_bits"] is None
        assert summary["channels"][0]["count"] == SITES[s][1] * summary["samples_per_case"]


def test_merged_fingerprint_equals_pooled_nnunet(fed):
    # Prepare
    central, merged = fed["central_fp"], fed["merged"]

    def multiset(xs):
        return Counter(tuple(x) for x in xs)

    # Assert
    assert multiset(merged["spacings"]) == multiset(central["spacings"])
    assert multiset(merged["shapes_after_crop"]) == multiset(central["shapes_after_crop"])
    assert merged["median_relative_size_after_cropping"] == central["median_relative_size_after_cropping"]
    c, m = central["foreground_intensity_properties_per_channel"]["0"], \
        merged["foreground_intensity_properties_per_channel"]["0"]
    for k in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
        assert m[k] == c[k], k
    for k in ("mean", "std"):
        assert m[k] == pytest.approx(c[k], rel=1e-6), k


def test_plans_from_merged_fingerprint_equal_centralized(fed):
    for site, plans in fed["plans"].items():
        assert pl.diff_plans(plans, fed["central_plans"], rel_tol=1e-6) == [], site
    assert len({pl.plans_digest(p) for p in fed["plans"].values()}) == 1


def test_plans_mismatch_is_detected_and_named(fed):
    # Execute
    other = nn.plan(613, planner="nnUNetPlannerResEncM")
    diff = pl.diff_plans(fed["plans"]["A"], other)

    # Assert
    assert pl.plans_digest(other) != pl.plans_digest(fed["plans"]["A"])
    assert "experiment_planner_used" in diff
    assert "plans_name" in diff
    assert "configurations.2d.architecture.network_class_name" in diff


def test_plan_and_preprocess_writes_preprocessed_cases(fed):
    # Execute
    plans = nn.plan_and_preprocess(612, configurations=("2d",), num_processes=1)

    # Assert
    assert pl.diff_plans(plans, fed["central_plans"], rel_tol=1e-6) == []
    folder = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset612_SiteB", "nnUNetPlans_2d")
    assert len([f for f in os.listdir(folder) if f.endswith(".pkl")]) == 4
    summary = pl.plans_summary(plans, "2d")
    assert summary["configuration"] == "2d" and summary["n_stages"] == len(summary["features_per_stage"])


def test_missing_nnunet_env_is_a_clear_error(monkeypatch):
    # Prepare
    monkeypatch.delenv("nnUNet_raw", raising=False)

    # Execute / Assert
    with pytest.raises(NnunetError, match="nnUNet_raw"):
        nn.count_cases(611)


def test_unknown_planner_is_a_clear_error(fed):
    with pytest.raises(NnunetError, match="NoSuchPlanner"):
        nn.plan(611, planner="NoSuchPlanner")


def test_planner_sizes_batch_from_federation_case_count(fed):
    # Prepare: a federation fingerprint with 20x site C's cases; nnU-Net caps the batch at 5 %
    # of the dataset's voxels, counted with numTraining, which the site's dataset.json puts at 3
    big = dict(fed["merged"])
    big["spacings"] = fed["merged"]["spacings"] * 20
    big["shapes_after_crop"] = fed["merged"]["shapes_after_crop"] * 20
    try:
        nn.install_fingerprint(613, big)

        # Execute
        plans = nn.plan(613)

        # Assert
        conf = plans["configurations"]["2d"]
        voxels = np.prod(conf["median_image_size_in_voxels"]) * len(big["spacings"])
        assert conf["batch_size"] == max(2, round(voxels * 0.05 / np.prod(conf["patch_size"]))) > 2
    finally:
        nn.install_fingerprint(613, fed["merged"])
        nn.plan(613)
