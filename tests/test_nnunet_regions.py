"""Region-based labels and the ignore label: Dice on hand-computed arrays, then FFE on nnU-Net's format.

The first tests check fedfs's Dice rules (:mod:`fedfs.nnunet.inference`) on arrays small enough
to count by hand: a region is scored on the union of its labels, voxels the reference marks
``ignore`` count for nothing, and nnU-Net's own ``compute_metrics`` (through
:func:`dice_per_case`) agrees. The ``nnunet`` tests then run two-site FFE federations of tiny 2D
sites whose dataset.json is nnU-Net's region format (``labels`` with lists, ``regions_class_order``)
or has an ``ignore`` label (sparse training labels), train a round with real nnU-Net, and check
that the census, the plans, nnU-Net's per-region pseudo-Dice (named in the updates and in
``fedfs status``) and a prediction of the final model come out region- and ignore-aware.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedfs.errors import NnunetError
from fedfs.nnunet.inference import EvaluationTarget, dice_scores, evaluation_targets, named_dice, targets_of

REGIONS = {"background": 0, "whole": [1, 2], "core": 2}
IGNORE = {"background": 0, "lesion": 1, "ignore": 2}

# Two rows of four voxels: 0 background, 1 rim, 2 core.
REF = np.array([[0, 1, 1, 2], [0, 1, 2, 2]], np.uint8)
PRED = np.array([[0, 1, 2, 2], [1, 1, 1, 2]], np.uint8)


def test_region_targets_follow_dataset_json_order_and_union_their_labels():
    targets, ignore = evaluation_targets(REGIONS, [1, 2])
    assert targets == [EvaluationTarget("whole", (1, 2)), EvaluationTarget("core", (2,))]
    assert ignore is None
    assert [t.nnunet_key for t in targets] == [(1, 2), 2]


def test_label_targets_are_sorted_by_value_and_skip_background_and_ignore():
    targets, ignore = evaluation_targets({"background": 0, "b": 2, "a": 1, "ignore": 3})
    assert [(t.name, t.values) for t in targets] == [("a", (1,)), ("b", (2,))]
    assert ignore == 3


def test_region_dice_is_the_dice_of_the_union():
    # whole (1 or 2): ref has 6 voxels, pred 7 (one extra at row 1, col 0): tp 6, fp 1, fn 0 -> 12/13
    # core (2): ref (0,3) (1,2) (1,3), pred (0,2) (0,3) (1,3): tp 2, fp 1, fn 1 -> 4/6
    targets, _ = evaluation_targets(REGIONS, [1, 2])
    assert dice_scores(REF, PRED, targets) == pytest.approx({"whole": 12 / 13, "core": 2 / 3})
    # the same arrays as plain labels: label 1 ref (0,1) (0,2) (1,1), pred (0,1) (1,0) (1,1) (1,2):
    # tp 2, fp 2, fn 1 -> 4/7; label 2 is the core again
    labels, _ = evaluation_targets({"background": 0, "rim": 1, "core": 2})
    assert dice_scores(REF, PRED, labels) == pytest.approx({"rim": 4 / 7, "core": 2 / 3})


def test_ignored_voxels_count_for_nothing():
    # the reference leaves (0,3), (1,0) and (1,3) unannotated; the prediction's lesion there does not count
    ref = np.array([[0, 1, 1, 2], [2, 1, 0, 2]], np.uint8)
    pred = np.array([[1, 1, 0, 1], [1, 1, 0, 0]], np.uint8)
    targets, ignore = evaluation_targets(IGNORE)
    assert ignore == 2
    # annotated voxels (0,0) (0,1) (0,2) (1,1) (1,2): ref lesion 3, pred lesion 2 of them + (0,0): tp 2, fp 1, fn 1
    assert dice_scores(ref, pred, targets, ignore) == pytest.approx({"lesion": 2 / 3})
    # without the rule, the two predictions in unannotated voxels would be false positives: 4/8
    assert dice_scores(ref, pred, targets) == pytest.approx({"lesion": 0.5})


def test_a_target_absent_from_both_has_no_dice():
    targets, _ = evaluation_targets(REGIONS, [1, 2])
    empty = np.zeros((2, 2), np.uint8)
    scores = dice_scores(empty, empty, targets)
    assert math.isnan(scores["whole"]) and math.isnan(scores["core"])
    with pytest.raises(NnunetError, match="shape"):
        dice_scores(empty, np.zeros((2, 3), np.uint8), targets)


@pytest.mark.parametrize("labels, order, match", [
    ({"background": 0, "whole": [1, 2], "core": 2}, None, "regions_class_order"),
    ({"background": 0, "whole": [1, 2], "core": 2}, [1], "2 regions"),
    ({"background": 0, "lesion": 2, "ignore": 1}, None, "highest"),
    ({"background": 0, "lesion": 1, "ignore": [2]}, None, "one integer"),
    ({"lesion": 1}, None, "background"),
])
def test_bad_label_definitions_are_named(labels, order, match):
    with pytest.raises(NnunetError, match=match):
        evaluation_targets(labels, order)


def test_named_dice_names_nnunets_per_region_list():
    doc = {"labels": REGIONS, "regions_class_order": [1, 2]}
    assert named_dice(doc, [0.9, None]) == {"dice_whole": 0.9}
    assert named_dice(doc, [0.9]) == {}  # counts differ: nothing is named rather than misnamed
    assert named_dice({"labels": IGNORE}, [0.5]) == {"dice_lesion": 0.5}
    assert targets_of({"labels": IGNORE})[1] == 2


def test_dice_per_case_uses_nnunets_compute_metrics_with_regions_and_ignore(tmp_path):
    import SimpleITK as sitk

    from fedfs.nnunet.inference import dice_per_case

    def write(arr, folder, name):
        folder.mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{name}.nii.gz"))

    write(REF, tmp_path / "ref", "c1")
    write(PRED, tmp_path / "pred", "c1")
    regions = {"labels": REGIONS, "regions_class_order": [1, 2], "file_ending": ".nii.gz"}
    assert dice_per_case(tmp_path / "pred", tmp_path / "ref", dataset_json=regions, per_target=True) \
        == {"c1": pytest.approx({"whole": 12 / 13, "core": 2 / 3})}
    assert dice_per_case(tmp_path / "pred", tmp_path / "ref", dataset_json=regions)["c1"] \
        == pytest.approx((12 / 13 + 2 / 3) / 2)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": IGNORE, "file_ending": ".nii.gz"}))
    write(np.array([[0, 1, 1, 2], [2, 1, 0, 2]], np.uint8), tmp_path / "ref_sparse", "c2")
    write(np.array([[1, 1, 0, 1], [1, 1, 0, 0]], np.uint8), tmp_path / "pred_sparse", "c2")
    assert dice_per_case(tmp_path / "pred_sparse", tmp_path / "ref_sparse", dataset_json=tmp_path / "dataset.json") \
        == {"c2": pytest.approx(2 / 3)}
    # the old call (label values) still works and gives the label Dice
    assert dice_per_case(tmp_path / "pred", tmp_path / "ref", [2]) == {"c1": pytest.approx(2 / 3)}
