"""Multi-GPU sites (issue 16, item 5): `--num-gpus N` trains each round with nnU-Net's DDP over N ranks.

Here DDP runs for real over gloo with two CPU ranks (no GPU on this machine): nnU-Net's batch split,
DDP's gradient all-reduce, its DDP-aware loss and all-gathered metrics, rank-0 checkpoints. What only a
GPU run exercises (nccl, cuda:<rank>, device_ids, SyncBatchNorm, the GradScaler) is checked by
benchmarks/ddp_gpu.py on a GPU machine."""

from __future__ import annotations

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


@pytest.mark.nnunet
def test_two_gloo_ranks_train_a_federated_round_in_step(site, tmp_path, monkeypatch):
    from fedfs.nnunet.ddp import DdpSession
    from fedfs.nnunet.work import NnunetOptions, NnunetWork
    from fedfs.weights.tensors import load_weights

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    work = NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_gpus=2, ddp_on_cpu=True,
                                    validate=False))
    try:
        work.start(total_epochs=2)
        s = work.session
        assert isinstance(s, DdpSession)
        assert [(r["rank"], r["is_ddp"], r["backend"], r["device"]) for r in s.ranks] == \
            [(0, True, "gloo", "cpu"), (1, True, "gloo", "cpu")]
        plans_batch = s.held_plans()[1]["configurations"]["2d"]["batch_size"]
        sizes = s.batch_sizes()  # nnU-Net's _set_batch_size_and_oversample under DDP
        assert sum(sizes) == plans_batch and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        if plans_batch % 2 == 0:
            assert sizes == [plans_batch // 2] * 2

        work.initial_weights(str(tmp_path / "v0.safetensors"))  # as a site writes its initial weights
        glob, _ = load_weights(tmp_path / "v0.safetensors")
        metrics = work.train_round(str(tmp_path / "v0.safetensors"), 1, str(tmp_path / "update.safetensors"))
        assert metrics["epoch"] == 1 and metrics["num_ranks"] == 2 and metrics["train_loss"] is not None

        # each rank drew its own batches: equal weights after training mean DDP all-reduced the gradients
        digests = s.rank_digests()
        assert len(set(digests)) == 1, digests
        update, meta = load_weights(tmp_path / "update.safetensors")
        assert meta["kind"] == "update" and set(update) == set(glob)
        assert _differs(update, glob)  # rank 0 wrote the trained weights, not the global
        assert all(torch.isfinite(v).all() for v in update.values())
        assert (s.output_folder / "checkpoint_latest.pth").is_file()  # written by rank 0

        # the next round starts from the global on every rank, whatever each rank held before
        s.load_weights(glob)
        assert len(set(s.rank_digests())) == 1 and not _differs(s.weights(), glob)
    finally:
        pids = work.session.pids if work.session is not None else []
        work.close()
    assert pids and work.session.alive() == []
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]  # joined, nothing orphaned
    with pytest.raises(NnunetError, match="closed"):
        work.session.rank_digests()

    # a restarted site: every rank resumes from rank 0's nnU-Net checkpoint, then finishes
    again = NnunetWork(NnunetOptions(dataset=str(DATASET), trainer=TINY, num_gpus=2, ddp_on_cpu=True,
                                     validate=False))
    try:
        again.start(total_epochs=2)
        assert again.epoch == 1 and again.session.resumed_from.name == "checkpoint_latest.pth"
        assert len(set(again.session.rank_digests())) == 1 and not _differs(again.session.weights(), update)
        out = again.finish(str(tmp_path / "update.safetensors"))
        assert out["epochs"] == 1 and os.path.isfile(out["checkpoint_final"])
        os.kill(again.session.pids[1], signal.SIGKILL)  # a rank that dies ends the session, naming it
        with pytest.raises(NnunetError, match="DDP rank 1 died during digest"):
            again.session.rank_digests()
        assert again.session.alive() == []  # rank 0 was stopped too
    finally:
        again.close()


@pytest.mark.nnunet
def test_a_rank_that_fails_is_named_and_every_rank_stops(site, tmp_path, monkeypatch):
    import multiprocessing

    from fedfs.nnunet.ddp import DdpSession

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(NnunetError, match=r"DDP rank \d failed during start: NnunetError: .*nnUNetTrainerNoSuch"):
        DdpSession.create(DATASET, "2d", 0, "nnUNetTrainerNoSuch", "nnUNetPlans", "cpu", num_gpus=2,
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
