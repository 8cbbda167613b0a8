"""3D nnU-Net for real: ``3d_fullres`` trained through FFE and AsymFedAvg, exported, predicted.

Two tiny 3D sites (:data:`fedfs.testing.synthetic.DEFAULT_STYLES_3D`: an isotropic 20^3 and an
anisotropic 12x24x24 with 2 mm slices) train nnU-Net's own ``3d_fullres`` networks (tiny trainer:
real network, loss, augmentation and schedule, CPU-sized epochs). The parties are the library's
roles stepped in one process on a folder bucket (the CLI daemons run the same steps; the 2D
tests run those as processes). Each federation is exported with :mod:`fedfs.ops.export` into an
``nnUNet_results`` folder and predicted with the real ``nnUNetv2_predict`` command; the
segmentations are checked against the dense held-out references.

The raw data is written once; FFE and AsymFedAvg each get their own ``nnUNet_preprocessed`` and
``nnUNet_results``, because FFE and local fingerprints give the same dataset different plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nnunetv2  # noqa: F401 - a missing nnU-Net fails here, it is not skipped
import SimpleITK as sitk

from fedfs import layout
from fedfs.federation import Federation
from fedfs.nnunet.build import trainer_search_path
from fedfs.nnunet.inference import dice_per_case, predict_from_results
from fedfs.ops.export import export_site_model
from fedfs.protocol.schema import PlansDocument
from fedfs.testing import synthetic as syn
from nnunet_steps import TINY, step_federation

pytestmark = pytest.mark.nnunet

SITES = {"A": (941, syn.DEFAULT_STYLES_3D[0]), "B": (942, syn.DEFAULT_STYLES_3D[1])}
#: Rounds of one local epoch each. AsymFedAvg needs two: v0 gives each site its own random
#: initialisation, so after one round the shared layers are a mean of unrelated networks (Dice 0
#: here; fedfs.roles.setup_phase's asym v0); the second round repairs it.
ROUNDS = {"ffe": 2, "asym": 1}  # asym: v0 shares the first site's initial values, so one round is enough
ITERATIONS = 20  # per local epoch (5 validation iterations, the tiny trainer's)
#: After 20-40 iterations, tiny 3D nets find the bright blobs (nnU-Net's pseudo-Dice about 0.95);
#: a broken 3D path (wrong axes, spacing, plans) gives a Dice near 0.
DICE_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The two sites' raw 3D datasets (and held-out cases), and nnU-Net's environment."""
    root = tmp_path_factory.mktemp("nnunet3d")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_extTrainer", trainer_search_path())
        mp.setenv("nnUNet_n_proc_DA", "0")
        mp.setenv("nnUNet_def_n_proc", "1")
        mp.setenv("FEDFS_TORCH_THREADS", "1")  # one torch thread: 2 shared cores, oversubscribed else
        sites = {s: syn.make_site(root / "raw", ds, f"Vol{s}", style=style, seed=11, test_root=root / "heldout")
                 for s, (ds, style) in SITES.items()}
        yield root, sites, mp


def _run_federation(root: Path, sites: dict, mp: pytest.MonkeyPatch, mode: str) -> dict:
    """Step the aggregator and both sites to the final global; export every site's model and
    predict its held-out cases with ``nnUNetv2_predict``."""
    work = root / mode
    mp.setenv("nnUNet_preprocessed", str(work / "pre"))
    mp.setenv("nnUNet_results", str(work / "res"))
    run = step_federation(work, {s: sp.dataset_id for s, sp in sites.items()}, mode=mode,
                          configuration="3d_fullres", rounds=ROUNDS[mode], iterations=ITERATIONS)
    exported = {s: export_site_model(run.party(s), s, str(sp.dataset_id), work / "export" / s, trainer=TINY,
                                     in_results=work / "export" / s) for s, sp in sites.items()}
    # FFE: one final model for everyone, so site A's export segments both sites' held-out cases in one
    # nnUNetv2_predict run; AsymFedAvg: each site's own model on its own cases
    jobs = {"A": list(sites)} if mode == "ffe" else {s: [s] for s in sites}
    dice = {}
    for s, cases_of in jobs.items():
        images = work / "images" / s
        images.mkdir(parents=True)
        for other in cases_of:
            for f in sites[other].images_ts.iterdir():
                (images / f.name).symlink_to(f)
        pred = work / "pred" / s
        predict_from_results(work / "export" / s, sites[s].dataset_id, "3d_fullres", images, pred, fold=0,
                             trainer="nnUNetTrainer", num_processes=0, timeout=600)  # 0: no worker pools
        for other in cases_of:
            dice[other] = dice_per_case(pred, sites[other].labels_ts)
            (work / "pred-of").mkdir(exist_ok=True)
            if not (work / "pred-of" / other).exists():
                (work / "pred-of" / other).symlink_to(pred)
    return {"run": run, "fed": run.fed, "dice": dice, "exported": exported, "work": work}


@pytest.fixture(scope="module")
def ffe(raw):
    root, sites, mp = raw
    return _run_federation(root, sites, mp, "ffe")


@pytest.fixture(scope="module")
def asym(raw, ffe):  # after ffe: the two federations switch nnU-Net's folders in turn
    root, sites, mp = raw
    return _run_federation(root, sites, mp, "asym")


def _plans(fed: Federation, site: str) -> PlansDocument:
    return fed.bucket.read(layout.site_plans(site), PlansDocument).doc


def test_synthetic_3d_sites_are_volumes_with_their_spacing(raw):
    _, sites, _ = raw
    for s, (_, style) in SITES.items():
        im = sitk.ReadImage(str(next(sites[s].images_tr.iterdir())))
        assert im.GetDimension() == 3
        assert sitk.GetArrayFromImage(im).shape == style.image_size
        assert im.GetSpacing() == pytest.approx(tuple(reversed(style.spacing)))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next(sites[s].labels_tr.iterdir()))))
        assert set(np.unique(seg)) == {0, 1}


def test_ffe_trains_one_3d_fullres_network_for_everyone(ffe):
    fed = ffe["fed"]
    versions = ffe["run"].versions()
    assert len(versions) == ROUNDS["ffe"] + 1 and versions[-1].final
    assert [sorted(c.site for c in v.contributions) for v in versions[1:]] == [sorted(SITES)] * ROUNDS["ffe"]
    plans = {s: _plans(fed, s) for s in SITES}
    assert len({p.digest for p in plans.values()}) == 1  # FFE: one set of plans
    conf = plans["A"].summary
    assert conf["configuration"] == "3d_fullres"
    # nnU-Net planned a real 3D network from the merged fingerprint (pooled spacings and shapes)
    saved = json.loads((ffe["work"] / "pre" / "Dataset941_VolA" / "nnUNetPlans.json").read_text())
    arch = saved["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["conv_op"].endswith("Conv3d") and arch["n_stages"] >= 3
    assert len(saved["configurations"]["3d_fullres"]["patch_size"]) == 3


def test_ffe_3d_model_exports_and_predicts_with_nnunetv2_predict(ffe, raw):
    import torch

    _, sites, _ = raw
    weights = [torch.load(f / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
               for f in ffe["exported"].values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # one global model
    for s, folder in ffe["exported"].items():
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
        assert folder.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
        pred = ffe["work"] / "pred-of" / s
        for case in sites[s].labels_ts.iterdir():  # predictions are volumes on the reference grid
            ref, out = sitk.ReadImage(str(case)), sitk.ReadImage(str(pred / case.name))
            assert out.GetSize() == ref.GetSize() and out.GetSpacing() == pytest.approx(ref.GetSpacing())
            assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1}
        values = list(ffe["dice"][s].values())
        assert len(values) == sites[s].n_test
        assert np.nanmean(values) >= DICE_THRESHOLD, ffe["dice"]


def test_asym_trains_each_site_its_own_3d_plans(asym):
    fed = asym["fed"]
    versions = asym["run"].versions()
    assert len(versions) == ROUNDS["asym"] + 1 and versions[-1].final
    plans = {s: _plans(fed, s) for s in SITES}
    assert plans["A"].digest != plans["B"].digest  # isotropic vs thick slices: different 3D networks
    assert all(set(v.site_blobs) == set(SITES) for v in versions)  # personalised models
    sharing = versions[1].report["sharing"]
    assert all(v["shared_tensors"] > 0 for v in sharing.values()), sharing
    patch = {s: json.loads((asym["work"] / "pre" / sp / "nnUNetPlans.json").read_text())
             ["configurations"]["3d_fullres"]["patch_size"]
             for s, sp in (("A", "Dataset941_VolA"), ("B", "Dataset942_VolB"))}
    assert patch["A"] != patch["B"], patch


def test_asym_3d_models_export_and_predict_with_nnunetv2_predict(asym, raw):
    _, sites, _ = raw
    for s, folder in asym["exported"].items():
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
        values = list(asym["dice"][s].values())
        assert len(values) == sites[s].n_test
        assert np.nanmean(values) >= DICE_THRESHOLD, asym["dice"]
