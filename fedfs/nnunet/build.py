"""Building an nnU-Net trainer the way ``nnUNetv2_train`` does, and the environment around it.

``nnUNetv2_train DATASET CONF FOLD -tr T -p P -device D`` resolves ``T`` by name (nnunetv2's
trainer package, then the folders on ``nnUNet_extTrainer``), reads the plans and
``dataset.json`` from ``nnUNet_preprocessed`` (``get_trainer_from_args``) and sets torch's
threads for the device. :func:`build_trainer` does exactly that and returns the trainer
*uninitialised*, so the caller can set ``num_epochs`` and iteration counts first.

nnU-Net reads its folders from the environment at call time (2.8); :func:`nnunet_env` applies
a snapshot of them around a call, so a long-lived session is not at the mercy of later
changes to ``os.environ``. nnunetv2 and torch are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, NnunetError

if TYPE_CHECKING:
    import torch

__all__ = ["NNUNET_ENV_VARS", "trainer_search_path", "nnunet_env", "env_snapshot", "resolve_device", "torch_device",
           "default_n_proc_da", "build_trainer"]

#: Environment variables nnU-Net reads while it trains; a session snapshots and re-applies them.
NNUNET_ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                   "nnUNet_n_proc_DA", "nnUNet_compile")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def trainer_search_path() -> str:
    """The folder with fedfs's nnU-Net trainers (``nnUNetTrainerFedfsTiny``), for ``nnUNet_extTrainer``."""
    from .trainers import SEARCH_PATH

    return SEARCH_PATH


@contextlib.contextmanager
def nnunet_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the duration of the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def env_snapshot(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """nnU-Net's variables from ``os.environ`` now, updated with ``extra``; checks the training ones."""
    snapshot = {k: os.environ[k] for k in NNUNET_ENV_VARS if k in os.environ}
    snapshot.update(extra or {})
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        if not snapshot.get(var):
            raise NnunetError(f"{var} is not set: nnU-Net needs it to train "
                              "(see nnU-Net's documentation/setting_up_paths.md)")
    return snapshot


#: nnUNetv2_train's -device default (nnunetv2.run.run_training).
DEFAULT_DEVICE = "cuda"
NO_CUDA = "no CUDA device: training on the CPU (pass -device cpu to silence this)"


def resolve_device(requested: str | None) -> tuple[str, str]:
    """The device a site trains on and a line saying which, for ``-device`` given as ``requested``.

    Unset (None) means nnUNetv2_train's default, ``cuda``; when torch sees no CUDA device it
    falls back to the CPU and the line says so (the caller logs it as a warning). An explicit
    ``cuda`` or ``mps`` that torch cannot use is a :class:`ConfigError`: a hospital that asked
    for its GPU should not train for days on the CPU without noticing.
    """
    import torch

    if requested not in (None, "cpu", "cuda", "mps"):
        raise ConfigError(f"-device must be 'cpu', 'cuda' or 'mps' (as nnUNetv2_train -device), got {requested!r}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if requested in (None, "cuda"):
        if torch.cuda.is_available():
            return "cuda", f"training on cuda: {torch.cuda.device_count()} visible GPU(s){where}"
        if requested is None:
            return "cpu", NO_CUDA
        raise ConfigError(f"-device cuda, but torch sees no CUDA device{where}: check the driver (nvidia-smi) "
                          "and CUDA_VISIBLE_DEVICES, or pass -device cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("-device mps, but torch sees no Apple GPU (MPS): pass -device cpu")
    return requested, f"training on {requested}"


def default_n_proc_da(device: str, cores: int) -> int:
    """``nnUNet_n_proc_DA`` for a site that left it unset: nnU-Net's own default (12 workers, whatever
    the machine) oversubscribes small machines, so 0 (augmentation in the training process) on the
    CPU, where torch already uses every core, and on 2 cores or fewer; else 12 capped at cores - 1."""
    if device == "cpu" or cores <= 2:
        return 0
    return min(12, cores - 1)


def torch_device(device: str, num_threads: int | None = None) -> torch.device:
    """``nnUNetv2_train -device``: the device and the torch thread settings it makes
    (``num_threads`` overrides them, e.g. for several sites sharing one machine)."""
    import torch

    if device not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'mps' (as nnUNetv2_train -device), got {device!r}")
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(f"num_threads must be at least 1, got {num_threads}")
        torch.set_num_threads(int(num_threads))
    if device == "cpu":
        if num_threads is None:
            torch.set_num_threads(multiprocessing.cpu_count())  # "let's allow torch to use hella threads"
    elif device == "cuda":
        if num_threads is None:
            torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):  # allowed only before the first parallel work
            torch.set_num_interop_threads(1)
    return torch.device(device)


def _dataset_key(dataset: str | int) -> str | int:
    return str(dataset) if str(dataset).startswith("Dataset") else int(dataset)


def _fedfs_trainer_class(name: str) -> type | None:
    """fedfs's own trainer called ``name``, imported as ``fedfs.nnunet.trainers.<module>``, or None."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules([trainer_search_path()]):
        if not info.ispkg:
            cls = getattr(importlib.import_module(f"fedfs.nnunet.trainers.{info.name}"), name, None)
            if isinstance(cls, type):
                return cls
    return None


def _search_works(name: str) -> bool:
    """Whether nnU-Net's own trainer search finds ``name`` (so a failure was elsewhere)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        recursive_find_trainer_class_by_name(name)
    except Exception:  # noqa: BLE001 - any failure of the search itself
        return False
    return True


def _instantiate(trainer_class: type, dataset: str | int, configuration: str, fold: int | str, plans: str,
                 continue_training: bool, device: torch.device) -> Any:
    """The body of nnU-Net's ``get_trainer_from_args`` for a trainer class already in hand."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not issubclass(trainer_class, nnUNetTrainer):
        raise NnunetError(f"{trainer_class.__name__} does not inherit from nnUNetTrainer")
    base = os.path.join(os.environ["nnUNet_preprocessed"], maybe_convert_to_dataset_name(_dataset_key(dataset)))
    plans_dict = load_json(os.path.join(base, plans + ".json"))
    plans_dict["continue_training"] = continue_training
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    return trainer_class(plans=plans_dict, configuration=configuration, fold=fold, dataset_json=dataset_json,
                         device=device)


def _has_checkpoint(results: str, dataset: str | int, trainer: str, plans: str, configuration: str,
                    fold: int | str, suffix: str | None) -> bool:
    """Whether nnU-Net's output folder already holds a checkpoint (the logger's ``resume`` flag)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(_dataset_key(dataset))
    except (RuntimeError, ValueError):
        return False
    folder = Path(results, name, f"{trainer}__{plans}__{configuration}{suffix or ''}", f"fold_{fold}")
    return any((folder / f).is_file() for f in ("checkpoint_final.pth", "checkpoint_latest.pth"))


def _move_output_folder(t: Any, suffix: str) -> None:
    """Point a fresh trainer at ``<output_folder_base><suffix>/fold_X``, taking its new log file along."""
    old_fold_dir, old_base = Path(t.output_folder), Path(t.output_folder_base)
    t.output_folder_base = str(old_base) + suffix
    t.output_folder = os.path.join(t.output_folder_base, f"fold_{t.fold}")
    os.makedirs(t.output_folder, exist_ok=True)
    new_log = os.path.join(t.output_folder, os.path.basename(t.log_file))
    if os.path.isfile(t.log_file):
        shutil.move(t.log_file, new_log)
    t.log_file = new_log
    t.logger.output_folder = t.output_folder
    for d in (old_fold_dir, old_base):  # remove what the constructor created, if nothing else is there
        with contextlib.suppress(OSError):
            d.rmdir()


def build_trainer(dataset: str | int, configuration: str, fold: int | str, trainer: str | type,
                  plans: str, device: torch.device, env: Mapping[str, str],
                  output_folder_suffix: str | None = None) -> Any:
    """An uninitialised trainer, as ``nnUNetv2_train`` builds it, under ``env``.

    ``trainer`` is a name (``get_trainer_from_args``: nnunetv2's trainers, then
    ``nnUNet_extTrainer``) or a trainer class. nnU-Net's search imports every trainer module
    of nnunetv2 on its way (``primus`` pulls in timm, timm pulls in torchvision), so one
    broken optional dependency makes it fail for every trainer outside nnunetv2's top level.
    For fedfs's own trainers the class from :func:`trainer_search_path` is then used
    directly, with a ``RuntimeWarning``; anything else raises :class:`NnunetError`.
    """
    if output_folder_suffix is not None and not _SUFFIX_RE.match(output_folder_suffix):
        raise ConfigError(f"output_folder_suffix must match {_SUFFIX_RE.pattern}, got {output_folder_suffix!r}")
    if isinstance(fold, str) and fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise ConfigError(f"fold must be an integer or 'all', got {fold!r}") from None
    try:
        from nnunetv2.run.run_training import get_trainer_from_args
    except ImportError as exc:
        raise NnunetError(f"nnunetv2 is not installed ({exc})") from exc

    name = trainer if isinstance(trainer, str) else trainer.__name__
    with nnunet_env(env):
        resume = _has_checkpoint(env["nnUNet_results"], dataset, name, plans, configuration, fold,
                                 output_folder_suffix)
        try:
            if not isinstance(trainer, str):
                t = _instantiate(trainer, dataset, configuration, fold, plans, resume, device)
            else:
                try:
                    t = get_trainer_from_args(str(dataset), configuration, fold, trainer, plans,
                                              continue_training=resume, device=device)
                except Exception as exc:  # noqa: BLE001 - the search imports arbitrary trainer modules
                    own = _fedfs_trainer_class(trainer)
                    if own is None or _search_works(trainer):
                        raise
                    warnings.warn(f"nnU-Net's trainer search failed ({type(exc).__name__}: {exc}); using "
                                  f"fedfs's own {trainer} from {trainer_search_path()}", RuntimeWarning,
                                  stacklevel=3)
                    t = _instantiate(own, dataset, configuration, fold, plans, resume, device)
        except NnunetError:
            raise
        except Exception as exc:  # noqa: BLE001 - nnU-Net raises bare RuntimeError/AssertionError/OSError
            raise NnunetError(f"nnU-Net could not build trainer {name} for dataset {dataset}, configuration "
                              f"{configuration}, plans {plans}, fold {fold}: {type(exc).__name__}: {exc}") from exc
        if output_folder_suffix:
            _move_output_folder(t, output_folder_suffix)
    return t
