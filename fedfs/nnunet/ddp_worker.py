"""One rank of a :class:`~fedfs.nnunet.ddp.DdpSession`: a worker process running an nnU-Net trainer under DDP.

:func:`worker` is the target the session spawns. It joins the process group, builds an
:class:`~fedfs.nnunet.training.NnunetSession` (nnU-Net's trainer sees ``torch.distributed`` and runs
in DDP mode), answers "ready", then executes the parent's commands (:class:`Rank`'s methods, by name)
until "close", replying ``("ok", result, epoch)`` or ``("error", reason, traceback)``. Tensors come
and go as safetensors files named in the commands.

The CPU path (and several ranks sharing one GPU) needs two adjustments to nnU-Net's trainer, both
here: :func:`keep_on_device` (the ``prepare`` hook: the trainer's device back from the forced
``cuda:<rank>``, no GradScaler on the CPU) and :func:`rebind_ddp` (``DDP`` without ``device_ids``,
in this worker process only). nnU-Net's own GPU path (one GPU per rank, nccl) uses neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .inference import ModelSpec
    from .training import FinishResult

__all__ = ["Rank", "worker", "keep_on_device", "rebind_ddp", "rank_device", "digest"]

_WATCH_S = 1.0  # how often a worker checks that its parent lives


def _exit_with_children(code: int) -> None:
    """Kill this rank's own children (nnU-Net's augmentation workers, a validation pool), then exit."""
    import multiprocessing

    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()
    os._exit(code)


def watch_parent(parent_pid: int) -> None:
    """Exit this worker (and its own children) once its parent is gone: no orphaned ranks."""
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_S)
    _exit_with_children(3)


def rank_device(device: str, rank: int, share_gpu: bool) -> str:
    """The device of ``rank``: ``cuda:<rank>`` as nnU-Net sets it, shared GPUs in turn, else the CPU."""
    if device != "cuda":
        return "cpu"
    import torch

    return f"cuda:{rank % torch.cuda.device_count() if share_gpu else rank}"


def keep_on_device(device: str, share_gpu: bool) -> Any:
    """The ``prepare`` hook of the CPU and shared-GPU paths: the trainer's device is ours (nnU-Net
    forced ``cuda:<rank>`` under torch.distributed), and on the CPU without a GradScaler (made for
    cuda). nnU-Net's own GPU path (one GPU per rank) needs no hook."""
    import torch

    def prepare(trainer: Any) -> None:
        trainer.device = torch.device(device)
        if trainer.device.type == "cpu":
            trainer.grad_scaler = None

    return prepare if device == "cpu" or share_gpu else None


def rebind_ddp(device: str) -> None:
    """nnU-Net's trainer wraps its network in ``DDP(network, device_ids=[local_rank])``, which a CPU
    module refuses (and a shared GPU's index is not the rank): in this worker process only, the
    trainer module's name ``DDP`` calls DistributedDataParallel with this rank's device instead."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device)

    def ddp(module: Any, device_ids: Any = None, **kwargs: Any) -> DistributedDataParallel:
        return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None, **kwargs)

    trainer_module.DDP = ddp


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors``."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(k.encode() + str(tuple(v.shape)).encode() + str(v.dtype).encode())
        h.update(v.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Rank:
    """One worker's commands, executed on its own :class:`NnunetSession`."""

    def __init__(self, session: Any, rank: int):
        self.s, self.rank = session, rank

    def resume(self) -> str | None:
        return str(self.s.resumed_from) if self.s.resume() else None

    def load_weights(self, path: str, partial: bool) -> tuple[list[str], list[str]]:
        from ..weights.tensors import load_weights

        return self.s.load_weights(load_weights(path)[0], partial=partial)

    def apply_pretrained(self, path: str, partial: bool) -> dict[str, Any]:
        from ..weights.tensors import load_weights

        return self.s.apply_pretrained(load_weights(path)[0], partial=partial)

    def weights(self, path: str) -> None:
        if self.rank == 0:
            from ..weights.tensors import save_weights

            save_weights(path, self.s.weights(), {"kind": "ddp-rank0"})

    def train_epochs(self, n: int, schedule_epoch: int | None) -> dict[str, Any]:
        return self.s.train_epochs(n, schedule_epoch=schedule_epoch)

    def split_sizes(self) -> tuple[int, int]:
        return self.s.split_sizes()

    def save_checkpoint(self, name: str) -> str:
        return str(self.s.save_checkpoint(name))

    def finish(self, validate: bool, allow_early: bool, validation_processes: int | None) -> FinishResult:
        return self.s.finish(validate, allow_early=allow_early, validation_processes=validation_processes)

    def facts(self) -> dict[str, Any]:
        t = self.s.trainer
        return {"plans_name": t.plans_manager.plans_name, "plans": t.plans_manager.plans,
                "dataset_json": t.dataset_json, "output_folder": str(self.s.output_folder),
                "num_epochs": self.s.num_epochs}

    def spec(self) -> ModelSpec:
        # the class may live in a module only nnU-Net's search path knows: the parent looks it up by name
        return dataclasses.replace(self.s.spec(), trainer_class=None)

    def digest(self) -> str:
        return digest(self.s.weights())

    def batch_size(self) -> int:
        return int(self.s.trainer.batch_size)

    def rank_info(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        t = self.s.trainer
        name = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu"
        return {"rank": self.rank, "pid": os.getpid(), "device": str(t.device), "device_name": name,
                "is_ddp": bool(t.is_ddp), "backend": str(dist.get_backend()), "batch_size": int(t.batch_size)}


def worker(rank: int, world: int, port: int, backend: str, conn: Any, parent_pid: int, device: str,
            share_gpu: bool, create: dict[str, Any]) -> None:
    """A rank: join the process group, build the session, then run the parent's commands until 'close'."""
    import signal

    threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True).start()
    # the parent terminates ranks that must stop at once (another rank failed): take the children along
    signal.signal(signal.SIGTERM, lambda *_: _exit_with_children(143))
    session = None
    try:
        import datetime

        import torch
        import torch.distributed as dist

        from .training import NnunetSession

        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dev = rank_device(device, rank, share_gpu)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))  # as run_ddp does
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        prepare = keep_on_device(dev, share_gpu)
        if prepare is not None:
            rebind_ddp(dev)
        session = NnunetSession.create(**create, device=device, prepare=prepare)
        handler = Rank(session, rank)
        conn.send(("ok", handler.rank_info(), session.epoch))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    try:
        while True:
            try:
                name, kwargs = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if name == "close":
                break
            try:
                if name.startswith("_") or not callable(getattr(handler, name, None)):
                    raise ValueError(f"unknown command {name!r}")
                result = getattr(handler, name)(**kwargs)
                conn.send(("ok", result, session.epoch))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            session.close()
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            dist.destroy_process_group()
        conn.close()
    # nothing is left to tear down: skip the interpreter's slow exit with torch loaded (seconds under load)
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


