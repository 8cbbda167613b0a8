"""Synthetic sites: nnU-Net's raw layout, determinism, heterogeneity, pooling. No nnU-Net needed."""

from __future__ import annotations

import json
from dataclasses import replace

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


def test_3d_styles_make_volumes_with_their_spacing(tmp_path):
    for i, style in enumerate(syn.DEFAULT_STYLES_3D):
        img, seg = syn.make_case(np.random.default_rng(i), style)
        assert img.shape == seg.shape == style.image_size and len(style.image_size) == 3
        assert set(np.unique(seg)) == {0, 1}
        assert img[seg == 1].mean() > img[seg == 0].mean()
        assert 0.01 < seg.mean() < 0.3  # a lesion, not the whole volume
    sp = syn.make_site(tmp_path / "raw", 8, "Vol", n_train=2, n_test=1, style=syn.DEFAULT_STYLES_3D[1])
    img, spacing = _read(sp.images_tr / "Vol_000_0000.nii.gz")
    assert img.shape == syn.DEFAULT_STYLES_3D[1].image_size
    assert spacing == pytest.approx(tuple(reversed(syn.DEFAULT_STYLES_3D[1].spacing)))  # (x, y, z) in the file


def test_3d_ellipsoid_respects_the_slice_spacing():
    # 2 mm slices: a sphere of radius r mm spans about half as many slices as rows
    style = syn.SiteStyle(spacing=(2.0, 1.0, 1.0), image_size=(24, 48, 48), radius_mm=(8.0, 8.0),
                          noise=0.0, texture=0.0)
    _, seg = syn.make_case(np.random.default_rng(0), style)
    zs, ys, _ = np.nonzero(seg)
    assert np.ptp(zs) + 1 == pytest.approx((np.ptp(ys) + 1) / 2, abs=2)


def test_2d_cases_are_unchanged_by_the_3d_generalisation():
    # pinned: the 2D demo's data must not move (its Dice thresholds were tuned on it)
    img, seg = syn.make_case(np.random.default_rng(5), syn.DEFAULT_STYLES[1])
    assert int(seg.sum()) == 1088 and float(img[0, 0]) == pytest.approx(1671.36, abs=0.01)


def test_region_scheme_nests_a_core_in_the_lesion(tmp_path):
    style = replace(syn.DEFAULT_STYLES[0], label_scheme="regions")
    img, seg = syn.make_case(np.random.default_rng(1), style)
    assert set(np.unique(seg)) == {0, 1, 2}
    assert img[seg == 2].mean() > img[seg == 1].mean() > img[seg == 0].mean()  # core brighter than rim
    sp = syn.make_site(tmp_path / "raw", 9, "Reg", n_train=2, n_test=1, style=style)
    doc = json.loads((sp.dataset_dir / "dataset.json").read_text())
    assert doc["labels"] == {"background": 0, "whole": [1, 2], "core": 2} and doc["regions_class_order"] == [1, 2]


def test_sparse_annotation_ignores_bands_and_keeps_the_lesion_visible():
    seg = np.zeros((12, 10), np.uint8)
    seg[3:9, 2:6] = 1
    out = syn.sparse_annotation(seg, np.random.default_rng(0), band=3)
    ignored_rows = np.all(out == syn.IGNORE_VALUE, axis=1)
    assert 0 < ignored_rows.sum() < 12  # whole rows (slices in 3D) are left unannotated
    assert np.array_equal(out[~ignored_rows], seg[~ignored_rows])  # the rest keeps its labels
    assert (out == 1).any()
    assert np.array_equal(seg[3:9, 2:6], np.ones((6, 4)))  # the input is not changed
    with pytest.raises(ValueError, match="above every label"):
        syn.sparse_annotation(np.full((2, 2), 2, np.uint8), np.random.default_rng(0))


def test_ignore_scheme_is_sparse_in_training_and_dense_held_out(tmp_path):
    style = replace(syn.DEFAULT_STYLES[0], label_scheme="ignore")
    sp = syn.make_site(tmp_path / "raw", 10, "Sparse", n_train=2, n_test=1, style=style)
    doc = json.loads((sp.dataset_dir / "dataset.json").read_text())
    assert doc["labels"] == {"background": 0, "lesion": 1, "ignore": 2}
    train, _ = _read(sp.labels_tr / "Sparse_000.nii.gz")
    test, _ = _read(sp.labels_ts / "Sparse_002.nii.gz")
    assert set(np.unique(train)) == {0, 1, 2} and set(np.unique(test)) == {0, 1}
    with pytest.raises(ValueError, match="label scheme"):
        syn.make_pooled(tmp_path / "raw", [sp, syn.make_site(tmp_path / "raw", 11, "Dense", n_train=1, n_test=0)], 12)
    with pytest.raises(ValueError, match="unknown label scheme"):
        syn.make_case(np.random.default_rng(0), replace(style, label_scheme="scribbles"))
