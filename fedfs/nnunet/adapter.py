"""The one place fedfs talks to nnU-Net (nnunetv2).

Everything here uses nnU-Net's own machinery (dataset.json handling, readers and
writers, ``crop_to_nonzero``, the fingerprint extractor's foreground sampling,
experiment planners, preprocessors), so a federated fingerprint and the plans made
from it are what nnU-Net would make on the pooled data. nnunetv2 is imported
lazily inside each function: ``import fedfs.nnunet.adapter`` stays cheap and works
without nnU-Net installed; a missing nnunetv2 or an unset ``nnUNet_raw`` /
``nnUNet_preprocessed`` surfaces as :class:`~fedfs.errors.NnunetError`.

Paths are read from the environment at every call (nnunetv2 2.8 reads them
lazily too; for older versions that froze them at import we refresh the module
attributes), so tests may point them at temporary folders at any time.

Datasets are given like nnU-Net's ``-d``: an id (``7``, ``"7"``) or a name
(``"Dataset007_Liver"``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import FedfsError, NnunetError
from ..fl.fingerprint import DEFAULT_MANTISSA_BITS, DEFAULT_MAX_EXACT_VALUES, SiteSummaryBuilder, summarize_samples

__all__ = [
    "nnunet_version", "dataset_name", "count_cases", "check_dataset", "site_census", "site_summary",
    "local_fingerprint", "install_fingerprint", "planner_class", "planner_plans_identifier", "plan",
    "plan_and_preprocess", "preprocess", "ct_normalize",
]

_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise NnunetError(f"nnunetv2 is not installed ({exc}); install it with `pip install nnunetv2`") from exc


def _paths(*required: str) -> dict[str, str]:
    """The nnU-Net folders from the environment; NnunetError if a required one is unset."""
    _require_nnunet()
    missing = [v for v in required if not os.environ.get(v)]
    if missing:
        raise NnunetError(f"environment variable(s) {', '.join(missing)} not set: nnU-Net needs them to find "
                          "its raw and preprocessed data (see nnU-Net's documentation/setting_up_paths.md)")
    found = {v: os.environ[v] for v in _PATH_VARS if os.environ.get(v)}
    for mod in list(sys.modules.values()):  # old nnunetv2 versions bound the paths as str at import
        if getattr(mod, "__name__", "").startswith("nnunetv2"):
            for var, value in found.items():
                if isinstance(getattr(mod, var, None), str):
                    setattr(mod, var, value)
    return found


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn nnU-Net's RuntimeError/AssertionError/... into NnunetError saying what failed."""
    try:
        yield
    except FedfsError:
        raise
    except Exception as exc:  # nnU-Net signals errors with many builtin types
        raise NnunetError(f"nnU-Net could not {what}: {type(exc).__name__}: {exc}") from exc


def nnunet_version() -> str:
    """The installed nnunetv2 version (sites publish it so mismatches can be named)."""
    _require_nnunet()
    from importlib.metadata import version
    return version("nnunetv2")


def dataset_name(dataset: int | str) -> str:
    """``DatasetXXX_Name`` for an id or name, as nnU-Net's ``-d`` resolves it."""
    _paths("nnUNet_raw")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    with _step(f"find dataset {dataset!r}"):
        return maybe_convert_to_dataset_name(dataset)


def _raw_dataset(dataset: int | str) -> tuple[str, str, dict, dict]:
    """(name, raw folder, dataset.json, {case: {'images': [...], 'label': ...}})."""
    paths = _paths("nnUNet_raw")
    name = dataset_name(dataset)
    folder = os.path.join(paths["nnUNet_raw"], name)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    with _step(f"read the training cases of {name}"):
        dataset_json = load_json(os.path.join(folder, "dataset.json"))
        cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    if not cases:
        raise NnunetError(f"dataset {name} has no training cases in {folder}")
    return name, folder, dataset_json, cases


def _n_channels(dataset_json: Mapping[str, Any]) -> int:
    return len(dataset_json["channel_names"] if "channel_names" in dataset_json else dataset_json["modality"])


def count_cases(dataset: int | str) -> int:
    """Number of training cases nnU-Net sees in the site's raw dataset."""
    return len(_raw_dataset(dataset)[3])


def check_dataset(name: str, dataset_json: Mapping[str, Any], cases: Mapping[str, Mapping[str, Any]]) -> None:
    """Every training case has its label file and one image per channel; NnunetError naming the first
    missing file otherwise. Cheap (file names only; nnU-Net's verify_dataset_integrity reads every image)."""
    n = _n_channels(dataset_json)
    for case, files in sorted(cases.items()):
        images = list(files["images"])
        if len(images) != n:
            raise NnunetError(f"dataset {name}: case {case!r} has {len(images)} image file(s), dataset.json names {n} "
                              f"channel(s) ({', '.join(os.path.basename(i) for i in images) or 'none'}); add the "
                              f"missing channel files (CASE_0000{dataset_json.get('file_ending', '')}, ...) or remove "
                              "the case, then publish the census again")
        for path in images + [files["label"]]:
            if not os.path.isfile(path):
                raise NnunetError(f"dataset {name}: {path} is missing (case {case!r}); add it or remove the case's "
                                  "images, before the census is published")


def _verify_integrity(name: str, folder: str, num_processes: int) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` (reads every image: slow on big datasets)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as verify
    with _step(f"verify the integrity of {name}"):
        verify(folder, num_processes)


def site_census(dataset: int | str, verify_integrity: bool = False, num_processes: int | None = None) -> dict:
    """Phase-1 payload: ``{"num_cases", "num_channels", "labels", "channel_names"}``, after
    :func:`check_dataset` (and nnU-Net's full ``verify_dataset_integrity`` when asked)."""
    name, folder, dataset_json, cases = _raw_dataset(dataset)
    check_dataset(name, dataset_json, cases)
    if verify_integrity:
        _verify_integrity(name, folder, _default_processes(num_processes))
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return {"num_cases": len(cases), "num_channels": _n_channels(dataset_json),
            "labels": dict(dataset_json.get("labels", {})), "channel_names": {str(k): v for k, v in channels.items()}}


def _summarize_case(image_files: list[str], seg_file: str, reader_writer_class: type,
                    num_samples: int) -> tuple:
    """Worker: nnU-Net's ``analyze_case`` (read, crop, sample), reduced to value tables."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    shape, spacing, samples, _, rel = DatasetFingerprintExtractor.analyze_case(
        image_files, seg_file, reader_writer_class, num_samples)
    arrays = [np.asarray(s) for s in samples]
    dtype = str(np.result_type(*[a.dtype for a in arrays]))  # [] is float64, as in np.concatenate
    return list(spacing), list(shape), float(rel), [summarize_samples(a) for a in arrays], dtype


def site_summary(dataset: int | str, total_cases: int, num_processes: int | None = None,
                 max_exact_values: int = DEFAULT_MAX_EXACT_VALUES,
                 mantissa_bits: int = DEFAULT_MANTISSA_BITS) -> dict:
    """Phase-2 payload: the site's summary, sampled as if nnU-Net saw ``total_cases`` cases.

    Mirrors ``DatasetFingerprintExtractor.run``: same reader/writer choice, same
    ``analyze_case`` per case, but ``int(num_foreground_voxels // total_cases)``
    samples per case so the samples are those of the pooled extraction.
    """
    _paths("nnUNet_raw")
    name = dataset_name(dataset)
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    with _step(f"prepare fingerprint extraction of {name}"):
        fpe = DatasetFingerprintExtractor(name, num_processes or 1, verbose=False)
        if not fpe.dataset:
            raise NnunetError(f"dataset {name} has no training cases")
        rw_class = determine_reader_writer_from_dataset_json(
            fpe.dataset_json, fpe.dataset[next(iter(fpe.dataset.keys()))]["images"][0])
    if isinstance(total_cases, bool) or not isinstance(total_cases, int) or total_cases < len(fpe.dataset):
        raise NnunetError(f"{name}: federation total_cases must be an integer of at least this site's "
                          f"{len(fpe.dataset)} cases, got {total_cases!r}")
    num_samples = int(fpe.num_foreground_voxels_for_intensitystats // total_cases)
    jobs = [(fpe.dataset[k]["images"], fpe.dataset[k]["label"], rw_class, num_samples) for k in fpe.dataset]
    n_proc = _default_processes(num_processes)
    with _step(f"extract the fingerprint summary of {name}"):
        if n_proc <= 1 or len(jobs) == 1:
            results = [_summarize_case(*j) for j in jobs]
        else:
            with multiprocessing.get_context("spawn").Pool(min(n_proc, len(jobs))) as pool:
                results = pool.starmap(_summarize_case, jobs)
    builder = SiteSummaryBuilder(_n_channels(fpe.dataset_json), total_cases, num_samples,
                                 max_exact_values=max_exact_values, mantissa_bits=mantissa_bits)
    for spacing, shape, rel, tables, dtype in results:
        builder.add_case(spacing, shape, rel, tables, dtype)
    return builder.summary()


def _default_processes(num_processes: int | None) -> int:
    if num_processes is not None:
        return max(1, int(num_processes))
    from nnunetv2.configuration import default_num_processes
    return int(default_num_processes)


def local_fingerprint(dataset: int | str, num_processes: int | None = None) -> dict:
    """nnU-Net's own fingerprint of the local data (AsymFedAvg; also the centralized baseline).

    Written to ``nnUNet_preprocessed/<dataset>/dataset_fingerprint.json`` as nnU-Net does,
    and returned as read back from that file.
    """
    paths = _paths("nnUNet_raw", "nnUNet_preprocessed")
    name = dataset_name(dataset)
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    with _step(f"extract the fingerprint of {name}"):
        fpe = DatasetFingerprintExtractor(name, _default_processes(num_processes), verbose=False)
        fpe.show_progress_bar = False
        fpe.run(overwrite_existing=True)
    with open(os.path.join(paths["nnUNet_preprocessed"], name, "dataset_fingerprint.json")) as f:
        return json.load(f)


def install_fingerprint(dataset: int | str, fingerprint: Mapping[str, Any]) -> str:
    """Write ``fingerprint`` as the dataset's ``dataset_fingerprint.json``; return its path.

    Also copies the raw ``dataset.json`` next to it, as nnU-Net's planning does. The
    write is atomic (temporary file, then rename) so a crash never leaves half a file.
    """
    paths = _paths("nnUNet_raw", "nnUNet_preprocessed")
    name = dataset_name(dataset)
    missing = [k for k in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                           "median_relative_size_after_cropping") if k not in fingerprint]
    if missing:
        raise NnunetError(f"fingerprint for {name} lacks {', '.join(missing)}")
    folder = os.path.join(paths["nnUNet_preprocessed"], name)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "dataset_fingerprint.json")
    fd, tmp = tempfile.mkstemp(prefix=".dataset_fingerprint.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(fingerprint, f, sort_keys=True, indent=4, allow_nan=False)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    shutil.copy(os.path.join(paths["nnUNet_raw"], name, "dataset.json"), os.path.join(folder, "dataset.json"))
    return target


def planner_class(planner: str) -> type:
    """nnU-Net's experiment planner class called ``planner``, found as ``nnUNetv2_plan_experiment -pl`` finds it."""
    _require_nnunet()
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    with _step(f"look up the experiment planner {planner!r}"):
        cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                          planner, current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise NnunetError(f"nnU-Net has no experiment planner called {planner!r}")
    return cls


def planner_plans_identifier(planner: str) -> str:
    """The plans identifier ``planner`` writes when not told otherwise: the default of its ``plans_name``
    (``-pl nnUNetPlannerResEncM`` writes ``nnUNetResEncUNetMPlans``), as ``nnUNetv2_plan_experiment``
    derives it when ``-overwrite_plans_name`` is not given."""
    import inspect

    default = inspect.signature(planner_class(planner).__init__).parameters.get("plans_name")
    if default is None or not isinstance(default.default, str):
        raise NnunetError(f"experiment planner {planner!r} has no default plans_name; give the plans identifier")
    return default.default


def plan(dataset: int | str, planner: str = "ExperimentPlanner", gpu_memory_target: float | None = None,
         overwrite_plans_name: str | None = None, preprocessor: str = "DefaultPreprocessor") -> dict:
    """Run nnU-Net's experiment planner on the installed fingerprint; return the plans file.

    nnU-Net sizes the batch from ``dataset.json['numTraining']``; a site's file counts
    only its own cases, so the planner is told the fingerprint's case count instead
    (the federation total; identical to numTraining for a local fingerprint).
    """
    paths = _paths("nnUNet_raw", "nnUNet_preprocessed")
    name = dataset_name(dataset)
    cls = planner_class(planner)
    kwargs: dict[str, Any] = {}
    if overwrite_plans_name is not None:
        kwargs["plans_name"] = overwrite_plans_name
    if gpu_memory_target is not None:
        kwargs["gpu_memory_target_in_gb"] = gpu_memory_target
    # nnU-Net's planner calls torch.set_num_threads(get_allowed_n_proc_DA()), which fails for
    # nnUNet_n_proc_DA=0 (single-process augmentation, the fastest choice for training on small CPUs)
    saved_da = os.environ.get("nnUNet_n_proc_DA")
    if saved_da == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        return _plan(cls, name, preprocessor, kwargs, planner, paths)
    finally:
        if saved_da is not None:
            os.environ["nnUNet_n_proc_DA"] = saved_da


def _plan(planner_class: type, name: str, preprocessor: str, kwargs: dict, planner: str,
          paths: Mapping[str, str]) -> dict:
    with _step(f"plan {name} with {planner}"):
        p = planner_class(name, preprocessor_name=preprocessor, overwrite_target_spacing=None,
                          suppress_transpose=False, **kwargs)
        p.dataset_json = {**p.dataset_json, "numTraining": len(p.dataset_fingerprint["spacings"])}
        p.plan_experiment()
        plans_file = os.path.join(paths["nnUNet_preprocessed"], name, p.plans_identifier + ".json")
    with open(plans_file) as f:
        return json.load(f)


def plan_and_preprocess(dataset: int | str, configurations: Sequence[str] = ("2d", "3d_fullres", "3d_lowres"),
                        planner: str = "ExperimentPlanner", gpu_memory_target: float | None = None,
                        overwrite_plans_name: str | None = None, num_processes: int | None = None,
                        verify_dataset_integrity: bool = False) -> dict:
    """``nnUNetv2_plan_and_preprocess`` minus the fingerprint step (``-pl``, ``-gpu_memory_target``,
    ``-overwrite_plans_name``, ``-c``, ``-np``, ``--verify_dataset_integrity``).

    The fingerprint must already be installed (:func:`install_fingerprint` or
    :func:`local_fingerprint`). Configurations the plans lack are skipped, as nnU-Net does.
    """
    paths = _paths("nnUNet_raw", "nnUNet_preprocessed")
    name = dataset_name(dataset)
    n_proc = _default_processes(num_processes)
    if verify_dataset_integrity:
        _verify_integrity(name, os.path.join(paths["nnUNet_raw"], name), n_proc)
    plans = plan(dataset, planner, gpu_memory_target, overwrite_plans_name)
    if configurations:
        preprocess(dataset, plans["plans_name"], configurations, n_proc)
    return plans


def preprocess(dataset: int | str, plans_name: str, configurations: Sequence[str], num_processes: int | None = None) -> None:
    """``nnUNetv2_preprocess -plans_name P -c ...``: nnU-Net's preprocessing with plans already written."""
    name = dataset_name(dataset)
    n_proc = _default_processes(num_processes)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    with _step(f"preprocess {name} ({', '.join(configurations)})"):
        preprocess_dataset(convert_dataset_name_to_id(name), plans_name, list(configurations),
                           [n_proc] * len(configurations), verbose=False, show_progress_bar=False)


def ct_normalize(values: np.ndarray, intensity_properties: Mapping[str, float]) -> np.ndarray:
    """nnU-Net's CTNormalization of ``values`` with one channel's intensity properties."""
    _require_nnunet()
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=dict(intensity_properties))
    return norm.run(np.array(values, dtype=np.float32, copy=True))
