"""nnU-Net as a site's :class:`~fedfs.roles.site.LocalWork`: fingerprint, plan, train, finish.

Glue between the site role and the nnU-Net adapter modules
(:mod:`fedfs.nnunet.adapter` for fingerprints and planning,
:mod:`fedfs.nnunet.training` for the trainer). Options mirror
``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import NnunetError

log = logging.getLogger("fedfs.nnunet")


@dataclass
class NnunetOptions:
    """What ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` would be told."""

    dataset: str
    configuration: str = "2d"
    fold: int | str | None = None  # -f; None: the federation's (0 outside one)
    trainer: str = "nnUNetTrainer"  # -tr
    plans: str | None = None  # -p (and -overwrite_plans_name when planning); None: what the planner writes
    planner: str | None = None  # -pl; None: the federation's (ExperimentPlanner outside one)
    gpu_memory_target: float | None = None  # -gpu_memory_target
    device: str = "cpu"  # -device
    num_gpus: int = 1  # --num-gpus (nnUNetv2_train -num_gpus): > 1 trains each round with nnU-Net's DDP
    ddp_on_cpu: bool = False  # num_gpus > 1 on -device cpu, over gloo: tests the DDP path without GPUs
    num_processes: int | None = None  # -np (preprocessing)
    num_processes_fingerprint: int | None = None  # -npfp
    verify_dataset_integrity: bool = False
    iterations_per_epoch: int | None = None  # None: the trainer's own (250)
    val_iterations: int | None = None  # None: the trainer's own (50)
    validate: bool = True  # nnU-Net's final validation after the last round
    validation_processes: int | None = None


def settle_options(options: NnunetOptions, config: Any) -> NnunetOptions:
    """``options`` with the federation's nnU-Net settings (``federation.json``: planner, plans identifier)
    filled in; a site option that contradicts them is a :class:`ConfigError` naming both. FFE needs
    every site to plan alike, and a plans identifier that is not the planner's would train another
    network than the one whose digest the site publishes."""
    from ..errors import ConfigError

    planner = getattr(config, "planner", None) or "ExperimentPlanner"
    plans = config.plans_name if hasattr(config, "plans_name") else ""
    if options.planner not in (None, planner):
        raise ConfigError(f"-pl {options.planner}: this federation plans with {planner} (federation.json); "
                          "drop -pl, or ask the coordinator for a federation with that planner")
    if options.plans not in (None, "") and plans and options.plans != plans:
        raise ConfigError(f"-p {options.plans}: this federation trains the plans {plans} (federation.json, from "
                          f"planner {planner}); drop -p")
    fold = str(getattr(config, "fold", "0"))
    if options.fold is not None and str(options.fold) != fold:
        raise ConfigError(f"-f {options.fold}: this federation trains fold {fold} (federation.json); each fold is "
                          "its own federation (docs/nnunet.md, Folds): drop -f or open that fold's federation")
    return dataclasses.replace(options, planner=planner, plans=plans or options.plans,
                               fold=int(fold) if fold.isdigit() else fold)


class NnunetWork:
    """A site's nnU-Net: one dataset, one configuration, one fold.

    The trainer is always built from the plans this work planned (or, after a restart, the plans
    this site published): never from another plans file that happens to lie in
    ``nnUNet_preprocessed`` under a default name."""

    def __init__(self, options: NnunetOptions, mode: str = "ffe") -> None:
        self.o = options
        self.mode = mode
        self.session = None
        self._num_cases: int | None = None
        self._progress: int | None = None  # the federation's progress in epochs (follow_progress)
        self._planned_digest: str | None = None  # the digest plan() returned (published by the site)
        self._fed: Any = None

    def settle(self, fed: Any) -> None:
        """Take the federation's nnU-Net settings (:func:`settle_options`); called by
        :meth:`fedfs.Federation.site`. ``fed`` also lets :meth:`start` compare the trainer's plans
        with the digest this site published, after a restart."""
        self.o = settle_options(self.o, fed.config)
        self.mode = fed.config.mode
        self._fed = fed

    @property
    def planner(self) -> str:
        return self.o.planner or "ExperimentPlanner"

    @property
    def plans_identifier(self) -> str:
        """nnU-Net's ``-p``: the option, else what the planner writes (asked of nnU-Net for planners
        fedfs has no table entry for)."""
        if not self.o.plans:
            from ..protocol.schema import PLANNERS

            known = PLANNERS.get(self.planner)
            if known is None:
                from .adapter import planner_plans_identifier

                known = planner_plans_identifier(self.planner)
            self.o = dataclasses.replace(self.o, plans=known)
        return self.o.plans

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
        identifier = self.plans_identifier
        derived = nn.planner_plans_identifier(self.planner)
        if self.o.verify_dataset_integrity:
            nn.plan_and_preprocess(self.o.dataset, [], num_processes=self.o.num_processes,
                                   verify_dataset_integrity=True, planner=self.planner,
                                   gpu_memory_target=self.o.gpu_memory_target,
                                   overwrite_plans_name=None if identifier == derived else identifier)
        plans = nn.plan(self.o.dataset, self.planner, self.o.gpu_memory_target,
                        None if identifier == derived else identifier)
        if plans.get("plans_name") != identifier:
            raise NnunetError(f"planner {self.planner} wrote plans {plans.get('plans_name')!r}, expected "
                              f"{identifier!r}")
        self._preprocess(plans)
        summary = plans_summary(plans, self.o.configuration)
        summary["nnunet_version"] = nn.nnunet_version()
        summary["planner"] = self.planner
        if self.mode == "ffe":
            # derived from the global fingerprint everyone holds: lets the aggregator name differing fields
            summary["plans"] = plans
        self._planned_digest = plans_digest(plans)
        return identifier, summary, self._planned_digest

    def _preprocess(self, plans: dict[str, Any]) -> None:
        """nnU-Net's preprocessing of the configuration, skipped when the same plans were already
        preprocessed for the same cases (a marker says so): the fold federations of
        one dataset (docs/nnunet.md, Folds) plan alike, and preprocessing is the costly part. The
        marker lies beside nnU-Net's data folder and names the plans digest and the cases."""
        import json

        from . import adapter as nn
        from ..fl.plans import plans_digest

        conf = plans.get("configurations", {}).get(self.o.configuration)
        if conf is None:  # the planner made no such configuration: let nnU-Net say so
            nn.preprocess(self.o.dataset, plans["plans_name"], [self.o.configuration], self.o.num_processes)
            return
        from .adapter import _raw_dataset

        name, _, _, cases = _raw_dataset(self.o.dataset)
        # beside the data folder, not in it: nnU-Net infers the dataset format from the file endings there
        marker = os.path.join(os.environ["nnUNet_preprocessed"], name,
                              f".fedfs-preprocessed-{conf.get('data_identifier', '')}.json")
        want = {"plans": plans_digest(plans), "configuration": self.o.configuration, "cases": sorted(cases)}
        try:
            with open(marker) as f:
                if json.load(f) == want:
                    log.info("%s: already preprocessed with these plans (%s); not preprocessing again", name,
                             want["plans"][:12])
                    return
        except (OSError, ValueError):
            pass
        nn.preprocess(self.o.dataset, plans["plans_name"], [self.o.configuration], self.o.num_processes)
        tmp = marker + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(want, f)
        os.replace(tmp, marker)

    def _published_digest(self) -> str | None:
        """The plans digest to hold the trainer to: this run's plan(), else this site's published plans."""
        if self._planned_digest is not None or self._fed is None or self._fed.identity is None:
            return self._planned_digest
        from ..errors import NotFound
        from ..protocol import layout
        from ..protocol.schema import PlansDocument

        try:
            return self._fed.bucket.read(layout.site_plans(self._fed.identity.name), PlansDocument).doc.digest
        except NotFound:
            return None

    def _check_trainer_plans(self) -> None:
        """The trainer's plans are the ones published: same identifier, same digest (else NnunetError)."""
        from ..fl.plans import plans_digest

        held_name, held = self.session.held_plans()
        if held_name != self.plans_identifier:
            raise NnunetError(f"the trainer holds plans {held_name!r}, the federation trains "
                              f"{self.plans_identifier!r}")
        digest = self._published_digest()
        if digest is not None and plans_digest(held) != digest:
            raise NnunetError(f"{self.plans_identifier}.json in nnUNet_preprocessed (digest "
                              f"{plans_digest(held)[:12]}) is not the plans this site published ({digest[:12]}): "
                              "it was replaced since planning (another nnUNetv2_plan_and_preprocess?); restore it "
                              "or start this site afresh")

    def start(self, total_epochs: int) -> None:
        if self.session is not None:
            return
        from .training import NnunetSession

        args = (self.o.dataset, self.o.configuration, 0 if self.o.fold is None else self.o.fold, self.o.trainer,
                self.plans_identifier, self.o.device)
        kwargs = {"total_epochs": total_epochs, "iterations_per_epoch": self.o.iterations_per_epoch,
                  "val_iterations": self.o.val_iterations}
        if self.o.num_gpus > 1:  # nnU-Net's DDP: one process per GPU, driven in lockstep (fedfs.nnunet.ddp)
            from .ddp import DdpSession

            threads = os.environ.get("FEDFS_TORCH_THREADS")
            self.session = DdpSession.create(*args, **kwargs, num_gpus=self.o.num_gpus,
                                             allow_cpu=self.o.ddp_on_cpu,
                                             num_threads=max(1, int(threads)) if threads else None)
        else:
            self.session = NnunetSession.create(*args, **kwargs)
        try:
            self._check_trainer_plans()
        except NnunetError:
            self.close()
            self.session = None
            raise
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
        """The network's starting weights: the federation's pretrained weights where it names them
        (loaded after shape checks against this site's plans), else nnU-Net's initialisation."""
        from ..weights.tensors import save_weights

        meta = {"kind": "initial", "trainer": self.o.trainer}
        ref = getattr(getattr(self._fed, "config", None), "pretrained_weights", None)
        if ref is not None:
            meta["pretrained"] = ref.sha256
            self._load_pretrained(ref, os.path.join(os.path.dirname(path), f"pretrained-{ref.sha256}.safetensors"))
        save_weights(path, self.session.weights(), meta)

    def _load_pretrained(self, ref: Any, local: str) -> None:
        from ..weights.tensors import load_weights

        if not os.path.exists(local):
            self._fed.bucket.get_blob_file(ref, local)  # verified against federation.json's sha256
        tensors, _ = load_weights(local)
        report = self.session.apply_pretrained(tensors, partial=self.mode == "asym")
        log.info("pretrained weights %s: %d tensors loaded, %d segmentation head tensor(s) skipped (another label "
                 "count), %d kept from nnU-Net's initialisation", ref.sha256[:12], report["loaded"],
                 report["skipped_heads"], report["kept"])
        self.pretrained_report = report

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
        out.update(named_dice(self.session.dataset_json, metrics.get("dice_per_class") or []))
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
