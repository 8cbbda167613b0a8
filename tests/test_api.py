"""The Python API for scripted rounds, with a plain PyTorch model (no nnU-Net)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedfs import layout
from fedfs.roles.client import SiteClient
from fedfs.errors import ConfigError
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import GlobalManifest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch.py"


def test_plain_pytorch_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: finished: v4 is the final global" in proc.stdout
    accs = [float(a) for a in re.findall(r"final global accuracy on local data ([0-9.]+)", proc.stdout)]
    assert len(accs) == 3 and min(accs) > 0.6
    fed = Federation.open(str(tmp_path / "bucket"))
    v4 = fed.bucket.read(layout.global_version(4), GlobalManifest).doc
    assert v4.final and [c.weight for c in v4.contributions] == [200.0, 120.0, 60.0]


def test_site_client_rules(tmp_path, keys):
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="fedavg", rounds=1)
    fed, _ = Federation.create(str(tmp_path / "b"), config, agg)
    a = SiteClient(fed.as_party(keys / "A.key"), tmp_path / "A")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="pull a global"):
        a.push(model, num_cases=3)
    a.join(model, num_cases=3)
    a.join(model, num_cases=3)  # idempotent
    with pytest.raises(ConfigError, match="another architecture"):
        a.join(torch.nn.Linear(4, 2), num_cases=3)
    ffe_config, agg = config_from_key_dir(keys, ["A", "B"], mode="ffe")
    ffe, _ = Federation.create(str(tmp_path / "ffe"), ffe_config, agg)
    with pytest.raises(ConfigError, match="fingerprint phase"):
        SiteClient(ffe.as_party(keys / "A.key"), tmp_path / "A2")
