"""Does a multi-GPU site (``fedfs site ... --num-gpus N``) train a round with nnU-Net's DDP?

For a GPU machine: the parts of fedfs's DDP path that the CPU test (tests/test_ddp.py, two gloo
ranks) cannot reach are nccl, ``cuda:<rank>`` devices, ``torch.cuda.set_device``,
``DDP(network, device_ids=[rank])``, autocast and the GradScaler, SyncBatchNorm on GPU. This script
makes a tiny 2D dataset (8 synthetic 64x64 cases), plans and preprocesses it, then trains the same
round twice: once in one process (``--num-gpus 1``, fedfs's in-process NnunetSession) and once with
N ranks (fedfs.nnunet.ddp.DdpSession), each starting from the same global weights. It prints one
JSON object (the shape of ``benchmarks/_common.py``): ranks, backend, device names, seconds per
epoch for 1 and N ranks, whether every rank holds the same weights after the round, and whether
the update rank 0 returns is finite and differs from the global.

With at least N visible CUDA devices the ranks use one GPU each over nccl, as
``nnUNetv2_train -num_gpus N`` does. With one visible GPU the N ranks share it over gloo (NCCL
refuses two ranks on one device; ``"shared_gpu": true`` in the output): the DDP code path is the
same, the timing is not a multi-GPU speed-up. ``--cpu`` runs N gloo ranks on the CPU (what the
test runs; use it to check the script anywhere).

Not in ``run_all.py``: its figures mean something on a GPU machine only.

    python benchmarks/ddp_gpu.py [--cpu] [--ranks 2] [--epochs 3] [--iterations 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import benchmark_output, target  # noqa: E402

DATASET = 779
TRAINER = "nnUNetTrainer"  # nnU-Net's own; iterations set below


def _prepare(root: Path) -> dict[str, str]:
    """A tiny planned and preprocessed 2D dataset under ``root``; nnU-Net's folders."""
    from fedfs.nnunet import adapter as nn
    from fedfs.nnunet.build import trainer_search_path
    from fedfs.testing import synthetic as syn

    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_extTrainer": trainer_search_path()}
    for v in env.values():
        os.makedirs(v, exist_ok=True)
    os.environ.update(env)
    syn.make_site(root / "raw", DATASET, "DdpBench", n_train=8, n_test=0, style=syn.DEFAULT_STYLES[0], seed=3,
                  test_root=root / "heldout")
    nn.local_fingerprint(DATASET, num_processes=1)
    nn.plan_and_preprocess(DATASET, ["2d"], num_processes=1)
    return env


def _epoch_times(session, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        out.append(float(session.train_epochs(1)["epochs_time_s"]))
    return out


def _finite(tensors) -> bool:
    import torch

    return all(bool(torch.isfinite(v).all()) for v in tensors.values())


def run(cpu: bool, ranks: int, epochs: int, iterations: int, root: Path) -> dict:
    import torch

    from fedfs.nnunet.ddp import DdpSession
    from fedfs.nnunet.training import NnunetSession

    _prepare(root)
    common = {"total_epochs": epochs, "iterations_per_epoch": iterations, "val_iterations": max(1, iterations // 5)}
    if cpu:
        device, share, devices_visible = "cpu", False, 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible: run on a GPU machine, or pass --cpu")
        device, devices_visible = "cuda", torch.cuda.device_count()
        share = devices_visible < ranks
    cores = os.cpu_count() or 1
    extra = {"nnUNet_n_proc_DA": "0" if cpu else str(max(1, min(8, cores // ranks - 1)))}

    # one rank, in process: today's path; it also gives the global both runs start from
    os.environ["nnUNet_results"] = str(root / "res1")
    one = NnunetSession.create(DATASET, "2d", 0, TRAINER, "nnUNetPlans", device, env=extra,
                               num_threads=max(1, (os.cpu_count() or 1) // ranks) if cpu else None, **common)
    try:
        start = one.weights()
        times_1 = _epoch_times(one, epochs)
    finally:
        one.close()

    os.environ["nnUNet_results"] = str(root / f"res{ranks}")
    t0 = time.perf_counter()
    ddp = DdpSession.create(DATASET, "2d", 0, TRAINER, "nnUNetPlans", device, num_gpus=ranks, allow_cpu=cpu,
                            share_gpu=share, env=extra, **common)
    startup_s = time.perf_counter() - t0
    try:
        ddp.load_weights(start)
        same_before = len(set(ddp.rank_digests())) == 1
        times_n = _epoch_times(ddp, epochs)
        digests = ddp.rank_digests()
        update = ddp.weights()
        batch_sizes = ddp.batch_sizes()
        plans_batch = ddp.held_plans()[1]["configurations"]["2d"]["batch_size"]
        info = ddp.ranks
    finally:
        ddp.close()
        alive = ddp.alive()

    # the first epoch pays for warm-up (cudnn benchmark, dataloader start): report the others too
    def per_epoch(ts: list[float]) -> float:
        rest = ts[1:] or ts
        return round(sum(rest) / len(rest), 3)

    identical = same_before and len(set(digests)) == 1
    finite = _finite(update)
    moved = any(not torch.equal(update[k], start[k]) for k in start)
    figures = {
        "ranks": ranks, "backend": info[0]["backend"], "device": device, "shared_gpu": share,
        "cuda_devices_visible": devices_visible, "device_names": [r["device_name"] for r in info],
        "rank_devices": [r["device"] for r in info], "plans_batch_size": plans_batch, "rank_batch_sizes": batch_sizes,
        "iterations_per_epoch": iterations, "epochs": epochs,
        "seconds_per_epoch": {"1": per_epoch(times_1), str(ranks): per_epoch(times_n)},
        "epoch_times_s": {"1": [round(t, 3) for t in times_1], str(ranks): [round(t, 3) for t in times_n]},
        "ddp_startup_s": round(startup_s, 1),
        "weights_identical_across_ranks": identical, "update_finite": finite, "update_differs_from_global": moved,
        "ranks_alive_after_close": len(alive),
        "torch": torch.__version__,
    }
    targets = {
        "weights_identical_across_ranks": target("every rank's weights equal after the round (DDP in step)",
                                                 str(identical).lower(), identical),
        "update_finite": target("the update rank 0 returns is finite and differs from the global",
                                str(finite and moved).lower(), finite and moved),
        "batch_split": target("the ranks' batch sizes sum to the plans' batch size", sum(batch_sizes),
                              sum(batch_sizes) == plans_batch),
        "no_orphans": target("no rank alive after close", len(alive), not alive),
    }
    return benchmark_output("ddp_gpu", figures, targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="gloo ranks on the CPU (check the script without a GPU)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    ap.add_argument("--json", action="store_true", help="accepted for run_all.py's convention; JSON is the output")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fedfs-ddp-bench-"))
    stdout = os.dup(1)
    os.dup2(2, 1)  # nnU-Net prints its log on stdout (the ranks inherit it): keep stdout for the JSON
    try:
        out = run(a.cpu, a.ranks, a.epochs, a.iterations, root)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0 if out["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
