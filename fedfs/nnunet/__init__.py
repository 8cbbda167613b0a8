"""Everything that imports nnunetv2: the dataset adapter, trainer building, training sessions,
inference and model export, and the trainers fedfs ships. Nothing else in fedfs imports nnU-Net."""
