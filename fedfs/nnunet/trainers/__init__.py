"""Trainer classes fedfs ships for nnU-Net, found through ``nnUNet_extTrainer``.

Point ``nnUNet_extTrainer`` at this folder (:func:`fedfs.nnunet.build.trainer_search_path`)
and ``nnUNetv2_train ... -tr nnUNetTrainerFedfsTiny`` or fedfs's site role finds them, for
training and for inference. nnU-Net imports the modules here as top-level modules (it puts
this folder on ``sys.path`` during its search), so they use absolute imports only. This
``__init__`` imports nothing, so ``import fedfs.nnunet.trainers`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SEARCH_PATH"]

#: The folder to put on ``nnUNet_extTrainer``.
SEARCH_PATH = str(Path(__file__).resolve().parent)
