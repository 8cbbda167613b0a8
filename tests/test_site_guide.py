"""What docs/site-guide.md promises a hospital engineer: the device default and its CPU fallback,
``nnUNet_n_proc_DA`` when unset, ``fedfs synth`` for try-out data, and the guide's links."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedfs.cli import main
from fedfs.errors import ConfigError
from fedfs.nnunet.build import NO_CUDA, default_n_proc_da, resolve_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_defaults_to_cuda_like_nnunetv2_train_and_falls_back_to_the_cpu(no_cuda):
    assert resolve_device(None) == ("cpu", NO_CUDA)
    assert resolve_device("cpu")[0] == "cpu"
    with pytest.raises(ConfigError, match="-device cuda, but torch sees no CUDA device"):
        resolve_device("cuda")  # asked for explicitly: never a silent days-long CPU run


def test_device_uses_cuda_when_torch_sees_one(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    device, line = resolve_device(None)
    assert device == "cuda" and "2 visible GPU(s) (CUDA_VISIBLE_DEVICES=1,3)" in line


def test_site_start_says_the_device_once_and_sets_n_proc_da(no_cuda, monkeypatch, caplog):
    from fedfs.cli.roles import _training_device

    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    with caplog.at_level(logging.INFO, logger="fedfs.nnunet"):
        assert _training_device(None) == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [NO_CUDA]
    import os

    assert os.environ["nnUNet_n_proc_DA"] == "0"
    monkeypatch.setenv("nnUNet_n_proc_DA", "5")  # an explicit value always wins
    _training_device("cpu")
    assert os.environ["nnUNet_n_proc_DA"] == "5"


def test_n_proc_da_default_fits_the_machine():
    assert default_n_proc_da("cpu", 64) == 0  # torch already uses every core on the CPU
    assert default_n_proc_da("cuda", 2) == 0  # was nnU-Net's 12 workers on a 2-core machine
    assert default_n_proc_da("cuda", 8) == 7
    assert default_n_proc_da("cuda", 32) == 12  # nnU-Net's own default


def test_help_documents_the_device_default_without_importing_torch():
    code = ("import sys; from fedfs.cli import main; main(['site', 'run', '--help'], standalone_mode=False); "
            "print(json.dumps(sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert "default: cuda" in out and "[default: cpu]" not in out
    assert "default: cuda" in (ROOT / "docs" / "cli.md").read_text()


def test_synth_writes_raw_datasets_and_held_out_cases(tmp_path):
    out = tmp_path / "try"
    result = CliRunner().invoke(main, ["synth", "-o", str(out), "--sites", "2", "--base-id", "610",
                                       "--names", "North,South"])
    assert result.exit_code == 0, result.output
    assert "Dataset610_North: -d 610" in result.output and f"export nnUNet_raw={out / 'nnUNet_raw'}" in result.output
    for i, name in ((610, "North"), (611, "South")):
        ds = out / "nnUNet_raw" / f"Dataset{i}_{name}"
        meta = json.loads((ds / "dataset.json").read_text())
        assert meta["labels"] == {"background": 0, "lesion": 1} and meta["channel_names"] == {"0": "MRI"}
        assert len(list((ds / "imagesTr").glob("*_0000.nii.gz"))) == meta["numTraining"]
        assert list((out / "heldout" / f"Dataset{i}_{name}" / "imagesTs").glob("*_0000.nii.gz"))
    again = CliRunner().invoke(main, ["synth", "-o", str(out), "--sites", "1", "--base-id", "610"])
    assert again.exit_code != 0 and "already holds Dataset610_North" in str(again.exception)
    replaced = CliRunner().invoke(main, ["synth", "-o", str(out), "--sites", "1", "--base-id", "610", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (out / "nnUNet_raw").glob("Dataset610_*")) == ["Dataset610_SiteA"]


def test_synth_rejects_a_names_count_mismatch(tmp_path):
    result = CliRunner().invoke(main, ["synth", "-o", str(tmp_path), "--sites", "2", "--names", "A"])
    assert result.exit_code != 0 and "--names gives 1 names for --sites 2" in str(result.exception)


def test_the_site_guide_is_linked_and_names_only_commands_that_exist():
    guide = (ROOT / "docs" / "site-guide.md").read_text()
    assert "site-guide.md" in (ROOT / "README.md").read_text()
    assert "site-guide.md" in (ROOT / "docs" / "index.md").read_text()
    for needed in ("nnUNet_n_proc_DA", "CUDA_VISIBLE_DEVICES", "fedfs synth", "-device cpu", "blocked"):
        assert needed in guide, needed
    site_commands = set(main.commands["site"].commands)
    for sub in set(re.findall(r"`fedfs site ([a-z]+)", guide)):
        assert sub in site_commands, f"docs/site-guide.md names `fedfs site {sub}`, which does not exist"
