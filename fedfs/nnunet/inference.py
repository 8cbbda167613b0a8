"""Federated weights as an nnU-Net trained-model folder, prediction with nnU-Net's commands, Dice.

:func:`export_model_folder` writes ``dataset.json``, ``plans.json`` (and
``dataset_fingerprint.json``) plus ``fold_X/checkpoint_final.pth`` in nnU-Net's checkpoint format,
so ``nnUNetv2_predict_from_modelfolder -m FOLDER -f X`` and, when the folder is
``nnUNet_results/DatasetXXX/Trainer__Plans__conf``, ``nnUNetv2_predict -d ...`` run it unchanged.
nnU-Net's predictor reads four keys of the checkpoint: ``network_weights`` (a full
``state_dict``, aliases included), ``trainer_name`` (it looks the class up by name, through
``nnUNet_extTrainer`` for classes outside nnunetv2, and asks it to build the network),
``init_args['configuration']`` and ``inference_allowed_mirroring_axes``. The aliased keys are
re-derived by loading the canonical tensors into a freshly built network and calling its
``state_dict()``.

Prediction runs nnU-Net's real console commands in a subprocess (they start spawn pools and
guard their own ``__main__``); :func:`dice_per_case` uses nnU-Net's ``compute_metrics`` per case,
in-process and without a pool, on the dataset's labels, or its regions (each scored on the union
of its labels) and without the voxels of its ignore label; :func:`evaluation_targets` and
:func:`dice_scores` are the same rules in plain numpy, :func:`named_dice` names nnU-Net's
per-class pseudo-Dice list for status and report. nnunetv2 and torch are imported inside
functions only.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NnunetError
from .build import trainer_search_path

if TYPE_CHECKING:
    import torch


__all__ = ["ModelSpec", "export_model_folder", "model_folder_in_results", "predict_folder",
           "predict_from_results", "dice_per_case", "EvaluationTarget", "evaluation_targets", "targets_of",
           "dice_scores", "named_dice"]


def _load_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class ModelSpec:
    """Everything but the weights that an nnU-Net model folder holds.

    ``trainer_name`` is the name written into the checkpoint, which nnU-Net's predictor looks
    up to build the network. A trainer class may name a stock trainer that builds the same
    network in ``fedfs_inference_trainer`` (fedfs's tiny trainer names ``nnUNetTrainer``), so
    exported models run on a plain nnU-Net install without fedfs or ``nnUNet_extTrainer``.
    """

    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str
    inference_allowed_mirroring_axes: tuple[int, ...] | None
    fingerprint: dict | None = None
    init_args: dict | None = field(default=None, compare=False)
    trainer_class: type | None = field(default=None, compare=False)  # saves a lookup by name

    @classmethod
    def from_trainer(cls, t: Any) -> ModelSpec:
        """The model an initialised nnU-Net trainer trains (its plans, dataset.json, class, mirroring axes)."""
        axes = t.inference_allowed_mirroring_axes
        if axes is None:  # set by get_dataloaders or a checkpoint; compute it the trainer's way
            axes = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
        fp_file = Path(t.preprocessed_dataset_folder_base or "", "dataset_fingerprint.json")
        return cls(plans=t.plans_manager.plans, dataset_json=t.dataset_json, configuration=t.configuration_name,
                   trainer_name=getattr(type(t), "fedfs_inference_trainer", type(t).__name__),
                   inference_allowed_mirroring_axes=tuple(axes) if axes is not None else None,
                   fingerprint=_load_json(fp_file) if fp_file.is_file() else None,
                   init_args=dict(t.my_init_kwargs), trainer_class=type(t))

    @classmethod
    def from_files(cls, plans_file: str | os.PathLike, dataset_json_file: str | os.PathLike, configuration: str,
                   trainer_name: str = "nnUNetTrainer", fingerprint_file: str | os.PathLike | None = None,
                   inference_allowed_mirroring_axes: tuple[int, ...] | None | str = "auto") -> ModelSpec:
        """A model described by nnU-Net's files (e.g. the federation's plans), without a trainer.

        ``"auto"`` mirroring axes follow nnUNetTrainer's rule: every spatial axis of the
        configuration's patch (``(0, 1)`` in 2D, ``(0, 1, 2)`` in 3D). Trainers that change
        mirroring (e.g. ``nnUNetTrainerNoMirroring``) need the value given explicitly.
        """
        plans = _load_json(Path(plans_file))
        if configuration not in plans.get("configurations", {}):
            raise NnunetError(f"plans {plans_file} have no configuration {configuration!r}")
        axes = inference_allowed_mirroring_axes
        if axes == "auto":
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            axes = tuple(range(len(PlansManager(plans).get_configuration(configuration).patch_size)))
        fp = _load_json(Path(fingerprint_file)) if fingerprint_file and Path(fingerprint_file).is_file() else None
        return cls(plans=plans, dataset_json=_load_json(Path(dataset_json_file)), configuration=configuration,
                   trainer_name=trainer_name, inference_allowed_mirroring_axes=axes, fingerprint=fp)

    @classmethod
    def from_preprocessed(cls, dataset: str | int, configuration: str, trainer_name: str = "nnUNetTrainer",
                          plans_identifier: str = "nnUNetPlans",
                          preprocessed: str | os.PathLike | None = None) -> ModelSpec:
        """The model nnU-Net would train from ``nnUNet_preprocessed/DatasetXXX`` (plans, dataset.json)."""
        root = Path(preprocessed or os.environ.get("nnUNet_preprocessed") or "")
        if not str(root) or not root.is_dir():
            raise NnunetError("nnUNet_preprocessed is not set or not a folder")
        name = str(dataset)
        if not name.startswith("Dataset"):
            matches = sorted(root.glob(f"Dataset{int(dataset):03d}_*"))
            if len(matches) != 1:
                raise NnunetError(f"expected one preprocessed folder for dataset {dataset} in {root}, "
                                  f"found {len(matches)}")
            name = matches[0].name
        base = root / name
        return cls.from_files(base / f"{plans_identifier}.json", base / "dataset.json", configuration,
                              trainer_name, base / "dataset_fingerprint.json")

    def build_network(self) -> Any:
        """The network as nnU-Net's predictor builds it (deep supervision off), on CPU."""
        import inspect

        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        trainer_class = self.trainer_class
        if trainer_class is None:
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            try:
                trainer_class = recursive_find_trainer_class_by_name(self.trainer_name)
            except RuntimeError as exc:
                raise NnunetError(str(exc)) from exc
        pm = PlansManager(self.plans)
        cm = pm.get_configuration(self.configuration)
        n_in = determine_num_input_channels(pm, cm, self.dataset_json)
        n_out = pm.get_label_manager(self.dataset_json).num_segmentation_heads
        if "plans_manager" not in inspect.signature(trainer_class.build_network_architecture).parameters:
            raise NnunetError(f"{self.trainer_name} uses nnU-Net's old build_network_architecture signature")
        return trainer_class.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)


def model_folder_in_results(results_root: str | os.PathLike, spec: ModelSpec) -> Path:
    """Where ``nnUNetv2_predict -d DATASET -c CONF -tr TRAINER -p PLANS`` looks for the model:
    ``<nnUNet_results>/DatasetXXX_Name/Trainer__Plans__conf``."""
    return Path(results_root, spec.plans["dataset_name"],
                f"{spec.trainer_name}__{spec.plans['plans_name']}__{spec.configuration}")


def _atomic_write_json(doc: Mapping[str, Any], path: Path) -> None:
    import json

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=4, sort_keys=False))
    os.replace(tmp, path)


def export_model_folder(source: ModelSpec | Any, weights: Mapping[str, torch.Tensor],
                        out_dir: str | os.PathLike, fold: int | str = 0, *,
                        checkpoint_name: str = "checkpoint_final.pth", current_epoch: int | None = None,
                        as_trainer: str | None = None) -> Path:
    """Write an nnU-Net trained-model folder for ``weights`` (canonical tensors); return ``out_dir``.

    ``out_dir`` gets ``dataset.json``, ``plans.json``, ``dataset_fingerprint.json`` (if known)
    and ``fold_<fold>/<checkpoint_name>``. The checkpoint has nnU-Net's keys; the training-only
    ones (``optimizer_state``, ``grad_scaler_state``, ``logging``, ``_best_ema``) are ``None``,
    so it predicts but cannot be continued with ``nnUNetv2_train --c``. ``as_trainer`` records
    another trainer name, for trainers that build the same network (``nnUNetTrainerFedfsTiny``
    -> ``"nnUNetTrainer"``), so plain nnU-Net finds it without ``nnUNet_extTrainer``.
    Files are written to temporary names and renamed, so a crash leaves no torn checkpoint.
    """
    import torch

    spec = source if isinstance(source, ModelSpec) else source.spec()  # an NnunetSession
    if fold != "all":
        fold = int(fold)
    network = spec.build_network()
    target = dict(network.named_parameters())
    target.update(network.named_buffers())
    incoming = {k.replace("_orig_mod.", ""): v for k, v in weights.items()}
    missing, unexpected = sorted(target.keys() - incoming.keys()), sorted(incoming.keys() - target.keys())
    bad = sorted(k for k in target.keys() & incoming.keys() if tuple(target[k].shape) != tuple(incoming[k].shape))
    if missing or unexpected or bad:
        raise NnunetError(f"weights do not fit the {spec.configuration} network of {spec.trainer_name}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape-mismatched {bad[:3]}")
    with torch.no_grad():
        for k, dst in target.items():
            dst.copy_(incoming[k].to(dtype=dst.dtype))
    init_args = dict(spec.init_args) if spec.init_args else {
        "plans": spec.plans, "configuration": spec.configuration, "dataset_json": spec.dataset_json,
        "device": torch.device("cpu")}
    init_args["fold"] = fold
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": current_epoch,
        "init_args": init_args,
        "trainer_name": as_trainer or spec.trainer_name,
        "inference_allowed_mirroring_axes": spec.inference_allowed_mirroring_axes,
    }
    out = Path(out_dir)
    fold_dir = out / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(spec.dataset_json, out / "dataset.json")
    _atomic_write_json(spec.plans, out / "plans.json")
    if spec.fingerprint is not None:
        _atomic_write_json(spec.fingerprint, out / "dataset_fingerprint.json")
    tmp = fold_dir / f".{checkpoint_name}.{os.getpid()}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, fold_dir / checkpoint_name)
    return out


# ---------------------------------------------------------------------- prediction (subprocess)

def _command(name: str) -> list[str]:
    """nnU-Net's console script, preferring the one next to this interpreter (same venv)."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found:
        return [found]
    module, func = {"nnUNetv2_predict_from_modelfolder": ("predict_from_raw_data", "predict_entry_point_modelfolder"),
                    "nnUNetv2_predict": ("predict_from_raw_data", "predict_entry_point")}[name]
    return [sys.executable, "-c", f"from nnunetv2.inference.{module} import {func}; {func}()"]


def _prediction_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """os.environ + ``extra``, with fedfs's trainer folder appended to ``nnUNet_extTrainer``."""
    env = dict(os.environ)
    env.update(extra or {})
    ours = trainer_search_path()
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ours not in paths:
        env["nnUNet_extTrainer"] = os.pathsep.join(paths + [ours])
    return env


def _run(cmd: list[str], env: Mapping[str, str], timeout: float | None) -> None:
    try:
        proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NnunetError(f"{Path(cmd[0]).name} timed out after {timeout} s") from exc
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        raise NnunetError(f"{' '.join(cmd[:1])} failed with exit code {proc.returncode}:\n{tail}")


def _common_args(input_folder: str | os.PathLike, output_folder: str | os.PathLike, folds: Sequence[int | str],
                 device: str, checkpoint_name: str, num_processes: int, disable_tta: bool) -> list[str]:
    args = ["-i", str(input_folder), "-o", str(output_folder), "-f", *[str(f) for f in folds],
            "-chk", checkpoint_name, "-device", device, "-npp", str(num_processes), "-nps", str(num_processes),
            "--disable_progress_bar"]
    return args + (["--disable_tta"] if disable_tta else [])


def predict_folder(model_folder: str | os.PathLike, input_folder: str | os.PathLike,
                   output_folder: str | os.PathLike, fold: int | str | Sequence[int | str] = 0,
                   device: str = "cpu", *, checkpoint_name: str = "checkpoint_final.pth", num_processes: int = 1,
                   disable_tta: bool = False, env: Mapping[str, str] | None = None,
                   timeout: float | None = None) -> Path:
    """Segment ``input_folder`` (``CASE_0000.nii.gz`` ...) with ``nnUNetv2_predict_from_modelfolder``."""
    folds = [fold] if isinstance(fold, (int, str)) else list(fold)
    cmd = _command("nnUNetv2_predict_from_modelfolder") + ["-m", str(model_folder)] + _common_args(
        input_folder, output_folder, folds, device, checkpoint_name, num_processes, disable_tta)
    _run(cmd, _prediction_env(env), timeout)
    return Path(output_folder)


def predict_from_results(results_root: str | os.PathLike, dataset: str | int, configuration: str,
                         input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                         fold: int | str | Sequence[int | str] = 0, trainer: str = "nnUNetTrainer",
                         plans: str = "nnUNetPlans", device: str = "cpu", *,
                         checkpoint_name: str = "checkpoint_final.pth", num_processes: int = 1,
                         disable_tta: bool = False, env: Mapping[str, str] | None = None,
                         timeout: float | None = None) -> Path:
    """Segment ``input_folder`` with ``nnUNetv2_predict -d dataset -c configuration -tr trainer -p plans``,
    with ``nnUNet_results`` set to ``results_root``."""
    folds = [fold] if isinstance(fold, (int, str)) else list(fold)
    cmd = _command("nnUNetv2_predict") + ["-d", str(dataset), "-c", configuration, "-tr", trainer, "-p", plans]
    cmd += _common_args(input_folder, output_folder, folds, device, checkpoint_name, num_processes, disable_tta)
    _run(cmd, _prediction_env({**(env or {}), "nnUNet_results": str(results_root)}), timeout)
    return Path(output_folder)


# ---------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class EvaluationTarget:
    """One thing nnU-Net segments and fedfs scores: a label, or a region (the union of labels)."""

    name: str                      # dataset.json's key ("lesion", "whole")
    values: tuple[int, ...]        # label values whose union is the target ((1,) or (1, 2))

    @property
    def nnunet_key(self) -> int | tuple[int, ...]:
        """How nnU-Net's evaluation names it: the label value, or the region as a tuple."""
        return self.values[0] if len(self.values) == 1 else self.values


def evaluation_targets(labels: Mapping[str, Any], regions_class_order: Sequence[int] | None = None
                       ) -> tuple[list[EvaluationTarget], int | None]:
    """The foreground labels or regions of a dataset.json ``labels`` mapping, in the order nnU-Net
    trains and reports them (``dice_per_class_or_region``), and the ignore label (or None).

    Without regions: every foreground label by value, named by its key. With regions (a list
    value anywhere, as nnU-Net decides; ``regions_class_order`` required): every non-background
    entry in dataset.json's order, a scalar meaning the region of that one label. ``ignore`` is
    never a target. Pure: no nnU-Net needed, the same rules as nnU-Net's ``LabelManager``.
    """
    if "background" not in labels or isinstance(labels["background"], (list, tuple)) \
            or int(labels["background"]) != 0:
        raise NnunetError(f"dataset.json labels need background = 0, got {dict(labels)}")
    ignore = labels.get("ignore")
    if ignore is not None and (isinstance(ignore, (list, tuple, bool)) or not isinstance(ignore, int)):
        raise NnunetError(f"the ignore label must be one integer, got {ignore!r}")
    entries = [(str(k), tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),))
               for k, v in labels.items() if k != "ignore"]
    if ignore is not None and ignore <= max(x for _, vals in entries for x in vals):
        raise NnunetError(f"the ignore label ({ignore}) must be the highest label value, as nnU-Net requires")
    has_regions = any(isinstance(v, (list, tuple)) for v in labels.values())
    if has_regions:
        if regions_class_order is None:
            raise NnunetError("dataset.json has regions (labels with lists of values) but no regions_class_order")
        targets = [EvaluationTarget(k, vals) for k, vals in entries if set(vals) != {0}]
        if len(regions_class_order) != len(targets):
            raise NnunetError(f"regions_class_order has {len(regions_class_order)} entries for "
                              f"{len(targets)} regions ({', '.join(t.name for t in targets)})")
        return targets, ignore
    by_value: dict[int, str] = {}
    for k, (v,) in entries:
        by_value.setdefault(v, k)
    return [EvaluationTarget(by_value[v], (v,)) for v in sorted(by_value) if v != 0], ignore


def targets_of(dataset_json: Mapping[str, Any]) -> tuple[list[EvaluationTarget], int | None]:
    """:func:`evaluation_targets` of a whole dataset.json document."""
    return evaluation_targets(dataset_json.get("labels", {}), dataset_json.get("regions_class_order"))


def dice_scores(reference: np.ndarray, prediction: np.ndarray, targets: Sequence[EvaluationTarget],
                ignore_label: int | None = None) -> dict[str, float]:
    """Dice of each target on one case: a region is the union of its labels in both arrays;
    voxels the reference marks ``ignore_label`` count for nothing (nnU-Net's rule). A target
    absent from both (after ignoring) has no Dice: ``nan``. Pure numpy."""
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise NnunetError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    use = np.ones(reference.shape, bool) if ignore_label is None else reference != ignore_label
    out: dict[str, float] = {}
    for t in targets:
        ref, pred = np.isin(reference, t.values) & use, np.isin(prediction, t.values) & use
        tp = int(np.count_nonzero(ref & pred))
        fp_fn = int(np.count_nonzero(ref ^ pred))
        out[t.name] = math.nan if tp + fp_fn == 0 else 2 * tp / (2 * tp + fp_fn)
    return out


def named_dice(dataset_json: Mapping[str, Any], per_class: Sequence[float | None], prefix: str = "dice_"
               ) -> dict[str, float]:
    """nnU-Net's ``dice_per_class_or_region`` list as ``{prefix + target name: value}``, in the
    targets' order, dropping missing values; {} when the counts differ (nothing to name safely)."""
    try:
        targets, _ = targets_of(dataset_json)
    except NnunetError:
        return {}
    if len(targets) != len(per_class):
        return {}
    return {f"{prefix}{t.name}": float(v) for t, v in zip(targets, per_class)
            if v is not None and math.isfinite(float(v))}


def dice_per_case(pred_folder: str | os.PathLike, gt_folder: str | os.PathLike,
                  labels: Sequence[int | tuple[int, ...]] | None = None, file_ending: str = ".nii.gz", *,
                  dataset_json: Mapping[str, Any] | str | os.PathLike | None = None,
                  per_target: bool = False) -> dict[str, Any]:
    """Mean Dice over the foreground targets for every reference case, computed by nnU-Net's
    ``compute_metrics``.

    The targets come from ``dataset_json`` (a document or its file) when given: its labels, or
    its regions (Dice of each region on the union of its labels), and its ignore label (voxels
    the reference marks ``ignore`` are left out). Otherwise ``labels`` (label values or tuples
    of them), by default ``(1,)``. A target absent from both reference and prediction has no
    Dice (nnU-Net gives NaN) and is left out of the mean; a case where every target is absent
    gets ``nan``. ``per_target=True`` returns ``{case: {target name: Dice}}`` instead of the
    mean. A reference case without a prediction raises :class:`~fedfs.errors.NnunetError`.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    ignore_label = None
    if dataset_json is not None:
        doc = _load_json(Path(dataset_json)) if isinstance(dataset_json, (str, os.PathLike)) else dataset_json
        targets, ignore_label = targets_of(doc)
        file_ending = doc.get("file_ending", file_ending)
    else:
        targets = [EvaluationTarget(str(v), tuple(v) if isinstance(v, (list, tuple)) else (int(v),))
                   for v in (labels if labels is not None else (1,))]
    refs = sorted(p for p in Path(gt_folder).iterdir() if p.name.endswith(file_ending))
    if not refs:
        raise NnunetError(f"no {file_ending} reference segmentations in {gt_folder}")
    missing = [p.name for p in refs if not (Path(pred_folder) / p.name).is_file()]
    if missing:
        raise NnunetError(f"{len(missing)} case(s) have no prediction in {pred_folder}: {missing[:5]}")
    rw = determine_reader_writer_from_file_ending(file_ending, str(refs[0]), allow_nonmatching_filename=True,
                                                  verbose=False)()
    out: dict[str, Any] = {}
    for ref in refs:
        metrics = compute_metrics(str(ref), str(Path(pred_folder) / ref.name), rw,
                                  [t.nnunet_key for t in targets], ignore_label)["metrics"]
        scores = {t.name: float(metrics[t.nnunet_key]["Dice"]) for t in targets}
        values = [v for v in scores.values() if not math.isnan(v)]
        case = ref.name[: -len(file_ending)]
        out[case] = scores if per_target else (float(sum(values) / len(values)) if values else math.nan)
    return out
