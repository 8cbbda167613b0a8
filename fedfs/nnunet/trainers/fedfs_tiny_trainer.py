"""``nnUNetTrainerFedfsTiny``: nnU-Net's default trainer with CPU-sized epochs.

10 training and 5 validation iterations per epoch instead of 250 and 50; nothing else is
changed (network, loss, augmentation, learning-rate schedule, checkpoints are nnU-Net's), so
a federation tested with it exercises exactly the code paths of a real run. Used by fedfs's
tests and ``fedfs demo``. The module name is unique on purpose: nnU-Net imports it as a
top-level module from the ``nnUNet_extTrainer`` folder.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerFedfsTiny(nnUNetTrainer):
    """nnUNetTrainer with 10 train / 5 validation iterations per epoch."""

    #: Builds exactly nnUNetTrainer's network: fedfs exports record that name for inference.
    fedfs_inference_trainer = "nnUNetTrainer"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnU-Net's signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 5
