"""The newcomer's path, end to end, as docs/site-guide.md and the README tell it.

A coordinator and two hospitals on one machine sharing a folder bucket, every step a
subprocess of the real CLI (``python -m fedfs ...``): ``fedfs synth`` makes the try-out
data (dataset ids differ between the sites), keygen, init, doctor, the aggregator and
both sites as daemons in the background, ``fedfs status`` while they run, ``fedfs
export`` at a hospital and ``nnUNetv2_predict_from_modelfolder -device cpu`` on its
held-out cases. Real nnU-Net with the tiny trainer and a handful of iterations.

Before the daemons start, HospitalA corrects its dataset after its census was merged (one
case removed) and supersedes the census with ``fedfs site fingerprint --redo``; the
federation then trains on the corrected count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.nnunet
FEDFS = [sys.executable, "-m", "fedfs"]
SITES = {"HospitalA": 501, "HospitalB": 502}
TIMEOUT_S = 400


def _env(root: Path) -> dict[str, str]:
    """nnU-Net's folders as a hospital sets them; one augmentation process and one torch thread per party."""
    return {**os.environ, "nnUNet_raw": str(root / "data" / "nnUNet_raw"),
            "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"), "nnUNet_results": str(root / "nnUNet_results"),
            "nnUNet_n_proc_DA": "0", "FEDFS_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _fedfs(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run(FEDFS + list(args), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in ok, f"fedfs {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path], poll) -> None:
    """Until every daemon exits 0 (``poll`` runs meanwhile); a failure shows its log's tail."""
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        poll()
        codes = {n: p.poll() for n, p in procs.items()}
        for n, c in codes.items():
            if c not in (None, 0):
                raise AssertionError(f"{n} exited {c}:\n{logs[n].read_text()[-3000:]}")
        if all(c == 0 for c in codes.values()):
            return
        time.sleep(1.0)
    raise AssertionError("the federation did not finish: " +
                         "; ".join(f"{n}: {logs[n].read_text()[-800:]}" for n in procs))


def _census_correction(env: dict[str, str], dataset: Path, agg: list[str], party: dict[str, list[str]]) -> None:
    """Censuses published and merged (16 + 12 cases); HospitalA then drops a case and supersedes its census."""
    for name in SITES:
        assert "census" in _fedfs(env, "site", "fingerprint", *party[name])
    assert "28 cases over 2 sites" in _fedfs(env, "aggregator", "step", *agg)
    case = sorted((dataset / "labelsTr").glob("*.nii.gz"))[-1].name[:-len(".nii.gz")]
    (dataset / "labelsTr" / f"{case}.nii.gz").unlink()
    (dataset / "imagesTr" / f"{case}_0000.nii.gz").unlink()
    meta = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**meta, "numTraining": meta["numTraining"] - 1}))
    assert "was 16 cases" in _fedfs(env, "site", "fingerprint", "--redo", *party["HospitalA"])


def test_a_newcomer_federation_from_synth_to_predict(tmp_path):
    env = _env(tmp_path)
    data = tmp_path / "data"
    made = _fedfs(env, "synth", "-o", str(data), "--sites", "2", "--base-id", "501")
    assert "Dataset501_SiteA: -d 501" in made and "Dataset502_SiteB: -d 502" in made

    keys, bucket = tmp_path / "keys", str(tmp_path / "bucket")
    _fedfs(env, "keygen", "coordinator", "--role", "aggregator", "-o", str(keys))
    for name in SITES:
        _fedfs(env, "keygen", name, "-o", str(keys))
    assert "federation created" in _fedfs(env, "init", bucket, "--sites", ",".join(SITES), "--keys", str(keys),
                                          "-c", "2d", "--rounds", "2")
    assert "verdict: usable" in _fedfs(env, "doctor", bucket, "--prefix", "sites/HospitalA/doctor")

    poll = ["--watch", "poll", "--poll-interval", "0.5"]
    tiny = ["-tr", "nnUNetTrainerFedfsTiny", "--iterations-per-epoch", "3", "--val-iterations", "1",
            "-np", "1", "-npfp", "1", "--no-final-validation", "-device", "cpu"]
    agg = [bucket, "--key", str(keys / "coordinator.key"), "--workdir", str(tmp_path / "work" / "aggregator")]
    party = {name: [bucket, "--key", str(keys / f"{name}.key"), "--workdir", str(tmp_path / "work" / name),
                    "-d", str(ds)] + tiny for name, ds in SITES.items()}
    _census_correction(env, data / "nnUNet_raw" / "Dataset501_SiteA", agg, party)

    cmds = {"aggregator": ["aggregator", "run"] + agg + poll}
    for name in SITES:
        cmds[name] = ["site", "run"] + party[name] + poll
    logs = {n: tmp_path / f"{n}.log" for n in cmds}
    procs = {n: subprocess.Popen(FEDFS + c, env=env, stdout=open(logs[n], "wb"), stderr=subprocess.STDOUT,
                                 start_new_session=True) for n, c in cmds.items()}
    seen: list[str] = []

    def status() -> None:
        if not seen or time.time() - float(seen[-1].split("\0")[0]) > 5:
            seen.append(f"{time.time()}\0" + _fedfs(env, "status", bucket))

    try:
        _wait(procs, logs, status)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all("HospitalA" in s and "HospitalB" in s for s in seen), seen[-1]
    assert "training on cpu" in logs["HospitalA"].read_text()  # the device, said at start
    assert "(27 federation cases)" in logs["HospitalA"].read_text()  # 15 + 12: the corrected census counted
    assert "final" in _fedfs(env, "status", bucket).lower()

    models = tmp_path / "models" / "liver"
    assert "exported" in _fedfs(env, "export", bucket, "--key", str(keys / "HospitalA.key"), "-d", "501",
                                "-o", str(models))
    heldout = data / "heldout" / "Dataset501_SiteA"
    preds = tmp_path / "preds"
    predict = Path(sys.executable).with_name("nnUNetv2_predict_from_modelfolder")
    proc = subprocess.run([str(predict), "-i", str(heldout / "imagesTs"), "-o", str(preds), "-m", str(models),
                           "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {p.name for p in (heldout / "labelsTs").glob("*.nii.gz")}
    assert expected and {p.name for p in preds.glob("*.nii.gz")} == expected
