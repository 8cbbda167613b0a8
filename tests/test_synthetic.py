"""Synthetic sites: nnU-Net's raw layout, determinism, heterogeneity, pooling. No nnU-Net needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfs.testing import synthetic as syn

import SimpleITK as sitk


def _read(path) -> tuple[np.ndarray, tuple[float, ...]]:
    im = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(im), im.GetSpacing()


def test_make_case_is_deterministic_and_binary():
    style = syn.DEFAULT_STYLES[1]
    a = syn.make_case(np.random.default_rng(5), style)
    b = syn.make_case(np.random.default_rng(5), style)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    img, seg = a
    assert img.shape == seg.shape == syn.IMAGE_SIZE and img.dtype == np.float32
    assert set(np.unique(seg)) == {0, 1}
    # The lesion is brighter than the background in the site's own units.
    assert img[seg == 1].mean() > img[seg == 0].mean()


def test_make_site_writes_nnunet_raw_layout(tmp_path):
    style = syn.DEFAULT_STYLES[2]
    sp = syn.make_site(tmp_path / "raw", 7, "Alpha", n_train=3, n_test=2, style=style, seed=1)
    assert sp.dataset_name == "Dataset007_Alpha" and sp.dataset_dir == tmp_path / "raw" / "Dataset007_Alpha"
    doc = json.loads((sp.dataset_dir / "dataset.json").read_text())
    assert doc == {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1},
                   "numTraining": 3, "file_ending": ".nii.gz"}
    assert sorted(p.name for p in sp.images_tr.iterdir()) == [f"Alpha_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in sp.labels_tr.iterdir()) == [f"Alpha_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in sp.labels_ts.iterdir()) == ["Alpha_003.nii.gz", "Alpha_004.nii.gz"]
    assert not sp.images_ts.is_relative_to(sp.dataset_dir)  # held-out cases live outside the raw dataset
    img, spacing = _read(sp.images_tr / "Alpha_000_0000.nii.gz")
    assert img.shape == (64, 64)  # 2D files: nnU-Net's SimpleITKIO adds the dummy slice axis itself
    assert spacing == pytest.approx((style.spacing[1], style.spacing[0]))
    seg, _ = _read(sp.labels_tr / "Alpha_000.nii.gz")
    assert seg.dtype == np.uint8 and seg.max() == 1


def test_federation_sites_differ_and_pool(tmp_path):
    sites = syn.make_federation(tmp_path / "raw", n_sites=3, base_id=520, seed=0)
    assert [s.dataset_name for s in sites] == ["Dataset520_SiteA", "Dataset521_SiteB", "Dataset522_SiteC"]
    assert len({s.n_train for s in sites}) == 3 and len({s.style.spacing for s in sites}) == 3
    scales = [float(np.median(_read(next(s.images_tr.iterdir()))[0])) for s in sites]
    assert max(scales) / min(scales) > 100  # scanners with very different intensity ranges

    pooled = syn.make_pooled(tmp_path / "raw", sites, 530)
    assert pooled.n_train == sum(s.n_train for s in sites)
    assert len(list(pooled.images_tr.iterdir())) == pooled.n_train
    assert len(list(pooled.labels_ts.iterdir())) == sum(s.n_test for s in sites)
    assert json.loads((pooled.dataset_dir / "dataset.json").read_text())["numTraining"] == pooled.n_train


def test_more_sites_than_styles_stay_distinct(tmp_path):
    sites = syn.make_federation(tmp_path / "raw", n_sites=4, base_id=540)
    assert sites[3].dataset_name == "Dataset543_SiteD"
    assert sites[3].style.spacing != sites[0].style.spacing


def test_bad_names_are_refused(tmp_path):
    with pytest.raises(ValueError):
        syn.make_site(tmp_path, 1000, "X")
    with pytest.raises(ValueError):
        syn.make_site(tmp_path, 1, "../x")
