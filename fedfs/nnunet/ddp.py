"""A site that trains each federated round with nnU-Net's DDP over N processes (``--num-gpus N``).

``nnUNetv2_train -num_gpus N`` spawns N processes (``mp.spawn(run_ddp)``), each joining a process
group and running one trainer to the end: the trainer sees ``dist.is_initialized()``, takes
``cuda:<rank>``, gives itself its share of the plans' batch size
(``_set_batch_size_and_oversample``), wraps the network in ``DDP(device_ids=[rank])``,
all-gathers losses and Dice counts at every epoch end and writes checkpoints on rank 0 only.

A fedfs site keeps its trainer in memory between rounds (:class:`~fedfs.nnunet.training.NnunetSession`).
:class:`DdpSession` does the same with N ranks: it spawns N persistent worker processes once;
each joins the process group (nccl on CUDA, gloo on the CPU; MASTER_ADDR 127.0.0.1 and a free
port), builds its own :class:`NnunetSession` (so the trainer is nnU-Net's, in DDP mode) and then
executes the parent's commands in lockstep: load the global, train k epochs, checkpoint, finish.
A pipe per worker carries small command tuples only; tensors travel as safetensors files in a
local scratch folder (never pickled, never through the bucket). Rank 0's answer is the session's
answer. It has the interface of :class:`NnunetSession` (what :class:`~fedfs.nnunet.work.NnunetWork`
calls), plus :meth:`DdpSession.rank_digests` and :meth:`DdpSession.batch_sizes` to check the ranks.

Failures: a worker that raises or dies ends the session. The parent kills every rank (the others
may be blocked in a collective) and raises :class:`~fedfs.errors.NnunetError` naming the rank,
the command and the reason. Workers leave when the parent closes the session, when it is
garbage-collected or exits, and when it dies (each worker watches its parent's pid).

The worker side (the rank's command loop and the CPU adjustments) is :mod:`fedfs.nnunet.ddp_worker`.

What runs where. On the CPU (``-device cpu``, opted into with ``allow_cpu``: the tests) the
ranks use gloo, and two documented adjustments keep nnU-Net's trainer on the CPU: after
building it, its device (nnU-Net forces ``cuda:<rank>`` under torch.distributed) is set back to
the CPU and its GradScaler dropped; and nnU-Net's ``DDP(network, device_ids=[rank])`` is called
without ``device_ids`` (the name ``DDP`` in nnU-Net's trainer module is rebound in the worker
process only). Everything else (batch split, DDP gradient all-reduce, DDP-aware Dice loss,
all-gathered epoch metrics, rank-0 checkpoints, validation split over ranks) is nnU-Net's code
and runs in the CPU test. Only a GPU run exercises: nccl, ``cuda:<rank>`` devices,
``torch.cuda.set_device``, ``DDP(device_ids=[rank])``, SyncBatchNorm on GPU (nnU-Net's default
networks use InstanceNorm, for which ``convert_sync_batchnorm`` changes nothing; a BatchNorm
network would fail on the CPU), autocast and the GradScaler (``benchmarks/ddp_gpu.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, NnunetError

if TYPE_CHECKING:
    import torch

    from .inference import ModelSpec
    from .training import FinishResult

__all__ = ["DdpSession", "check_num_gpus", "free_port"]

_JOIN_S = 30.0  # how long a closing worker may take before it is terminated


def check_num_gpus(num_gpus: int, device: str, *, allow_cpu: bool = False, share_gpu: bool = False) -> None:
    """Refuse a ``--num-gpus`` that cannot run, with the reason (:class:`ConfigError`).

    N < 1 is refused; N > 1 needs ``-device cuda`` and at least N visible CUDA devices (as
    nnU-Net asserts), unless ``share_gpu`` (several ranks on one GPU, over gloo: the GPU script on
    a one-GPU machine). ``-device cpu`` is refused unless ``allow_cpu``: on the CPU one process
    already uses every core, so DDP there only tests the DDP path (the tests use it)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ConfigError(f"--num-gpus must be a whole number of at least 1, got {num_gpus!r}")
    if num_gpus == 1:
        return
    if device == "mps":
        raise ConfigError(f"--num-gpus {num_gpus} with -device mps: nnU-Net's DDP runs on CUDA GPUs only; "
                          "drop --num-gpus")
    if device == "cpu":
        if allow_cpu:
            return
        raise ConfigError(f"--num-gpus {num_gpus} with -device cpu: nnU-Net's DDP needs CUDA GPUs, and on the CPU "
                          "one training process already uses every core; drop --num-gpus or use -device cuda")
    if device != "cuda":
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'mps', got {device!r}")
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--num-gpus {num_gpus}, but torch sees no CUDA device{where}")
    if num_gpus > count and not share_gpu:
        raise ConfigError(f"--num-gpus {num_gpus}, but torch sees {count} CUDA device(s){where}: give at most "
                          f"--num-gpus {count}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous (``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- parent side


def _stop(procs: list[Any], conns: list[Any], scratch: str, graceful: bool) -> None:
    """Close the ranks: ask them to leave (``graceful``), then terminate, then kill what remains."""
    if graceful:
        for c in conns:
            with contextlib.suppress(Exception):
                c.send(("close", {}))
        deadline = time.monotonic() + _JOIN_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    for c in conns:
        with contextlib.suppress(Exception):
            c.close()
    shutil.rmtree(scratch, ignore_errors=True)


class DdpSession:
    """N nnU-Net trainers in DDP, one per worker process, driven like one :class:`NnunetSession`.

    Build it with :meth:`create`; close it (or use it as a context manager). Use one session per
    thread at a time, like :class:`NnunetSession`.
    """

    def __init__(self, procs: list[Any], conns: list[Any], scratch: str, infos: list[dict[str, Any]],
                 epoch: int, env: Mapping[str, str]):
        """Wrap started, ready workers; use :meth:`create` rather than this."""
        self._procs, self._conns, self._scratch = procs, conns, scratch
        self.ranks = infos  # per rank: rank, pid, device, device_name, is_ddp, backend
        self.env = dict(env)
        self.resumed_from: Path | None = None
        self._epoch = epoch
        self._facts: dict[str, Any] | None = None
        self._seq = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, procs, conns, scratch, False)

    @classmethod
    def create(cls, dataset: str | int, configuration: str, fold: int | str,
               trainer: str | type = "nnUNetTrainer", plans: str = "nnUNetPlans", device: str = "cuda", *,
               num_gpus: int, total_epochs: int, iterations_per_epoch: int | None = None,
               val_iterations: int | None = None, output_folder_suffix: str | None = None,
               env: Mapping[str, str] | None = None, num_threads: int | None = None,
               allow_cpu: bool = False, share_gpu: bool = False) -> DdpSession:
        """Spawn ``num_gpus`` ranks, each building its trainer as :meth:`NnunetSession.create` would
        with the same arguments (under torch.distributed), and wait until all are initialised.

        The backend is nccl on CUDA (one GPU per rank), gloo on the CPU (``allow_cpu``) and for
        ranks sharing a GPU (``share_gpu``; NCCL refuses two ranks on one device). ``num_threads``
        is each rank's torch thread count (default on the CPU: the cores divided among the ranks).
        A ``trainer`` given as a class must be importable by its module name in the workers.
        """
        check_num_gpus(num_gpus, device, allow_cpu=allow_cpu, share_gpu=share_gpu)
        if num_gpus < 2:
            raise ConfigError("DdpSession needs --num-gpus 2 or more; one rank is an NnunetSession")
        if total_epochs < 1:
            raise ConfigError(f"total_epochs must be at least 1, got {total_epochs}")
        from .build import env_snapshot

        snapshot = env_snapshot(env)
        if num_threads is None and device == "cpu":
            num_threads = max(1, (os.cpu_count() or 1) // num_gpus)
        backend = "nccl" if device == "cuda" and not share_gpu else "gloo"
        create = {"dataset": dataset, "configuration": configuration, "fold": fold, "trainer": trainer,
                  "plans": plans, "total_epochs": total_epochs, "iterations_per_epoch": iterations_per_epoch,
                  "val_iterations": val_iterations, "output_folder_suffix": output_folder_suffix,
                  "env": snapshot, "num_threads": num_threads}
        import torch.multiprocessing as tmp

        from .ddp_worker import worker

        ctx = tmp.get_context("spawn")
        scratch = tempfile.mkdtemp(prefix="fedfs-ddp-")
        port = free_port()
        procs, conns = [], []
        try:
            for rank in range(num_gpus):
                parent_end, child_end = ctx.Pipe()
                # not daemonic: a rank starts nnU-Net's augmentation workers and validation pool
                p = ctx.Process(target=worker, name=f"fedfs-ddp-rank{rank}", daemon=False,
                                args=(rank, num_gpus, port, backend, child_end, os.getpid(), device, share_gpu,
                                      create))
                p.start()
                child_end.close()
                procs.append(p)
                conns.append(parent_end)
            infos, epochs = _collect(procs, conns, "start")
        except BaseException:
            _stop(procs, conns, scratch, graceful=False)
            raise
        return cls(procs, conns, scratch, infos, epochs[0], snapshot)

    # ------------------------------------------------------------------ the command channel

    def _all(self, name: str, **kwargs: Any) -> list[Any]:
        """Send one command to every rank and return their results (index = rank); any failure ends the session."""
        if self._closed:
            raise NnunetError(f"the DDP session is closed (command {name})")
        for c in self._conns:
            try:
                c.send((name, kwargs))
            except (OSError, EOFError):
                break  # a dead rank: _collect names it
        try:
            results, epochs = _collect(self._procs, self._conns, name)
        except BaseException:
            self._kill()
            raise
        self._epoch = epochs[0]
        return results

    def _rank0(self, name: str, **kwargs: Any) -> Any:
        return self._all(name, **kwargs)[0]

    def _kill(self) -> None:
        self._closed = True
        self._finalizer.detach()
        _stop(self._procs, self._conns, self._scratch, graceful=False)

    def _scratch_file(self, what: str) -> str:
        self._seq += 1
        return os.path.join(self._scratch, f"{what}-{self._seq}.safetensors")

    # ------------------------------------------------------------------ NnunetSession's interface

    def _fact(self, key: str) -> Any:
        if self._facts is None:
            self._facts = self._rank0("facts")
        return self._facts[key]

    @property
    def output_folder(self) -> Path:
        return Path(self._fact("output_folder"))

    @property
    def epoch(self) -> int:
        """Epochs completed so far (rank 0's ``current_epoch``; every rank steps alike)."""
        return self._epoch

    @property
    def num_epochs(self) -> int:
        return int(self._fact("num_epochs"))

    @property
    def dataset_json(self) -> dict[str, Any]:
        return self._fact("dataset_json")

    def held_plans(self) -> tuple[str, dict[str, Any]]:
        """(plans identifier, plans) the trainers were built from."""
        return self._fact("plans_name"), self._fact("plans")

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def resume(self) -> bool:
        """Every rank loads nnU-Net's latest checkpoint from the output folder (:meth:`NnunetSession.resume`)."""
        found = self._rank0("resume")
        self.resumed_from = Path(found) if found else None
        return found is not None

    def load_weights(self, tensors: Mapping[str, torch.Tensor], *,
                     partial: bool = False) -> tuple[list[str], list[str]]:
        """Copy ``tensors`` into every rank's network (a local safetensors file, read by each rank)."""
        from ..weights.tensors import save_weights

        path = self._scratch_file("in")
        save_weights(path, dict(tensors), {"kind": "ddp-in"})
        try:
            loaded, kept = self._rank0("load_weights", path=path, partial=partial)
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)
        return list(loaded), list(kept)

    def apply_pretrained(self, tensors: Mapping[str, torch.Tensor], *, partial: bool = False) -> dict[str, Any]:
        """:func:`fedfs.nnunet.pretrained.apply_pretrained` on every rank; rank 0's report."""
        from ..weights.tensors import save_weights

        path = self._scratch_file("pretrained")
        save_weights(path, dict(tensors), {"kind": "ddp-pretrained"})
        try:
            return self._rank0("apply_pretrained", path=path, partial=partial)
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def weights(self) -> dict[str, torch.Tensor]:
        """Rank 0's canonical tensors (DDP keeps every rank's the same)."""
        from ..weights.tensors import load_weights

        path = self._scratch_file("out")
        self._all("weights", path=path)
        try:
            return load_weights(path)[0]
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def train_epochs(self, n: int = 1, *, schedule_epoch: int | None = None) -> dict[str, Any]:
        """``n`` epochs of nnU-Net's loop on every rank in lockstep (:meth:`NnunetSession.train_epochs`);
        rank 0's metrics, which nnU-Net all-gathers over the ranks."""
        if n < 1:
            raise ConfigError(f"train_epochs needs n >= 1, got {n}")
        if self.epoch + n > self.num_epochs:  # checked here too: a rank's refusal would end the session
            raise NnunetError(f"cannot train {n} more epoch(s): {self.epoch} of {self.num_epochs} are done "
                              "and nnU-Net's learning-rate schedule ends at num_epochs")
        metrics = dict(self._rank0("train_epochs", n=n, schedule_epoch=schedule_epoch))
        metrics["num_ranks"] = len(self._procs)
        return metrics

    def split_sizes(self) -> tuple[int, int]:
        return tuple(self._rank0("split_sizes"))  # type: ignore[return-value]

    def save_checkpoint(self, name: str = "checkpoint_latest.pth") -> Path:
        """nnU-Net's checkpoint, written by rank 0 (as nnU-Net does under DDP)."""
        return Path(self._rank0("save_checkpoint", name=name))

    def finish(self, validate: bool = True, *, allow_early: bool = False,
               validation_processes: int | None = None) -> FinishResult:
        """``on_train_end`` and nnU-Net's final validation on every rank (the cases split over the ranks,
        the summary written by rank 0), as ``run_ddp`` ends a training."""
        return self._rank0("finish", validate=validate, allow_early=allow_early,
                           validation_processes=validation_processes)

    def spec(self) -> ModelSpec:
        return self._rank0("spec")

    # ------------------------------------------------------------------ DDP checks

    def rank_digests(self) -> list[str]:
        """sha256 of every rank's canonical tensors (index = rank): equal when DDP kept them in step."""
        return list(self._all("digest"))

    def batch_sizes(self) -> list[int]:
        """Every rank's batch size: nnU-Net's split of the plans' batch size over the ranks."""
        return list(self._all("batch_size"))

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        """Ask every rank to stop its dataloaders and leave the process group; wait for them (no orphans)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _stop(self._procs, self._conns, self._scratch, graceful=True)

    def alive(self) -> list[int]:
        """The pids of ranks still running (empty after :meth:`close`)."""
        return [int(p.pid) for p in self._procs if p.is_alive()]

    def __enter__(self) -> DdpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _collect(procs: list[Any], conns: list[Any], what: str) -> tuple[list[Any], list[int]]:
    """Every rank's reply to ``what``; :class:`NnunetError` naming the first rank that failed or died."""
    from multiprocessing.connection import wait

    replies: dict[int, tuple[Any, int]] = {}
    pending = set(range(len(procs)))
    while pending:
        waiting = {conns[r]: r for r in pending}
        sentinels = {procs[r].sentinel: r for r in pending}
        for ready in wait([*waiting, *sentinels]):
            if ready in waiting:
                r = waiting[ready]
                try:
                    status, result, epoch = ready.recv()
                except (EOFError, OSError):
                    procs[r].join(5)
                    raise NnunetError(f"DDP rank {r} died during {what} (exit code {procs[r].exitcode})") from None
                if status != "ok":
                    raise NnunetError(f"DDP rank {r} failed during {what}: {result}\n(rank {r}'s traceback)\n{epoch}")
                replies[r] = (result, epoch)
                pending.discard(r)
            elif sentinels[ready] in pending and not conns[sentinels[ready]].poll():
                r = sentinels[ready]
                procs[r].join(5)
                raise NnunetError(f"DDP rank {r} died during {what} (exit code {procs[r].exitcode})")
    return [replies[r][0] for r in range(len(procs))], [replies[r][1] for r in range(len(procs))]
