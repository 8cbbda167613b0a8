"""Site training with nnU-Net's own trainer, kept in memory between federated rounds.

:class:`NnunetSession` builds the trainer exactly as ``nnUNetv2_train DATASET CONF FOLD -tr T -p P
-device D`` does (``get_trainer_from_args``, so ``-tr`` classes found through
``nnUNet_extTrainer`` work) and then drives nnU-Net's per-epoch hooks itself, a few epochs at a
time, instead of calling ``run_training()`` once. Between calls the federation swaps the
network's weights (:meth:`NnunetSession.weights` / :meth:`NnunetSession.load_weights`).
Everything else is nnU-Net's: data loading and augmentation, loss, the poly learning-rate
schedule (``num_epochs`` is set to rounds x local epochs before ``initialize()``, so it runs
its whole course), logging, ``checkpoint_latest/best/final.pth`` in nnU-Net's output folder,
and the final validation.

nnunetv2 and torch are imported inside functions only: ``import fedfs.nnunet.training`` is
cheap. nnU-Net reads its folders from the environment (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``, ``nnUNet_extTrainer``, ``nnUNet_n_proc_DA``);
a session snapshots them when it is created and re-applies them around every nnU-Net call,
so sessions keep working when the caller's environment changes later.

Export, prediction and Dice live in :mod:`fedfs.nnunet.inference`; the weight exchange with the
network in :mod:`fedfs.nnunet.network`.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, NnunetError
from .build import NNUNET_ENV_VARS, build_trainer, env_snapshot, nnunet_env, torch_device, trainer_search_path
from .inference import ModelSpec
from .network import load_network_weights, network_weights

if TYPE_CHECKING:
    import torch

__all__ = [
    "NnunetSession",
    "FinishResult",
    "trainer_search_path",
    "NNUNET_ENV_VARS",
    "nnunet_env",
]

def _finite_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class FinishResult:
    """What :meth:`NnunetSession.finish` produced."""

    checkpoint_final: Path
    validation_dice: float | None = None   # foreground mean Dice of nnU-Net's final validation
    summary_file: Path | None = None       # validation/summary.json


class NnunetSession:
    """One nnU-Net trainer, initialised once, trained a few epochs per round, resumable.

    Build it with :meth:`create`. Typical round at a site::

        s = NnunetSession.create(12, "2d", 0, total_epochs=rounds * local_epochs)
        s.resume()                        # after a crash: nnU-Net's own checkpoint
        s.load_weights(global_tensors)    # the federation's model
        metrics = s.train_epochs(local_epochs)
        publish(s.weights(), metrics)
        ...
        s.finish()                        # checkpoint_final.pth + nnU-Net's validation

    Every nnU-Net call runs with the session's snapshot of nnU-Net's environment variables set
    in ``os.environ`` (restored afterwards): use one session per thread at a time.
    """

    def __init__(self, trainer: Any, env: Mapping[str, str]):
        """Wrap an initialised nnU-Net trainer; use :meth:`create` rather than this."""
        self.trainer = trainer
        self.env = dict(env)
        self.resumed_from: Path | None = None
        self._started = False
        self._split_sizes: tuple[int, int] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, dataset: str | int, configuration: str, fold: int | str,
               trainer: str | type = "nnUNetTrainer", plans: str = "nnUNetPlans", device: str = "cpu", *,
               total_epochs: int, iterations_per_epoch: int | None = None, val_iterations: int | None = None,
               output_folder_suffix: str | None = None, env: Mapping[str, str] | None = None,
               num_threads: int | None = None, prepare: Callable[[Any], None] | None = None) -> NnunetSession:
        """Build and initialise the trainer as ``nnUNetv2_train dataset configuration fold -tr trainer
        -p plans -device device`` would, with ``num_epochs = total_epochs``.

        ``iterations_per_epoch`` / ``val_iterations`` override the trainer's 250 / 50 (``None``
        keeps the trainer class's own numbers). Like ``num_epochs`` they are set before
        ``initialize()``. ``env`` adds or overrides nnU-Net environment variables for this
        session (the others are taken from ``os.environ`` now). ``output_folder_suffix`` moves
        the output folder to ``Trainer__Plans__conf<suffix>/fold_X`` so a federated run does not
        share a folder with a plain nnU-Net training of the same trainer, plans and fold
        (``nnUNetv2_predict -d`` will not find it there; ``-m`` does).

        ``num_threads`` overrides nnUNetv2_train's torch thread count (all cores on CPU), which
        oversubscribes a machine that runs several sites at once (``fedfs simulate``).

        ``trainer`` is a name looked up by nnU-Net (its package, then ``nnUNet_extTrainer``) or a
        trainer class. nnU-Net's search imports every trainer module of nnunetv2 on the way
        (``primus`` pulls in timm and torchvision), so a broken optional dependency makes it
        fail for any trainer outside nnunetv2's top level; for fedfs's own trainers
        (``nnUNetTrainerFedfsTiny``) the session then uses the class from
        :func:`trainer_search_path` directly, with a ``RuntimeWarning``.

        ``prepare`` is called with the built trainer right before ``initialize()``: the one hook
        :mod:`fedfs.nnunet.ddp` uses to keep a DDP rank on the CPU (nnU-Net forces ``cuda:<rank>``
        under torch.distributed).
        """
        if total_epochs < 1:
            raise ConfigError(f"total_epochs must be at least 1, got {total_epochs}")
        for name, value in (("iterations_per_epoch", iterations_per_epoch), ("val_iterations", val_iterations)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        snapshot = env_snapshot(env)
        device_ = torch_device(device, num_threads)
        t = build_trainer(dataset, configuration, fold, trainer, plans, device_, snapshot, output_folder_suffix)

        import torch
        from torch.backends import cudnn

        with nnunet_env(snapshot):
            t.num_epochs = int(total_epochs)
            if iterations_per_epoch is not None:
                t.num_iterations_per_epoch = int(iterations_per_epoch)
            if val_iterations is not None:
                t.num_val_iterations_per_epoch = int(val_iterations)
            if torch.cuda.is_available():  # what run_training does, whatever the device
                cudnn.deterministic = False
                cudnn.benchmark = True
            if prepare is not None:
                prepare(t)
            t.initialize()
        return cls(t, snapshot)

    # ------------------------------------------------------------------ state

    @property
    def output_folder(self) -> Path:
        """nnU-Net's fold folder: ``nnUNet_results/DatasetXXX/Trainer__Plans__conf/fold_X``."""
        return Path(self.trainer.output_folder)

    @property
    def epoch(self) -> int:
        """Epochs completed so far (nnU-Net's ``current_epoch``)."""
        return int(self.trainer.current_epoch)

    @property
    def num_epochs(self) -> int:
        return int(self.trainer.num_epochs)

    def resume(self) -> bool:
        """Load nnU-Net's own latest state from the output folder, as ``nnUNetv2_train --c`` does.

        Tries ``checkpoint_final.pth``, then ``checkpoint_latest.pth``, then ``checkpoint_best.pth``
        (nnU-Net's order) with the trainer's ``load_checkpoint``: network, optimizer, grad scaler,
        logger, epoch. A file that cannot be read (a crash while it was written) is skipped.
        Returns whether a checkpoint was loaded. These are the site's local files, never the bucket's.
        """
        errors = []
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
            path = self.output_folder / name
            if not path.is_file():
                continue
            try:
                with nnunet_env(self.env):
                    self.trainer.load_checkpoint(str(path))
            except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as exc:
                # a torn file (crash while nnU-Net wrote it) or one of another network
                errors.append(f"{name}: {exc}")
                continue
            self.resumed_from = path
            return True
        if errors:
            raise NnunetError(f"no readable nnU-Net checkpoint in {self.output_folder}: {'; '.join(errors)}")
        return False

    def weights(self) -> dict[str, torch.Tensor]:
        """The network's canonical tensors, as detached CPU copies (see :func:`network_weights`)."""
        return network_weights(self.trainer)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *,
                     partial: bool = False) -> tuple[list[str], list[str]]:
        """Copy ``tensors`` into the network; return ``(loaded_keys, kept_keys)`` (see :func:`load_network_weights`)."""
        return load_network_weights(self.trainer, tensors, partial=partial)

    def apply_pretrained(self, tensors: Mapping[str, torch.Tensor], *, partial: bool = False) -> dict[str, Any]:
        """Load pretrained ``tensors`` after nnU-Net's shape checks (:func:`fedfs.nnunet.pretrained.apply_pretrained`)."""
        from .pretrained import apply_pretrained

        return apply_pretrained(self.trainer, tensors, partial=partial)

    def held_plans(self) -> tuple[str, dict[str, Any]]:
        """(plans identifier, plans) the trainer was built from."""
        pm = self.trainer.plans_manager
        return pm.plans_name, pm.plans

    @property
    def dataset_json(self) -> dict[str, Any]:
        return self.trainer.dataset_json

    # ------------------------------------------------------------------ training

    def _start(self) -> None:
        if not self._started:
            self.trainer.on_train_start()  # dataloaders, unpacking, plans.json/dataset.json copies
            self._started = True

    def split_sizes(self) -> tuple[int, int]:
        """(training cases, validation cases) of this fold, from nnU-Net's own split."""
        if self._split_sizes is None:
            with nnunet_env(self.env):
                tr, val = self.trainer.do_split()
            self._split_sizes = (len(tr), len(val))
        return self._split_sizes

    def train_epochs(self, n: int = 1, *, schedule_epoch: int | None = None) -> dict[str, Any]:
        """Run ``n`` epochs of nnU-Net's own loop (``nnUNetTrainer.run_training``'s body), then
        save ``checkpoint_latest.pth`` so a restarted site resumes after them.

        ``schedule_epoch``: where the federation's training stands (the global's version x local
        epochs). When it is ahead of this trainer's own epoch (a site that missed rounds, or a
        slow site in asynchronous training) the poly learning rate is taken from there, so the
        site anneals with the federation instead of pushing large early-schedule steps into a
        nearly converged global. The epoch counter, checkpoints and logs are nnU-Net's as usual.

        Returns the last epoch's metrics: ``train_loss``, ``val_loss``, ``pseudo_dice`` (nnU-Net's
        EMA pseudo Dice, mean over foreground), ``mean_fg_dice`` (that epoch's raw value),
        ``dice_per_class``, ``lr``, ``epoch_time_s``, plus ``epochs_time_s`` (all ``n``),
        ``epoch`` (completed), ``num_epochs``, ``num_train_cases``, ``num_val_cases``,
        ``iterations_per_epoch``. Non-finite values (no foreground seen) are ``None``.
        Never trains past ``num_epochs``: nnU-Net's poly schedule ends there.
        """
        import torch

        if n < 1:
            raise ConfigError(f"train_epochs needs n >= 1, got {n}")
        t = self.trainer
        if t.current_epoch + n > t.num_epochs:
            raise NnunetError(f"cannot train {n} more epoch(s): {t.current_epoch} of {t.num_epochs} are done "
                              "and nnU-Net's learning-rate schedule ends at num_epochs")
        started = time.perf_counter()
        with nnunet_env(self.env):
            self._start()
            for done in range(n):
                t.on_epoch_start()
                t.on_train_epoch_start()
                if schedule_epoch is not None:
                    self._follow_schedule(schedule_epoch + done)
                train_outputs = [t.train_step(next(t.dataloader_train)) for _ in range(t.num_iterations_per_epoch)]
                t.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    t.on_validation_epoch_start()
                    val_outputs = [t.validation_step(next(t.dataloader_val))
                                   for _ in range(t.num_val_iterations_per_epoch)]
                    t.on_validation_epoch_end(val_outputs)
                t.on_epoch_end()
            self.save_checkpoint()
        n_train, n_val = self.split_sizes()
        log = t.logger
        return {
            "epoch": self.epoch,
            "num_epochs": self.num_epochs,
            "train_loss": _finite_or_none(log.get_value("train_losses", step=-1)),
            "val_loss": _finite_or_none(log.get_value("val_losses", step=-1)),
            "pseudo_dice": _finite_or_none(log.get_value("ema_fg_dice", step=-1)),
            "mean_fg_dice": _finite_or_none(log.get_value("mean_fg_dice", step=-1)),
            "dice_per_class": [_finite_or_none(d) for d in log.get_value("dice_per_class_or_region", step=-1)],
            "lr": _finite_or_none(log.get_value("lrs", step=-1)),
            "epoch_time_s": _finite_or_none(log.get_value("epoch_end_timestamps", step=-1)
                                            - log.get_value("epoch_start_timestamps", step=-1)),
            "epochs_time_s": time.perf_counter() - started,
            "num_train_cases": n_train,
            "num_val_cases": n_val,
            "iterations_per_epoch": int(t.num_iterations_per_epoch),
        }

    def _follow_schedule(self, epoch: int) -> None:
        """Set the learning rate nnU-Net's scheduler gives ``epoch`` when that is ahead of ours."""
        t = self.trainer
        epoch = min(epoch, t.num_epochs - 1)
        if epoch <= t.current_epoch:
            return
        t.lr_scheduler.step(epoch)
        lr = t.optimizer.param_groups[0]["lr"]
        t.logger.log("lrs", lr, t.current_epoch)
        t.print_to_log_file(f"fedfs: the federation is at epoch {epoch}; learning rate {lr:.5f} from there")

    def save_checkpoint(self, name: str = "checkpoint_latest.pth") -> Path:
        """Write nnU-Net's checkpoint of the current state, atomically (temporary file, then rename).

        nnU-Net itself writes ``checkpoint_latest`` only every 50 epochs; a federated site needs
        it after every round. Like ``on_train_end`` we step ``current_epoch`` back around the
        save, because ``save_checkpoint`` stores ``current_epoch + 1`` and the epoch counter was
        already advanced by ``on_epoch_end``.
        """
        t = self.trainer
        path = self.output_folder / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        t.current_epoch -= 1
        try:
            with nnunet_env(self.env):
                t.save_checkpoint(str(tmp))
        finally:
            t.current_epoch += 1
        if tmp.exists():  # absent when checkpointing is disabled
            os.replace(tmp, path)
        return path

    def finish(self, validate: bool = True, *, allow_early: bool = False,
               validation_processes: int | None = None) -> FinishResult:
        """End training as nnU-Net does: ``on_train_end`` (``checkpoint_final.pth``, removes
        ``checkpoint_latest.pth``, stops the dataloaders), then, if ``validate``, nnU-Net's
        ``perform_actual_validation`` on the fold's validation cases.

        The validation exports predictions through a *spawn* multiprocessing pool: the script
        that calls this must guard its entry point with ``if __name__ == "__main__":`` or the
        pool's children re-run it and the parent hangs. ``validation_processes`` sizes that
        pool (nnU-Net's ``default_num_processes``, normally fixed at import from
        ``nnUNet_def_n_proc``, default 8). Refuses to finish before ``num_epochs`` unless
        ``allow_early``.
        """
        t = self.trainer
        if t.current_epoch < t.num_epochs and not allow_early:
            raise NnunetError(f"training is at epoch {t.current_epoch} of {t.num_epochs}; "
                              "pass allow_early=True to finish anyway")
        with nnunet_env(self.env):
            t.on_train_end()
            self._started = False
            final = self.output_folder / "checkpoint_final.pth"
            if not validate:
                return FinishResult(final)
            import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

            saved = trainer_module.default_num_processes
            if validation_processes is not None:
                trainer_module.default_num_processes = max(1, int(validation_processes))
            try:
                t.perform_actual_validation(False)
            finally:
                trainer_module.default_num_processes = saved
        summary = self.output_folder / "validation" / "summary.json"
        dice = None
        if summary.is_file() and t.local_rank == 0:  # under DDP rank 0 writes it, after the other ranks return
            import json

            dice = _finite_or_none(json.loads(summary.read_text())["foreground_mean"]["Dice"])
        return FinishResult(final, dice, summary if summary.is_file() else None)

    def close(self) -> None:
        """Stop the dataloaders' background workers without finishing the training."""
        t = self.trainer
        for dl in (t.dataloader_train, t.dataloader_val):
            finish = getattr(dl, "_finish", None)
            if callable(finish):
                with contextlib.suppress(Exception):
                    finish()
        t.dataloader_train = t.dataloader_val = None
        self._started = False

    def __enter__(self) -> NnunetSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spec(self) -> ModelSpec:
        """What :func:`export_model_folder` needs to know about this session's model."""
        return ModelSpec.from_trainer(self.trainer)
