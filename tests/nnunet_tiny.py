"""One tiny planned nnU-Net site shared by the preset, pretrained and fold tests (planned once per session).

Planning and preprocessing cost about 17 s on 2 cores, so the dataset is made once under the
session's temporary folder and each test module points nnU-Net's folders at it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

DATASET = 771
TINY = "nnUNetTrainerFedfsTiny"
_CACHE: dict[str, "TinySite"] = {}


@dataclass(frozen=True)
class TinySite:
    root: Path
    site: object  # fedfs.testing.synthetic.SitePaths

    @property
    def env(self) -> dict[str, str]:
        from fedfs.nnunet.build import trainer_search_path

        return {"nnUNet_raw": str(self.root / "raw"), "nnUNet_preprocessed": str(self.root / "pre"),
                "nnUNet_results": str(self.root / "res"), "nnUNet_extTrainer": trainer_search_path()}


def _build(root: Path) -> TinySite:
    from fedfs.nnunet import adapter as nn
    from fedfs.testing import synthetic as syn

    for d in ("raw", "pre", "res"):
        (root / d).mkdir(parents=True, exist_ok=True)
    sp = syn.make_site(root / "raw", DATASET, "Tiny", n_train=8, n_test=2, style=syn.DEFAULT_STYLES[0], seed=5,
                       test_root=root / "heldout")
    return TinySite(root, sp)


@contextmanager
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinySite]:
    """The shared raw dataset (8 training, 2 held-out 64x64 cases), nnU-Net's folders set around the block."""
    if "site" not in _CACHE:
        _CACHE["site"] = _build(tmp_path_factory.getbasetemp() / "nnunet_tiny")
    t = _CACHE["site"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in t.env.items():
            mp.setenv(k, v)
        mp.delenv("nnUNet_n_proc_DA", raising=False)  # the planner needs >= 1; sessions set 0 themselves
        yield t


def default_plans(t: TinySite) -> None:
    """nnUNetv2_plan_and_preprocess -d DATASET -c 2d with the default planner (once)."""
    if "default" in _CACHE:
        return
    from fedfs.nnunet import adapter as nn

    nn.local_fingerprint(DATASET, num_processes=1)
    nn.plan_and_preprocess(DATASET, ["2d"], num_processes=1)
    _CACHE["default"] = t
