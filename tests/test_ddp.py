"""Multi-GPU sites (issue 16, item 5): `--num-gpus N` trains each round with nnU-Net's DDP over N ranks.

Here DDP runs for real over gloo with two CPU ranks (no GPU on this machine): nnU-Net's batch split,
DDP's gradient all-reduce, its DDP-aware loss and all-gathered metrics, rank-0 checkpoints. What only a
GPU run exercises (nccl, cuda:<rank>, device_ids, SyncBatchNorm, the GradScaler) is checked by
benchmarks/ddp_gpu.py on a GPU machine."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from fedfs.errors import ConfigError, NnunetError
from fedfs.nnunet.ddp import check_num_gpus
from nnunet_tiny import DATASET, TINY, default_plans, tiny_site


def test_bad_num_gpus_are_refused_with_the_reason():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="at least 1"):
            check_num_gpus(bad, "cuda")
    check_num_gpus(1, "cpu")  # one rank: today's in-process session
    with pytest.raises(ConfigError, match="-device cpu"):
        check_num_gpus(2, "cpu")
    check_num_gpus(2, "cpu", allow_cpu=True)  # the gloo path the tests run
    with pytest.raises(ConfigError, match="mps"):
        check_num_gpus(2, "mps")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="CUDA device"):
        check_num_gpus(max(2, visible + 1), "cuda")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with tiny_site(tmp_path_factory) as t:
        default_plans(t)
        yield t


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def _blob(fed, version: int, dest):
    from fedfs.protocol import layout
    from fedfs.protocol.schema import GlobalManifest
    from fedfs.weights.tensors import load_weights

    doc = fed.bucket.read(layout.global_version(version), GlobalManifest).doc
    return doc, load_weights(fed.bucket.get_blob_file(doc.blob, str(dest)))[0]


@pytest.mark.nnunet
def test_two_gloo_ranks_train_a_federated_round_in_step(site, tmp_path, monkeypatch):
    """The real site role and aggregator, one round, then a restarted site: the site's nnU-Net is two DDP ranks."""
    from click.testing import CliRunner

    from fedfs.cli.app import main
    from fedfs.federation import Federation
    from fedfs.nnunet.ddp import DdpSession
    from fedfs.nnunet.work import NnunetOptions, NnunetWork
    from fedfs.protocol import layout
    from fedfs.roles.aggregator import Aggregator
    from fedfs.trust.signing import generate_keypair

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    r = CliRunner().invoke(main, ["init", url, "--sites", "A", "--keys", str(keys), "--rounds", "1"])
    assert r.exit_code == 0, r.output
    fed = Federation.open(url)
    agg = Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "w-agg")
    options = NnunetOptions(dataset=str(DATASET), trainer=TINY, num_processes=1, num_processes_fingerprint=1,
                            num_gpus=2, ddp_on_cpu=True, validate=False)

    def site_a(**kw):
        return fed.as_party(keys / "A.key").site(NnunetWork(dataclasses.replace(options, **kw)), tmp_path / "w-A")

    a = site_a()
    try:
        for _ in range(40):  # census, fingerprint, plans, v0, the round
            agg.step()
            if fed.store.exists(layout.global_version(1)):
                break
            a.step()
        s = a.work.session
        assert isinstance(s, DdpSession)
        assert [(r["rank"], r["is_ddp"], r["backend"], r["device"]) for r in s.ranks] == \
            [(0, True, "gloo", "cpu"), (1, True, "gloo", "cpu")]
        plans_batch = s.held_plans()[1]["configurations"]["2d"]["batch_size"]
        sizes = s.batch_sizes()  # nnU-Net's _set_batch_size_and_oversample under DDP
        assert sum(sizes) == plans_batch and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        if plans_batch % 2 == 0:
            assert sizes == [plans_batch // 2] * 2
        # each rank drew its own batches: equal weights after training mean DDP all-reduced the gradients
        assert len(set(s.rank_digests())) == 1
        _, v0 = _blob(fed, 0, tmp_path / "v0.safetensors")
        final, v1 = _blob(fed, 1, tmp_path / "v1.safetensors")  # one site: its update, from rank 0
        assert final.is_final(1) and set(v1) == set(v0) and _differs(v1, v0)
        assert all(torch.isfinite(t).all() for t in v1.values())
        trained = s.weights()
        assert (s.output_folder / "checkpoint_latest.pth").is_file()  # written by rank 0
    finally:
        pids = a.work.session.pids if a.work.session is not None else []
        a.work.close()
    assert pids and a.work.session.alive() == []
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]  # joined, nothing orphaned
    with pytest.raises(NnunetError, match="closed"):
        a.work.session.rank_digests()

    # a restarted site: every rank resumes from rank 0's nnU-Net checkpoint, then finishes with nnU-Net's
    # final validation, the validation cases split over the ranks and the summary written by rank 0
    b = site_a(validate=True, validation_processes=1)
    try:
        assert b.step().action == "finished"
        s = b.work.session
        assert s.epoch == 1 and s.resumed_from.name == "checkpoint_latest.pth"
        assert (s.output_folder / "checkpoint_final.pth").is_file()
        n_val = s.split_sizes()[1]
        assert len(list((s.output_folder / "validation").glob("*.nii.gz"))) == n_val >= 2  # both ranks' shares
        assert 0 <= b.state.summary["validation_dice"] <= 1
        assert len(set(s.rank_digests())) == 1 and not _differs(s.weights(), v1)  # the final global, everywhere
        s.load_weights(v0)  # whatever each rank held, a load gives every rank the same weights
        assert len(set(s.rank_digests())) == 1 and not _differs(s.weights(), v0) and _differs(v0, trained)
        os.kill(s.pids[1], signal.SIGKILL)  # a rank that dies ends the session, naming it
        with pytest.raises(NnunetError, match="DDP rank 1 died during digest"):
            s.rank_digests()
        assert s.alive() == []  # rank 0 was stopped too
    finally:
        b.work.close()


@pytest.mark.nnunet
def test_a_rank_that_fails_is_named_and_every_rank_stops(tmp_path, monkeypatch):
    import multiprocessing

    from fedfs.nnunet.ddp import DdpSession

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    before = {p.pid for p in multiprocessing.active_children()}
    from fedfs.nnunet.trainers.fedfs_tiny_trainer import nnUNetTrainerFedfsTiny

    # a trainer class (pickled by name for the ranks) and a dataset no rank has
    with pytest.raises(NnunetError, match=r"DDP rank \d failed during start: NnunetError: .*dataset 998"):
        DdpSession.create(998, "2d", 0, nnUNetTrainerFedfsTiny, "nnUNetPlans", "cpu", num_gpus=2,
                          total_epochs=1, allow_cpu=True, env={"nnUNet_n_proc_DA": "0"})
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_site_commands_refuse_num_gpus_that_cannot_run_before_any_set_up(tmp_path):
    from click.testing import CliRunner

    from fedfs.cli.app import main
    from fedfs.trust.signing import generate_keypair

    keys, url = tmp_path / "keys", str(tmp_path / "bucket")
    generate_keypair("agg", "aggregator", keys)
    generate_keypair("A", "site", keys)
    assert CliRunner().invoke(main, ["init", url, "--sites", "A", "--keys", str(keys), "--rounds", "1"]).exit_code == 0
    site = ["site", "step", url, "--key", str(keys / "A.key"), "--workdir", str(tmp_path / "w"), "-d", "771"]
    for extra, said in ((["-device", "cpu", "--num-gpus", "2"], "--num-gpus 2 with -device cpu"),
                        (["-device", "cpu", "-num_gpus", "0"], "--num-gpus must be a whole number of at least 1")):
        r = CliRunner().invoke(main, site + extra)  # `fedfs` maps ConfigError to its exit code 2
        assert isinstance(r.exception, ConfigError) and said in str(r.exception), r.output
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())  # nothing was set up
