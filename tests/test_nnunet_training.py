"""NnunetSession against real nnU-Net on CPU: one tiny synthetic 2D site, the tiny trainer.

The site (8 training, 2 held-out cases) is planned and preprocessed with nnU-Net's own API;
the trainer is found by name through ``nnUNet_extTrainer``. One session trains, swaps weights,
and stops; a new one resumes from nnU-Net's checkpoint, finishes with nnU-Net's validation;
the weights are exported as a model folder that nnU-Net's real prediction commands run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

import nnunetv2  # noqa: F401 - a missing nnU-Net fails here, it is not skipped
import SimpleITK  # noqa: F401
import torch

from fedfs.testing import synthetic as syn  # noqa: E402
from fedfs.errors import NnunetError  # noqa: E402
from fedfs.nnunet.inference import (ModelSpec, dice_per_case, export_model_folder,  # noqa: E402
                                    model_folder_in_results, predict_folder, predict_from_results)
from fedfs.nnunet.network import bare_network  # noqa: E402
from fedfs.nnunet.training import NnunetSession, trainer_search_path  # noqa: E402

pytestmark = pytest.mark.nnunet

DATASET = 731
TINY = "nnUNetTrainerFedfsTiny"
SESSION_ENV = {"nnUNet_n_proc_DA": "0"}  # single-threaded augmentation: fastest on 2 cores


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A planned and preprocessed synthetic site; nnU-Net's folders in the environment."""
    root = tmp_path_factory.mktemp("nnunet_training")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        mp.setenv("nnUNet_extTrainer", trainer_search_path())
        mp.delenv("nnUNet_n_proc_DA", raising=False)  # nnU-Net's planner crashes with 0 (set_num_threads(0))
        sp = syn.make_site(root / "nnUNet_raw", DATASET, "Tiny", n_train=8, n_test=2,
                           style=syn.DEFAULT_STYLES[0], seed=3, test_root=root / "heldout")
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints,
                                                                          plan_experiments, preprocess)
        extract_fingerprints([DATASET], num_processes=1, verbose=False, show_progress_bar=False)
        plan_experiments([DATASET])
        preprocess([DATASET], configurations=("2d",), num_processes=(1,), show_progress_bar=False)
        yield root, sp


def _session(total_epochs: int = 3, **kwargs) -> NnunetSession:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback when nnU-Net's search breaks
        return NnunetSession.create(DATASET, "2d", 0, TINY, total_epochs=total_epochs, env=SESSION_ENV, **kwargs)


def _outputs(session: NnunetSession, x: torch.Tensor) -> torch.Tensor:
    net = bare_network(session.trainer)
    net.eval()
    with torch.no_grad():
        out = net(x)
    return (out[0] if isinstance(out, (list, tuple)) else out).clone()


def _optimizer_tensors(session: NnunetSession) -> list[torch.Tensor]:
    state = session.trainer.optimizer.state_dict()["state"]
    return [v for k in sorted(state) for v in state[k].values() if isinstance(v, torch.Tensor)]


def test_module_import_is_cheap():
    code = ("import sys, fedfs.nnunet.training, fedfs.testing.synthetic, fedfs.nnunet.trainers; "
            "bad = [m for m in ('torch', 'nnunetv2', 'SimpleITK') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_swap_resume_finish_export_predict(site, tmp_path):
    root, sp = site
    # Prepare: a session built as nnUNetv2_train would, with num_epochs and iterations set up front.
    s = _session()
    assert type(s.trainer).__name__ == TINY
    assert (s.trainer.num_epochs, s.trainer.num_iterations_per_epoch, s.trainer.num_val_iterations_per_epoch) \
        == (3, 10, 5)
    assert s.output_folder == root / "nnUNet_results" / sp.dataset_name / f"{TINY}__nnUNetPlans__2d" / "fold_0"
    assert s.resume() is False

    # Execute: one epoch of nnU-Net's loop.
    m1 = s.train_epochs(1)
    assert m1["epoch"] == 1 and m1["num_epochs"] == 3
    assert m1["train_loss"] is not None and m1["val_loss"] is not None and m1["pseudo_dice"] is not None
    assert m1["lr"] == pytest.approx(s.trainer.initial_lr)
    assert (m1["num_train_cases"], m1["num_val_cases"]) == (6, 2)
    assert (s.output_folder / "checkpoint_latest.pth").is_file()
    assert torch.load(s.output_folder / "checkpoint_latest.pth", weights_only=False)["current_epoch"] == 1

    # weights(): canonical, detached copies; load_weights() restores outputs exactly.
    w = s.weights()
    full = bare_network(s.trainer).state_dict()
    assert len(w) < len(full) and set(w) <= set(full)
    assert all(not k.startswith("_orig_mod.") and t.device.type == "cpu" and t.is_contiguous() for k, t in w.items())
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    before = _outputs(s, x)
    with torch.no_grad():
        for p in bare_network(s.trainer).parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.equal(_outputs(s, x), before)
    loaded, kept = s.load_weights(w)
    assert sorted(loaded) == sorted(w) and kept == []
    assert torch.equal(_outputs(s, x), before)
    next(iter(w.values())).add_(1.0)  # the copies are not the network's tensors
    assert torch.equal(_outputs(s, x), before)

    m2 = s.train_epochs(1)
    assert m2["epoch"] == 2 and m2["lr"] < m1["lr"]
    weights_at_2, optimizer_at_2 = s.weights(), _optimizer_tensors(s)
    s.close()

    # A new session (a restarted site) resumes from nnU-Net's checkpoint_latest.
    r = _session()
    assert r.resume() is True and r.resumed_from.name == "checkpoint_latest.pth"
    assert r.epoch == 2
    resumed = r.weights()
    assert all(torch.equal(resumed[k], weights_at_2[k]) for k in weights_at_2)
    assert len(optimizer_at_2) > 0
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_tensors(r), optimizer_at_2, strict=True))
    assert r.trainer.logger.get_value("train_losses", step=None)[:2] == pytest.approx(
        [m1["train_loss"], m2["train_loss"]])
    m3 = r.train_epochs(1)
    assert m3["epoch"] == 3
    with pytest.raises(NnunetError, match="num_epochs"):
        r.train_epochs(1)

    done = r.finish(validate=True, validation_processes=1)
    assert done.checkpoint_final == r.output_folder / "checkpoint_final.pth" and done.checkpoint_final.is_file()
    assert not (r.output_folder / "checkpoint_latest.pth").exists()
    assert torch.load(done.checkpoint_final, weights_only=False)["current_epoch"] == 3
    assert done.summary_file is not None and done.validation_dice is not None

    # Export the final weights; nnU-Net's own commands predict the held-out cases with them.
    final = r.weights()
    model = export_model_folder(r, final, tmp_path / "model", fold=0)
    assert {p.name for p in model.iterdir()} >= {"dataset.json", "plans.json", "dataset_fingerprint.json", "fold_0"}
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert set(ckpt["network_weights"]) == set(full)  # aliases re-derived
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["init_args"]["configuration"] == "2d"
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1)
    pred = predict_folder(model, sp.images_ts, tmp_path / "pred_m", fold=0)
    dice = dice_per_case(pred, sp.labels_ts)
    assert len(dice) == 2
    assert min(dice.values()) > 0.5, dice

    results = tmp_path / "results"
    spec = r.spec()
    export_model_folder(spec, final, model_folder_in_results(results, spec), fold=0)
    pred_d = predict_from_results(results, DATASET, "2d", sp.images_ts, tmp_path / "pred_d", fold=0)
    assert dice_per_case(pred_d, sp.labels_ts) == pytest.approx(dice)


def test_partial_and_strict_load(site):
    root, sp = site
    s = _session(total_epochs=1, output_folder_suffix="__fedfs")
    assert s.output_folder == root / "nnUNet_results" / sp.dataset_name / f"{TINY}__nnUNetPlans__2d__fedfs" / "fold_0"
    assert os.path.dirname(s.trainer.log_file) == str(s.output_folder) and os.path.isfile(s.trainer.log_file)
    assert s.resume() is False
    w = s.weights()
    names = sorted(w)
    dropped, reshaped = names[0], names[1]
    incoming = {k: torch.zeros_like(v) for k, v in w.items() if k != dropped}
    incoming[reshaped] = torch.zeros(3, 3)
    incoming["_orig_mod." + names[2]] = incoming.pop(names[2])  # a compiled network's key
    incoming["decoder.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(NnunetError, match="missing 1.*unexpected 1.*shape-mismatched 1"):
        s.load_weights(incoming)
    loaded, kept = s.load_weights(incoming, partial=True)
    assert kept == sorted([dropped, reshaped])
    assert sorted(loaded) == sorted(set(names) - {dropped, reshaped})
    now = s.weights()
    assert torch.equal(now[dropped], w[dropped]) and torch.equal(now[reshaped], w[reshaped])
    assert all(torch.count_nonzero(now[k]) == 0 for k in loaded)

    # A torch.compile'd network (nnU-Net's default on CUDA) has the same canonical keys.
    s.trainer.network = torch.compile(s.trainer.network)  # lazy: nothing is compiled until a forward pass
    assert any(k.startswith("_orig_mod.") for k in s.trainer.network.state_dict())
    assert sorted(s.weights()) == names
    assert sorted(s.load_weights({"_orig_mod." + k: v for k, v in w.items()})[0]) == names
    assert all(torch.equal(s.weights()[k], w[k]) for k in names)
    s.close()


def test_export_from_plans_without_a_trainer(site, tmp_path):
    """The aggregator has no trainer: a spec from nnU-Net's files builds the same checkpoint."""
    root, sp = site
    s = _session(total_epochs=1)
    from_session = s.spec()
    from_files = ModelSpec.from_preprocessed(DATASET, "2d", trainer_name="nnUNetTrainer")
    assert from_files == from_session
    export_model_folder(from_files, s.weights(), tmp_path / "m", fold="all")
    ckpt = torch.load(tmp_path / "m" / "fold_all" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["init_args"]["fold"] == "all" and ckpt["trainer_name"] == "nnUNetTrainer"
    with pytest.raises(NnunetError, match="do not fit"):
        export_model_folder(from_files, {}, tmp_path / "bad")
    s.close()
    assert os.listdir(tmp_path / "m" / "fold_all") == ["checkpoint_final.pth"]


def test_learning_rate_follows_the_federation_when_ahead(site):
    """A site behind the federation (slow, or it missed rounds) takes the poly learning rate of
    the federation's epoch; its own epoch counter, checkpoint and log stay nnU-Net's."""
    s = _session(total_epochs=10)
    try:
        t = s.trainer
        poly = [t.initial_lr * (1 - e / 10) ** 0.9 for e in range(10)]
        m = s.train_epochs(1, schedule_epoch=6)
        assert m["epoch"] == 1
        assert m["lr"] == pytest.approx(poly[6])
        assert t.logger.get_value("lrs", step=None) == pytest.approx([poly[6]])
        m = s.train_epochs(1, schedule_epoch=0)  # behind the site's own epoch: nnU-Net's own schedule
        assert m["epoch"] == 2 and m["lr"] == pytest.approx(poly[1])
        m = s.train_epochs(2, schedule_epoch=50)  # past the end: the schedule's last epoch
        assert m["epoch"] == 4 and m["lr"] == pytest.approx(poly[9])
        assert torch.load(s.output_folder / "checkpoint_latest.pth", weights_only=False)["current_epoch"] == 4
    finally:
        (s.output_folder / "checkpoint_latest.pth").unlink(missing_ok=True)
        s.close()
