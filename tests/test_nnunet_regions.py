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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedfs import layout
from fedfs.errors import NnunetError
from fedfs.nnunet.inference import (EvaluationTarget, dice_per_case, dice_scores, evaluation_targets, named_dice,
                                    targets_of)
from fedfs.protocol.schema import PlansDocument, SiteCensus

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


def test_status_names_dice_per_target_from_update_metrics():
    from fedfs.ops.status import dice_by_target, format_targets

    metrics = {"train_loss": 0.1, "pseudo_dice": 0.8, "dice_whole": 0.9, "dice_core": 0.7, "dice_": 1.0}
    assert dice_by_target(metrics) == {"whole": 0.9, "core": 0.7}
    assert format_targets(dice_by_target(metrics)) == "whole 0.900, core 0.700"
    assert format_targets({"lesion": 0.8}) == ""  # one target: the mean already says it
    assert dice_by_target(None) == {}


def test_dice_per_case_uses_nnunets_compute_metrics_with_regions_and_ignore(tmp_path):
    import SimpleITK as sitk

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


# ----------------------------------------------------------------------------- FFE with real nnU-Net

ROUNDS = 2
ITERATIONS = 15


def _sites(root: Path, scheme: str, base_id: int) -> dict:
    from fedfs.testing import synthetic as syn

    return {s: syn.make_site(root / "raw", base_id + i, f"{scheme.capitalize()}{s}", n_train=6, n_test=2,
                             style=replace(syn.DEFAULT_STYLES[i], label_scheme=scheme), seed=4,
                             test_root=root / "heldout")
            for i, s in enumerate(("A", "B"))}


def _predict_in_process(model_folder: Path, images: Path, out: Path) -> Path:
    """nnU-Net's predictor on the exported folder, sequentially in this process (no worker pools)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out.mkdir(parents=True, exist_ok=True)  # the sequential path does not make it
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,), "checkpoint_final.pth")
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    return out


def _federation(tmp_path_factory, scheme: str, base_id: int) -> dict:
    """Two sites of ``scheme`` through FFE (census, fingerprint, one set of plans), ROUNDS rounds,
    then site A's final model exported and run on both sites' held-out cases."""
    from fedfs.nnunet.build import trainer_search_path
    from fedfs.ops.export import export_site_model
    from nnunet_steps import TINY, step_federation

    root = tmp_path_factory.mktemp(f"nnunet_{scheme}")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
            mp.setenv(var, str(root / sub))
        mp.setenv("nnUNet_extTrainer", trainer_search_path())
        mp.setenv("nnUNet_n_proc_DA", "0")
        mp.setenv("FEDFS_TORCH_THREADS", "1")  # one torch thread: 2 shared cores, oversubscribed else
        sites = _sites(root, scheme, base_id)
        run = step_federation(root / "fed", {s: sp.dataset_id for s, sp in sites.items()}, mode="ffe",
                              configuration="2d", rounds=ROUNDS, iterations=ITERATIONS)
        model = export_site_model(run.party("A"), "A", str(sites["A"].dataset_id), root / "model", trainer=TINY)
        preds = {s: _predict_in_process(model, sp.images_ts, root / "pred" / s) for s, sp in sites.items()}
        yield {"root": root, "sites": sites, "run": run, "model": model, "preds": preds, "mp": mp}


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    yield from _federation(tmp_path_factory, "regions", 951)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    yield from _federation(tmp_path_factory, "ignore", 961)


def _updates(run, site: str) -> list:
    from fedfs.protocol.schema import UpdateManifest

    return [run.fed.bucket.read(layout.site_update(site, r), UpdateManifest).doc for r in range(ROUNDS)]


def _labels(folder: Path) -> set[int]:
    import SimpleITK as sitk

    return set().union(*(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))).tolist()
                         for f in folder.glob("*.nii.gz")))


@pytest.mark.nnunet
def test_ffe_trains_nnunet_regions_and_names_them(regions):
    run, sites = regions["run"], regions["sites"]
    versions = run.versions()
    assert len(versions) == ROUNDS + 1 and versions[-1].final
    digests = {run.fed.bucket.read(layout.site_plans(s), PlansDocument).doc.digest for s in sites}
    assert len(digests) == 1  # FFE: one set of plans, from the merged fingerprint
    for s in sites:  # each site's census carries the region definitions
        census = run.fed.bucket.read(layout.site_census(s), SiteCensus).doc
        assert census.labels == {"background": 0, "whole": [1, 2], "core": 2}
    trainer = run.sites["A"].work.session.trainer
    assert trainer.label_manager.has_regions and trainer.label_manager.foreground_regions == [(1, 2), 2]
    # nnU-Net's per-region pseudo-Dice reaches the bucket under dataset.json's region names
    for s in sites:
        metrics = _updates(run, s)[-1].metrics
        assert {"dice_whole", "dice_core"} <= set(metrics), metrics
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("dice_whole", "dice_core"))
    # status shows them by name, in the table too
    from fedfs.ops.status import collect_status, render_status

    status = collect_status(run.fed)
    assert set(status["sites"]["A"]["pseudo_dice_by_target"]) == {"whole", "core"}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_status(status))
    text = console.export_text()
    assert "whole 0." in text and "core 0." in text
    # and so does the report's Sites table
    from fedfs.ops.report import build_report

    page = build_report(run.fed, regions["root"] / "report.html").read_text()
    assert "whole 0." in page and "core " in page


@pytest.mark.nnunet
def test_ffe_region_model_predicts_label_maps_scored_per_region(regions):
    doc = json.loads((regions["model"] / "dataset.json").read_text())
    assert doc["regions_class_order"] == [1, 2]
    for s, sp in regions["sites"].items():
        pred = regions["preds"][s]
        assert _labels(pred) <= {0, 1, 2} and 2 in _labels(pred)  # regions written back as labels 1, 2
        per_case = dice_per_case(pred, sp.labels_ts, dataset_json=doc, per_target=True)
        assert len(per_case) == sp.n_test
        whole = np.nanmean([c["whole"] for c in per_case.values()])
        core = np.nanmean([c["core"] for c in per_case.values()])
        assert whole >= 0.7 and core >= 0.3, per_case


@pytest.mark.nnunet
def test_ffe_trains_with_the_ignore_label_on_sparse_labels(sparse):
    run, sites = sparse["run"], sparse["sites"]
    assert run.versions()[-1].final
    assert all(2 in _labels(sp.labels_tr) for sp in sites.values())  # sparse training labels
    lm = run.sites["A"].work.session.trainer.label_manager
    assert lm.has_ignore_label and lm.ignore_label == 2 and lm.num_segmentation_heads == 2
    for s in sites:  # each site's census carries dataset.json's labels, the ignore label included
        census = run.fed.bucket.read(layout.site_census(s), SiteCensus).doc
        assert census.labels == {"background": 0, "lesion": 1, "ignore": 2}
    for s in sites:
        assert "dice_lesion" in _updates(run, s)[-1].metrics


@pytest.mark.nnunet
def test_ignore_label_model_never_predicts_ignore_and_dice_skips_it(sparse):
    doc = json.loads((sparse["model"] / "dataset.json").read_text())
    for s, sp in sparse["sites"].items():
        pred = sparse["preds"][s]
        assert _labels(pred) <= {0, 1}
        dense = dice_per_case(pred, sp.labels_ts, dataset_json=doc)  # dense references: plain Dice
        assert np.nanmean(list(dense.values())) >= 0.7, dense
    # against a sparse reference, the unannotated voxels count for nothing
    sp = sparse["sites"]["A"]
    case = sorted(sp.labels_tr.iterdir())[0].name
    (sparse["root"] / "one").mkdir()
    (sparse["root"] / "one" / case.replace(".nii.gz", "_0000.nii.gz")).symlink_to(
        sp.images_tr / case.replace(".nii.gz", "_0000.nii.gz"))
    pred = _predict_in_process(sparse["model"], sparse["root"] / "one", sparse["root"] / "pred-one")
    (sparse["root"] / "ref-one").mkdir()
    (sparse["root"] / "ref-one" / case).symlink_to(sp.labels_tr / case)
    skipped = dice_per_case(pred, sparse["root"] / "ref-one", dataset_json=doc)
    counted = dice_per_case(pred, sparse["root"] / "ref-one", [1])  # ignore voxels as background
    assert skipped[case[:-7]] > counted[case[:-7]], (skipped, counted)
