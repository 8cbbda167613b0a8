"""nnU-Net as a site's :class:`~fedfs.roles.site.LocalWork`: fingerprint, plan, train, finish.

Glue between the site role and the nnU-Net adapter modules
(:mod:`fedfs.nnunet.adapter` for fingerprints and planning,
:mod:`fedfs.nnunet.training` for the trainer). Options mirror
``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fedfs.nnunet")


@dataclass
class NnunetOptions:
    """What ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` would be told."""

    dataset: str
    configuration: str = "2d"
    fold: int | str = 0
    trainer: str = "nnUNetTrainer"  # -tr
    plans: str = "nnUNetPlans"  # -p (and -overwrite_plans_name when planning)
    planner: str = "ExperimentPlanner"  # -pl
    gpu_memory_target: float | None = None  # -gpu_memory_target
    device: str = "cpu"  # -device
    num_processes: int | None = None  # -np (preprocessing)
    num_processes_fingerprint: int | None = None  # -npfp
    verify_dataset_integrity: bool = False
    iterations_per_epoch: int | None = None  # None: the trainer's own (250)
    val_iterations: int | None = None  # None: the trainer's own (50)
    validate: bool = True  # nnU-Net's final validation after the last round
    validation_processes: int | None = None


class NnunetWork:
    """A site's nnU-Net: one dataset, one configuration, one fold."""

    def __init__(self, options: NnunetOptions, mode: str = "ffe") -> None:
        self.o = options
        self.mode = mode
        self.session = None
        self._num_cases: int | None = None
        self._progress: int | None = None  # the federation's progress in epochs (follow_progress)

    @property
    def num_cases(self) -> int:
        if self._num_cases is None:
            from .adapter import count_cases

            self._num_cases = count_cases(self.o.dataset)
        return self._num_cases

    def census(self) -> tuple[int, int]:
        from .adapter import site_census

        c = site_census(self.o.dataset, verify_integrity=self.o.verify_dataset_integrity,
                        num_processes=self.o.num_processes)
        self._num_cases = c["num_cases"]
        self._names = {"labels": c["labels"], "channel_names": c["channel_names"]}
        return c["num_cases"], c["num_channels"]

    def census_names(self) -> dict[str, Any]:
        """dataset.json's label and channel names, as the last :meth:`census` read them."""
        if getattr(self, "_names", None) is None:
            self.census()
        return self._names

    def fingerprint_summary(self, total_cases: int) -> dict[str, Any]:
        from .adapter import site_summary

        return site_summary(self.o.dataset, total_cases, num_processes=self.o.num_processes_fingerprint)

    def plan(self, global_fingerprint: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
        from . import adapter as nn
        from ..fl.plans import plans_digest, plans_summary

        if global_fingerprint is not None:
            nn.install_fingerprint(self.o.dataset, global_fingerprint)
        else:
            nn.local_fingerprint(self.o.dataset, num_processes=self.o.num_processes_fingerprint)
        plans = nn.plan_and_preprocess(
            self.o.dataset, [self.o.configuration], planner=self.o.planner,
            gpu_memory_target=self.o.gpu_memory_target,
            overwrite_plans_name=None if self.o.plans == "nnUNetPlans" else self.o.plans,
            num_processes=self.o.num_processes, verify_dataset_integrity=self.o.verify_dataset_integrity)
        summary = plans_summary(plans, self.o.configuration)
        summary["nnunet_version"] = nn.nnunet_version()
        summary["planner"] = self.o.planner
        if self.mode == "ffe":
            # derived from the global fingerprint everyone holds: lets the aggregator name differing fields
            summary["plans"] = plans
        return plans["plans_name"], summary, plans_digest(plans)

    def start(self, total_epochs: int) -> None:
        if self.session is not None:
            return
        from .training import NnunetSession

        self.session = NnunetSession.create(
            self.o.dataset, self.o.configuration, self.o.fold, self.o.trainer, self.o.plans, self.o.device,
            total_epochs=total_epochs, iterations_per_epoch=self.o.iterations_per_epoch,
            val_iterations=self.o.val_iterations)
        threads = os.environ.get("FEDFS_TORCH_THREADS")
        if threads:  # several sites sharing one machine (fedfs simulate): don't oversubscribe the cores
            import torch

            torch.set_num_threads(max(1, int(threads)))
        if self.session.resume():
            log.info("resumed nnU-Net from %s at epoch %d", self.session.resumed_from, self.session.epoch)

    @property
    def epoch(self) -> int:
        return self.session.epoch if self.session is not None else 0

    def initial_weights(self, path: str) -> None:
        from ..weights.tensors import save_weights

        save_weights(path, self.session.weights(), {"kind": "initial", "trainer": self.o.trainer})

    def follow_progress(self, epoch: int) -> None:
        """The federation's progress in epochs (base version x local epochs): the next round's
        learning rate follows it when it is ahead of this site's own epoch count."""
        self._progress = epoch

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        from ..weights.tensors import load_weights, save_weights
        from .inference import named_dice

        tensors, _ = load_weights(global_path)
        self.session.load_weights(tensors)
        metrics = self.session.train_epochs(epochs, schedule_epoch=self._progress)
        save_weights(update_path, self.session.weights(), {"kind": "update", "epoch": str(self.session.epoch)})
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # nnU-Net's pseudo-Dice per label or region, under dataset.json's names: status and report show them
        out.update(named_dice(self.session.trainer.dataset_json, metrics.get("dice_per_class") or []))
        return out

    def recover_round(self, epoch_before: int, epochs: int, update_path: str) -> bool:
        """After a crash between nnU-Net's checkpoint and the site's record: the checkpoint
        already holds the trained round, so write the update from it instead of training again."""
        if self.session is None or self.session.epoch != epoch_before + epochs:
            return False
        from ..weights.tensors import save_weights

        save_weights(update_path, self.session.weights(), {"kind": "update", "epoch": str(self.session.epoch)})
        return True

    def checkpoint(self) -> None:
        """nnU-Net's checkpoint_latest.pth is written at the end of every round already."""

    def finish(self, global_path: str) -> dict[str, Any]:
        from ..weights.tensors import load_weights

        tensors, _ = load_weights(global_path)
        self.session.load_weights(tensors)
        result = self.session.finish(validate=self.o.validate, allow_early=True,
                                     validation_processes=self.o.validation_processes)
        out: dict[str, Any] = {"checkpoint_final": str(result.checkpoint_final), "epochs": self.session.epoch}
        if result.validation_dice is not None:
            out["validation_dice"] = result.validation_dice
        return out

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
