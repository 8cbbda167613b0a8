"""``fedfs export``: a site's final model as an nnU-Net trained-model folder.

FFE: the final global model; AsymFedAvg: the site's personalised final model.
The folder holds ``dataset.json``, ``plans.json`` and
``fold_X/checkpoint_final.pth`` in nnU-Net's format, so ``nnUNetv2_predict``
(when written under ``nnUNet_results``) and ``nnUNetv2_predict_from_modelfolder``
run it unchanged. Runs at a site: the plans and dataset.json are its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, NotFound
from ..federation import Federation
from ..protocol import layout
from ..protocol.schema import GlobalManifest

if TYPE_CHECKING:
    from ..trust.bucket import Signed

__all__ = ["final_manifest", "export_site_model"]


def final_manifest(fed: Federation, *, require_final: bool = True) -> Signed[GlobalManifest]:
    """The newest global manifest; ConfigError unless it is final (``require_final``), NotFound before v0."""
    v = fed.bucket.latest_version()
    if v is None:
        raise NotFound("no global model yet")
    m = fed.bucket.read(layout.global_version(v), GlobalManifest)
    if require_final and not m.doc.is_final(fed.config.rounds):
        raise ConfigError(f"the federation is at v{v} of {fed.config.rounds}: not finished "
                          "(pass --allow-unfinished to export it anyway)")
    return m


def export_site_model(fed: Federation, site: str, dataset: str, out_dir: str | os.PathLike[str], *,
                      configuration: str | None = None, fold: int | str | None = None, trainer: str = "nnUNetTrainer",
                      plans: str | None = None, in_results: str | os.PathLike[str] | None = None,
                      require_final: bool = True) -> Path:
    """Write ``site``'s final model; with ``in_results``, under nnU-Net's results layout there
    (so ``nnUNetv2_predict -d`` finds it) and return that folder. ``plans`` defaults to the plans
    identifier the federation trains (federation.json); another one is a ConfigError. ``fold``
    defaults to the federation's."""
    from ..nnunet.inference import ModelSpec, export_model_folder, model_folder_in_results
    from ..weights.tensors import load_weights

    federation_plans = fed.config.plans_name or plans
    if plans and federation_plans and plans != federation_plans:
        raise ConfigError(f"-p {plans}: this federation trains the plans {federation_plans} (federation.json)")
    plans = plans or federation_plans or "nnUNetPlans"
    fold = fed.config.fold if fold is None else fold  # the federation's fold (docs/nnunet.md, Folds)
    try:
        manifest = final_manifest(fed, require_final=require_final)
    except NotFound:
        raise ConfigError("no global model yet: nothing to export") from None
    ref = manifest.doc.blob_for(site)
    if ref is None:
        raise ConfigError(f"v{manifest.doc.version} has no model for site {site}")
    tmp = Path(out_dir if in_results is None else in_results) / f".{ref.sha256}.safetensors"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fed.bucket.get_blob_file(ref, str(tmp))
    try:
        tensors, _ = load_weights(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    inference_trainer = "nnUNetTrainer" if trainer.startswith("nnUNetTrainerFedfs") else trainer
    spec = ModelSpec.from_preprocessed(dataset, configuration or fed.config.configuration, inference_trainer, plans)
    target = model_folder_in_results(in_results, spec) if in_results is not None else Path(out_dir)
    return export_model_folder(spec, tensors, target, fold, current_epoch=fed.config.rounds * fed.config.local_epochs)
