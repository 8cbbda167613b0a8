"""Real federations of nnU-Net on CPU (tiny trainer, 2D 64x64 synthetic sites).

Each test runs the parties as separate ``fedfs`` processes sharing only the
bucket, as in production. Budgets are tiny (10 iterations per epoch), so the
assertions are about the protocol and the plumbing, plus one quality bar: the
demo's exported models segment held-out cases with Dice >= 0.8 through
``nnUNetv2_predict``.
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

from fedfs import layout
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import GlobalManifest, Heartbeat, PlansDocument, UpdateManifest
from fedfs.trust.signing import generate_keypair

pytestmark = pytest.mark.nnunet
FEDFS = [sys.executable, "-m", "fedfs"]
DICE_THRESHOLD = 0.8


def nnunet_sites(root: Path, n: int = 3, n_train: int = 6):
    from fedfs.ops.simulate import nnunet_environment
    from fedfs.testing.synthetic import DEFAULT_STYLES, make_site

    env = nnunet_environment(root, {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
                                    "nnUNet_results": str(root / "res"), "FEDFS_TORCH_THREADS": "1"})
    sites = {f"S{i}": make_site(env["nnUNet_raw"], 601 + i, f"S{i}", n_train=n_train, n_test=2,
                                style=DEFAULT_STYLES[i % 3], test_root=root / "heldout") for i in range(n)}
    return env, sites


def all_versions(fed):
    out, v = [], 0
    while fed.store.exists(layout.global_version(v)):
        out.append(fed.bucket.read(layout.global_version(v), GlobalManifest).doc)
        v += 1
    return out


def assert_no_duplicates(fed, rounds):
    """Every update folded at most once, every site sent at most ``rounds`` updates."""
    seen = []
    for g in all_versions(fed):
        seen += [(c.site, c.round) for c in g.contributions]
    assert len(seen) == len(set(seen)), f"an update was applied twice: {seen}"
    for s in fed.config.site_names:
        assert len(fed.store.list(layout.site_updates_prefix(s))) <= rounds


def test_demo_ffe_sync_on_a_folder(tmp_path):
    """`fedfs demo --json`: 3 sites, FFE, sync, 2 rounds; every site's held-out Dice >= 0.8."""
    proc = subprocess.run(FEDFS + ["demo", "--json", "--dir", str(tmp_path), "--rounds", "2", "--local-epochs", "1"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert len(result["sites"]) >= 3 and result["rounds"] >= 2 and result["final_version"] == 2
    assert all(d >= DICE_THRESHOLD for d in result["dice_per_site"].values()), result["dice_per_site"]
    for folder in result["exported"].values():
        assert (Path(folder) / "fold_0" / "checkpoint_final.pth").is_file()
        assert (Path(folder) / "plans.json").is_file() and (Path(folder) / "dataset.json").is_file()
    fed = Federation.open(result["bucket"])
    versions = all_versions(fed)
    assert [len(v.contributions) for v in versions] == [0, 3, 3]
    assert versions[-1].final
    # FFE: one set of plans for all
    plans = {fed.bucket.read(layout.site_plans(s), PlansDocument).doc.digest
             for s in fed.config.site_names}
    assert len(plans) == 1
    assert_no_duplicates(fed, 2)


def test_asym_async_on_s3_with_a_slow_site(tmp_path, s3_url, moto_endpoint):
    from fedfs.ops.simulate import SimulationSpec, simulate

    env, sites = nnunet_sites(tmp_path)
    spec = SimulationSpec(datasets={n: str(s.dataset_id) for n, s in sites.items()}, mode="asym",
                          aggregation="async", buffer_size=2, rounds=3, trainer="nnUNetTrainerFedfsTiny",
                          final_validation=False, poll_interval=0.5,
                          site_args={"S2": ["--iterations-per-epoch", "40"]})  # S2 is 4x slower
    result = simulate(spec, workdir=tmp_path / "sim", bucket=s3_url, env=env, echo=None, timeout_s=1200)
    fed = Federation.open(s3_url)
    versions = all_versions(fed)
    assert result["final_version"] == len(versions) - 1 >= 3 and versions[-1].final
    assert all(len(v.contributions) >= 1 for v in versions[1:])
    assert all(v.site_blobs and set(v.site_blobs) == set(sites) for v in versions)  # personalised models
    fast_done = [len(fed.store.list(layout.site_updates_prefix(s))) for s in ("S0", "S1")]
    assert fast_done == [3, 3]  # the fast sites never waited for the slow one
    sharing = versions[1].report["sharing"]
    assert all(v["shared_tensors"] > 0 for v in sharing.values())
    assert_no_duplicates(fed, 3)
    for s in sites:
        assert result["site_summaries"][s]["epochs"] >= 1


def _start(cmd, env, log):
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_kill_sites_and_aggregator_then_restart(tmp_path):
    """kill -9 of a site mid-training (real SIGKILL), of a site between its checkpoint and its
    record, and of the aggregator between payload and manifest: restarted, the federation
    completes with no duplicate and no lost update."""
    env, sites = nnunet_sites(tmp_path)
    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    for s in sites:
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, sorted(sites), rounds=2)
    fed, _ = Federation.create(url, config, agg)
    base_env = {**os.environ, **env}
    common = ["--poll-interval", "0.5"]
    cmds = {"agg": FEDFS + ["aggregator", "run", url, "--key", str(keys / "agg.key"), "--workdir", str(tmp_path / "w-agg")] + common}
    for s, p in sites.items():
        cmds[s] = FEDFS + ["site", "run", url, "--key", str(keys / f"{s}.key"), "--workdir", str(tmp_path / f"w-{s}"),
                           "-d", str(p.dataset_id), "-tr", "nnUNetTrainerFedfsTiny", "-np", "1", "-npfp", "1",
                           "--no-final-validation"] + common
    faults = {"agg": "aggregator.before_manifest@2", "S0": "site.mid_training@1"}
    procs = {n: _start(c, {**base_env, "FEDFS_FAULTS": faults.get(n, "")}, tmp_path / f"{n}.log")
             for n, c in cmds.items()}
    killed_s1 = False
    deadline = time.time() + 1200
    try:
        while time.time() < deadline:
            if not killed_s1:
                try:
                    hb = fed.bucket.read(layout.site_heartbeat("S1"), Heartbeat).doc
                except Exception:  # noqa: BLE001 - not written yet
                    hb = None
                if hb is not None and hb.phase == "training" and hb.round == 1:
                    time.sleep(1.0)
                    os.killpg(procs["S1"].pid, signal.SIGKILL)
                    procs["S1"].wait()
                    killed_s1 = True
                    procs["S1"] = _start(cmds["S1"], base_env, tmp_path / "S1.log")
            for n, p in list(procs.items()):
                if p.poll() == 137 and n in faults:  # the injected crash: start it again, without faults
                    procs[n] = _start(cmds[n], base_env, tmp_path / f"{n}.log")
                    faults.pop(n)
                elif p.poll() not in (None, 0, 137):
                    raise AssertionError(f"{n} failed:\n{(tmp_path / f'{n}.log').read_text()[-3000:]}")
            if all(p.poll() == 0 for p in procs.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the federation did not finish")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert killed_s1 and not faults, "every fault was injected and recovered from"
    assert "fault injected at site.mid_training" in (tmp_path / "S0.log").read_text()
    assert "fault injected at aggregator.before_manifest" in (tmp_path / "agg.log").read_text()
    versions = all_versions(fed)
    assert len(versions) == 3 and versions[-1].final
    assert [sorted(c.site for c in v.contributions) for v in versions[1:]] == [sorted(sites)] * 2
    assert_no_duplicates(fed, 2)
    for s in sites:  # exactly one update per round, each from the round's version
        ups = [fed.bucket.read(layout.site_update(s, r), UpdateManifest).doc for r in range(2)]
        assert [u.base_version for u in ups] == [0, 1]
    state = json.loads((tmp_path / "w-S0" / "state.json").read_text())
    assert state["finished"] and state["summary"]["epochs"] == 2  # no epoch trained twice


def test_cron_steps_to_completion(tmp_path):
    """`fedfs site step` / `fedfs aggregator step` called repeatedly, as cron would."""
    env, sites = nnunet_sites(tmp_path, n=2, n_train=5)
    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    for s in sites:
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, sorted(sites), rounds=2, local_epochs=1)
    fed, _ = Federation.create(url, config, agg)
    run_env = {**os.environ, **env}

    def step(*args):
        p = subprocess.run(FEDFS + list(args), env=run_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout.strip()

    agg_cmd = ["aggregator", "step", url, "--key", str(keys / "agg.key"), "--workdir", str(tmp_path / "w-agg"), "-q"]
    actions = []
    for _ in range(20):
        actions.append(step(*agg_cmd))
        for s, p in sites.items():
            actions.append(step("site", "step", url, "--key", str(keys / f"{s}.key"), "--workdir",
                                str(tmp_path / f"w-{s}"), "-d", str(p.dataset_id), "-tr", "nnUNetTrainerFedfsTiny",
                                "-np", "1", "-npfp", "1", "--no-final-validation", "-q"))
        if all(json.loads((tmp_path / f"w-{s}" / "state.json").read_text()).get("finished")
               for s in sites if (tmp_path / f"w-{s}" / "state.json").exists()) and len(actions) > 6:
            break
    assert "finished" in step(*agg_cmd)
    for s in sites:
        state = json.loads((tmp_path / f"w-{s}" / "state.json").read_text())
        assert state["finished"] and state["updates_sent"] == 2
        assert state["summary"]["epochs"] == 2  # nnU-Net resumed its epoch count across processes
    # a step with nothing due exits 0 at once
    assert "done" in step("site", "step", url, "--key", str(keys / "S0.key"), "--workdir", str(tmp_path / "w-S0"),
                          "-d", str(sites["S0"].dataset_id), "-tr", "nnUNetTrainerFedfsTiny", "-q")
