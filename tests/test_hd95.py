"""HD95 of benchmarks/quality.py: hand-computed cases, spacing, outliers, empty masks, and a brute-force check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def q():
    return load_benchmark("quality")


def _mask(shape, *points):
    m = np.zeros(shape, dtype=bool)
    for p in points:
        m[p] = True
    return m


def test_identical_masks_are_zero(q):
    m = np.zeros((20, 20), dtype=bool)
    m[5:12, 4:15] = True
    assert q.hd95(m, m) == 0.0
    assert q.hd95(m, m, (0.5, 3.0)) == 0.0


def test_single_pixels_honour_anisotropic_spacing(q):
    # Prepare: one pixel each, 3 rows and 4 columns apart; rows 2 mm, columns 0.5 mm
    a, b = _mask((10, 10), (2, 2)), _mask((10, 10), (5, 6))
    # Execute / Assert: sqrt((3*2)^2 + (4*0.5)^2) = sqrt(40), both ways
    assert q.hd95(a, b, (2.0, 0.5)) == pytest.approx(math.sqrt(40))
    assert q.hd95(b, a, (2.0, 0.5)) == pytest.approx(math.sqrt(40))
    # without spacing: plain pixel distance 5
    assert q.hd95(a, b) == pytest.approx(5.0)


def test_shifted_square_in_millimetres(q):
    # Prepare: a 4x4 square and the same square 3 columns to the right, 1.5 mm columns
    ref = np.zeros((12, 16), dtype=bool)
    ref[4:8, 2:6] = True
    pred = np.roll(ref, 3, axis=1)
    # Each border has 12 pixels. pred -> ref, in columns: the left edge lies on ref's right edge (4 x 0),
    # the top and bottom rows add 1 and 2 (4 pixels), the right edge is 3 away (4 pixels); ref -> pred
    # mirrors it. Of the 24 distances, 8 are 3 columns = 4.5 mm: the top third, so the 95th percentile.
    assert q.hd95(pred, ref, (1.0, 1.5)) == pytest.approx(4.5)


def test_the_95th_percentile_ignores_a_rare_outlier(q):
    # Prepare: a one-pixel-thick line of 40 pixels (all surface); pred adds one stray pixel 10 rows away
    ref = np.zeros((30, 50), dtype=bool)
    ref[5, 5:45] = True
    pred = ref.copy()
    pred[15, 20] = True
    # Execute: 81 distances: 80 zeros and one 10 (10 * 2 mm = 20 mm with 2 mm rows)
    d = np.concatenate([q.surface_distances(pred, ref, (2.0, 1.0)), q.surface_distances(ref, pred, (2.0, 1.0))])
    # Assert: the Hausdorff distance sees the outlier, its 95th percentile does not
    assert sorted(d)[-1] == pytest.approx(20.0) and len(d) == 81
    assert q.hd95(pred, ref, (2.0, 1.0)) == 0.0


def test_percentile_interpolates_like_numpy(q):
    # Prepare: ref one pixel; pred the same pixel plus one pixel 4 columns away
    ref = _mask((5, 10), (2, 2))
    pred = _mask((5, 10), (2, 2), (2, 6))
    # distances pred->ref: 0, 4; ref->pred: 0. percentile([0, 4, 0], 95): sorted [0, 0, 4], index 1.9 -> 3.6
    assert q.hd95(pred, ref) == pytest.approx(3.6)


def test_empty_masks(q):
    empty, full = np.zeros((8, 8), dtype=bool), _mask((8, 8), (3, 3))
    assert q.hd95(empty, empty) == 0.0
    assert q.hd95(empty, full) == math.inf and q.hd95(full, empty) == math.inf
    with pytest.raises(ValueError):
        q.surface_distances(empty, full)


def test_three_dimensional_masks(q):
    a = _mask((6, 6, 6), (1, 1, 1))
    b = _mask((6, 6, 6), (1, 4, 5))
    assert q.hd95(a, b, (3.0, 1.0, 0.5)) == pytest.approx(math.sqrt(3 ** 2 + 2 ** 2))


def test_matches_brute_force_on_random_masks(q):
    from scipy import ndimage

    rng = np.random.default_rng(7)
    spacing = (0.7, 1.3)
    for _ in range(10):
        # Prepare: two random smooth blobs
        a = ndimage.gaussian_filter(rng.random((24, 28)), 2.0) > 0.5
        b = ndimage.gaussian_filter(rng.random((24, 28)), 2.0) > 0.5
        if not a.any() or not b.any():
            continue
        # Execute: every surface pixel's distance to the nearest surface pixel of the other mask, by brute force
        border = lambda m: m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(2, 1))  # noqa: E731
        pa, pb = np.argwhere(border(a)) * spacing, np.argwhere(border(b)) * spacing
        dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
        expected = np.percentile(np.concatenate([dist.min(1), dist.min(0)]), 95)
        # Assert
        assert q.hd95(a, b, spacing) == pytest.approx(expected)


def test_per_case_reads_spacing_from_the_files_and_caps_empty_predictions(q, tmp_path):
    import SimpleITK as sitk

    def write(arr, folder, name, spacing_xy):
        folder.mkdir(exist_ok=True)
        im = sitk.GetImageFromArray(arr.astype(np.uint8))
        im.SetSpacing(spacing_xy)
        sitk.WriteImage(im, str(folder / name))

    ref = _mask((10, 20), (4, 4))
    pred = _mask((10, 20), (4, 9))
    write(ref, tmp_path / "gt", "c1.nii.gz", (0.5, 2.0))  # x (columns) 0.5 mm, y (rows) 2 mm
    write(pred, tmp_path / "pred", "c1.nii.gz", (0.5, 2.0))
    write(ref, tmp_path / "gt", "c2.nii.gz", (0.5, 2.0))
    write(np.zeros_like(ref), tmp_path / "pred", "c2.nii.gz", (0.5, 2.0))
    out = q.hd95_per_case(tmp_path / "pred", tmp_path / "gt")
    assert out["c1"] == pytest.approx(5 * 0.5)
    assert out["c2"] == pytest.approx(math.sqrt((10 * 2.0) ** 2 + (20 * 0.5) ** 2))  # the image diagonal
