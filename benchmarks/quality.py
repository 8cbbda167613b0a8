"""Does federated nnU-Net over a bucket segment as well as centralized nnU-Net? The multi-site table.

A synthetic multi-site 2D segmentation task (one foreground label, ``lesion``), built to be
hard in the ways real multi-site data is (the styles are in ``_styles``):

* four training sites whose scanners differ in intensity scale and offset (0.05 to 2000
  raw units per contrast unit), lesion contrast and noise (contrast-to-noise 2.0 to 4.0),
  pixel spacing (0.75 to 1.5 mm, one anisotropic) and matrix size (40 x 48 to 56 x 56),
  lesion size (2.5 to 15 mm radius) and shape (ellipses, lobulated blobs, up to three
  lesions), artefacts (bias field, stripes, motion ghosts: an unlabelled copy of the lesion
  half a field of view away) and case counts (24, 16, 12 and a small site with 6);
* held-out test cases at every training site, plus one external site that trains nowhere
  (its own scanner, spacing, shapes and artefacts) and is only tested.

Arms, all nnU-Net 2.8 ``2d`` with ``nnUNetTrainer`` and the same budget: every nnU-Net
training run, wherever it runs, does ``rounds x local_epochs`` epochs of ``iterations``
training iterations (nnU-Net's poly learning rate set up for exactly that many epochs),
fold 0 of nnU-Net's own 5-fold split:

* ``local``: nnU-Net at each training site on that site's data only (its own plans);
* ``centralized``: nnU-Net on the pooled training data (``make_pooled``), planned on the
  pooled fingerprint (nnU-Net's plan-and-preprocess via :mod:`fedfs.nnunet.adapter`);
* ``ffe_sync``: fedfs FFE, synchronous FedAvg over a folder bucket (``fedfs.ops.simulate``:
  aggregator and sites as separate processes), ``rounds`` rounds of ``local_epochs`` epochs;
* ``asym_sync``: fedfs AsymFedAvg, synchronous, every site on its own plans;
* ``ffe_async``: fedfs FFE with asynchronous FedBuff (buffer K = ``buffer_size``) where
  one site (``slow_site``) runs on a ``slow_factor`` times slower machine: its process
  group gets one time slice in ``slow_factor`` (SIGSTOP/SIGCONT, :class:`SlowMachine`). The
  federation settings are the synchronous arm's (same rounds, same local epochs): the fast
  sites train exactly as many epochs as there, the slow one what it can meanwhile, so the
  final global folds fewer site-epochs. K counts updates trained from the current global
  (fedfs's default ``buffer_trigger="fresh"``); the slow site's stale ones ride along,
  weighted ``1 / (1 + staleness)`` (fedfs's ``polynomial``, a = 1). A site's nnU-Net learning
  rate follows the federation's progress (fedfs does this by default,
  :meth:`fedfs.nnunet.training.NnunetSession.train_epochs`). Measured on the way (one run
  each unless said, benchmarks/notes.md): with classic FedBuff (``--buffer-trigger any``: the
  K-th update of any age) the fast sites fall out of step and nearly every update arrives one
  version stale; async - sync mean Dice was then -0.07 before the learning-rate fix and -0.012
  to -0.084 (mean -0.047, five runs) after it, and -0.02 to -0.03 even with 32 versions (as many
  site-epochs folded as the synchronous arm) whatever the staleness weight.

A federation as a whole therefore computes ``n_sites`` times the gradient steps of the
centralized run: that is nnU-Net's convention (a fixed epochs x iterations budget per
training run, whatever the dataset size) and the paper's setup; ``--central-scale 4``
gives the centralized run the federation's total instead.

Evaluation is nnU-Net's own: every model is exported as an nnU-Net model folder
(``fedfs.ops.export.export_site_model`` for federated models, ``export_model_folder`` for
local and centralized ones) and the test images are segmented with the real
``nnUNetv2_predict_from_modelfolder`` (the quick budget passes ``--disable_tta``: test-time
mirroring, nnU-Net's default and ``--full``'s, is five times slower on CPU; ``--tta`` turns it
on). Dice per case is nnU-Net's ``compute_metrics`` (:func:`fedfs.nnunet.inference.dice_per_case`);
HD95 is :func:`hd95` (MedPy's definition: the 95th percentile of the symmetric surface
distances in mm, spacing honoured; a case with an empty prediction gets the image diagonal).
Rows are per (method, test site): mean over that site's test cases. ``local`` on a training
site is that site's own model on its own test cases (the paper's convention); ``local`` and
``asym_sync`` on the external site are the mean over the site models. ``means`` average
the five test sites equally (``means_internal``: the four training sites only).

Targets (quick budget): FFE mean Dice >= centralized - 0.01; FFE and AsymFedAvg mean Dice
above local's; async FedBuff within 0.02 of sync FFE.

Quick budget (the default): 24 rounds x 1 epoch x 40 iterations = 960 training iterations
per nnU-Net run (batch 2, from nnU-Net's plans), 2 validation iterations per epoch. Tried on
the way, every arm always on the same budget: at 240 iterations per run (64 x 64 images) FFE
trailed centralized by 0.054 with 6 rounds x 4 epochs and by 0.018-0.022 with 24 x 1; at 480
it was 0.01 ahead. Matrices of 40-56 pixels instead of 64 halve the cost of an iteration,
which pays for the 960. The local sites train in parallel processes with cores / sites
torch threads each, as the federated sites do.

Privacy arms (issue 17, not in the default run; ``--arms ffe_sync,ffe_sync_repeat,ffe_secure,ffe_dp8,ffe_dp64
--integer-images``, stored as ``benchmarks/results/privacy-full/quality_privacy.json``):

* ``ffe_secure``: FFE with secure aggregation: the census and the fingerprint merge (secure FFE)
  and every round's sum under SecAgg+ masks; target: mean Dice within 0.005 of ``ffe_sync``.
* ``ffe_dp<epsilon>``: FFE with DP-FedAvg at that epsilon over the whole federation (delta 1e-5,
  noise multiplier from fedfs's accountant for the rounds, uniform site weights as DP-FedAvg
  requires), clip = the median norm of ``ffe_sync``'s first-round updates (a tuning choice
  made outside the guarantee; ``--dp-clip`` sets it).
* ``ffe_sync_repeat``: ``ffe_sync`` once more, the same settings: nnU-Net's training is not
  seeded, so two plain runs differ too, and this is the scale the secure arm's difference is
  read against.

Secure FFE sums integer intensity histograms and refuses other data, so this run stores each
site's images as int16 in its own units (``--integer-images``: raw value x k, k =
max(1, round(1000 / intensity scale)), as scanners store DICOM); every arm of the run sees
the same images.

``python benchmarks/quality.py --json`` prints one JSON object on stdout; everything else
goes to stderr. About 20 minutes on two CPU cores. ``--full``: nnU-Net's default budget
(1000 epochs of 250 iterations: 100 rounds x 10 local epochs, test-time mirroring on) for a
GPU; ``--arms``, ``--rounds``, ``--iterations`` ... for partial runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py: the output shape
from _common import all_met, target  # noqa: E402

ARMS = ("local", "centralized", "ffe_sync", "asym_sync", "ffe_async")
#: Privacy arms (issue 17; not in the default run): FFE with secure aggregation, and FFE with
#: DP-FedAvg at epsilon E (``ffe_dp8``, ``ffe_dp64``: delta DP_DELTA over the whole federation; sites
#: weighted uniformly, as DP-FedAvg requires).
PRIVACY_ARMS = ("ffe_secure", "ffe_dp<epsilon>", "ffe_sync_repeat")  # the last: ffe_sync again, its run-to-run spread
DP_DELTA = 1e-5
_DP_ARM = re.compile(r"ffe_dp(\d+(?:\.\d+)?)$")
CONFIGURATION = "2d"
FOLD = 0


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ HD95 (numpy + scipy only)

def _border(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The mask's surface voxels: the mask minus its erosion (voxels outside the image count as
    background, so an object touching the edge has its surface there too)."""
    from scipy import ndimage

    footprint = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None,
                      connectivity: int = 1) -> np.ndarray:
    """Distance (in the units of ``spacing``) from every surface voxel of ``a`` to the nearest
    surface voxel of ``b``. Both masks must be non-empty."""
    from scipy import ndimage

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = None if spacing is None else [float(s) for s in spacing]
    if sampling is not None and len(sampling) != a.ndim:
        raise ValueError(f"spacing has {len(sampling)} values for a {a.ndim}-D mask")
    to_b = ndimage.distance_transform_edt(~_border(b, connectivity), sampling=sampling)
    return to_b[_border(a, connectivity)]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None, connectivity: int = 1) -> float:
    """95th percentile Hausdorff distance between two binary masks, as MedPy's ``hd95``:
    ``percentile(concat(d(pred -> ref), d(ref -> pred)), 95)`` over surface voxels, with
    ``spacing`` per axis (array order). 0 when both masks are empty, ``inf`` when one is."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return math.inf
    d = np.concatenate([surface_distances(pred, ref, spacing, connectivity),
                        surface_distances(ref, pred, spacing, connectivity)])
    return float(np.percentile(d, 95))


def hd95_per_case(pred_folder: str | os.PathLike, gt_folder: str | os.PathLike, label: int = 1,
                  file_ending: str = ".nii.gz") -> dict[str, float]:
    """HD95 in mm of ``label`` for every reference case in ``gt_folder``, with the reference's spacing.
    An empty prediction of a non-empty reference gets the image's diagonal (the largest possible
    distance), so a model that finds nothing is not rewarded with a missing value."""
    import SimpleITK as sitk

    out: dict[str, float] = {}
    for ref_file in sorted(p for p in Path(gt_folder).iterdir() if p.name.endswith(file_ending)):
        ref_img = sitk.ReadImage(str(ref_file))
        ref = sitk.GetArrayFromImage(ref_img) == label
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(pred_folder) / ref_file.name))) == label
        spacing = tuple(reversed(ref_img.GetSpacing()))  # SimpleITK is (x, y[, z]); arrays are ([z,] y, x)
        value = hd95(pred, ref, spacing)
        if math.isinf(value):
            value = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape, spacing))))
        out[ref_file.name[: -len(file_ending)]] = value
    return out


# ------------------------------------------------------------------ the task

def _styles() -> tuple[dict[str, Any], dict[str, Any]]:
    from fedfs.testing.synthetic import SiteStyle

    train = {
        # large site, clean scanner, medium ellipses; 48 x 48 at 1 mm (FOV 48 mm)
        "SiteA": SiteStyle(intensity_scale=100.0, intensity_offset=50.0, contrast=1.0, noise=0.3, texture=0.2,
                           spacing=(1.0, 1.0), image_size=(48, 48), radius_mm=(5.0, 10.0), shape="ellipse",
                           bias_field=0.1, n_train=24, n_test=16),
        # high-resolution scanner (56 x 56 at 0.75 mm), low contrast, small lobulated lesions (up to 2),
        # strong bias field
        "SiteB": SiteStyle(intensity_scale=2000.0, intensity_offset=-300.0, contrast=0.8, noise=0.4, texture=0.25,
                           spacing=(0.75, 0.75), image_size=(56, 56), radius_mm=(2.5, 5.5), shape="blob",
                           max_lesions=2, bias_field=0.4, n_train=16, n_test=16),
        # anisotropic low-resolution scanner (40 x 48 at 1.5 x 1.1 mm), large ellipses, stripe artefacts
        "SiteC": SiteStyle(intensity_scale=0.05, intensity_offset=1.0, contrast=1.2, noise=0.3, texture=0.2,
                           spacing=(1.5, 1.1), image_size=(40, 48), radius_mm=(8.0, 15.0), shape="ellipse",
                           stripes=0.3, n_train=12, n_test=16),
        # small site (48 x 48 at 1.2 mm): noisy, motion ghosts, up to three blobs
        "SiteD": SiteStyle(intensity_scale=500.0, intensity_offset=0.0, contrast=0.9, noise=0.45, texture=0.2,
                           spacing=(1.2, 1.2), image_size=(48, 48), radius_mm=(4.0, 8.0), shape="blob",
                           max_lesions=3, ghosting=0.35, bias_field=0.2, n_train=6, n_test=16),
    }
    external = {
        # trains nowhere: its own scanner (52 x 44 at 0.9 x 1.15 mm), lesion mix and all the artefacts
        "External": SiteStyle(intensity_scale=300.0, intensity_offset=200.0, contrast=0.85, noise=0.35, texture=0.25,
                              spacing=(0.9, 1.15), image_size=(52, 44), radius_mm=(4.0, 11.0), shape="blob",
                              max_lesions=2, stripes=0.15, bias_field=0.25, ghosting=0.2, n_train=1, n_test=24),
    }
    return train, external


BASE_ID = 700  # pooled 700, training sites 701.., external after them


@dataclass(frozen=True)
class Budget:
    """The training budget every arm gets (per nnU-Net training run)."""

    rounds: int
    local_epochs: int
    iterations: int            # nnU-Net training iterations per epoch (nnUNetTrainer: 250)
    val_iterations: int        # validation iterations per epoch (nnUNetTrainer: 50); no effect on the model
    buffer_size: int           # FedBuff K for the async arm
    slow_factor: float         # the async arm's slow site takes this many times longer for everything
    slow_site: str = "SiteA"   # which site is slow in the async arm
    staleness: str = "polynomial"  # FedBuff's staleness weight s(tau) for the async arm: (tau + 1) ** -a
    staleness_a: float = 1.0
    staleness_b: float = 4.0
    buffer_trigger: str = "fresh"  # what counts toward K: updates from the current global, or "any"
    tta: bool = False          # nnU-Net's test-time mirroring at prediction (its default; 5x slower on CPU)
    central_scale: int = 1     # centralized iterations per epoch = iterations x central_scale

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs


QUICK = Budget(rounds=24, local_epochs=1, iterations=40, val_iterations=2, buffer_size=3, slow_factor=3.0)
FULL = Budget(rounds=100, local_epochs=10, iterations=250, val_iterations=50, buffer_size=3, slow_factor=3.0,
              tta=True)


@dataclass
class Task:
    root: Path
    raw: Path
    sites: dict[str, Any]       # training site name -> SitePaths
    external: Any               # SitePaths
    pooled: Any                 # SitePaths

    @property
    def test_sites(self) -> dict[str, Any]:
        return {**self.sites, self.external.dataset_name.split("_", 1)[1]: self.external}


def make_task(root: Path, seed: int) -> Task:
    from fedfs.testing.synthetic import make_pooled, make_site

    raw, heldout = root / "nnUNet_raw", root / "heldout"
    train, external = _styles()
    sites = {name: make_site(raw, BASE_ID + 1 + i, name, style=style, seed=seed, test_root=heldout)
             for i, (name, style) in enumerate(train.items())}
    (ext_name, ext_style), = external.items()
    ext = make_site(raw, BASE_ID + 1 + len(sites), ext_name, style=ext_style, seed=seed, test_root=heldout)
    shutil.rmtree(ext.dataset_dir)  # the external site trains nowhere: only its held-out cases are kept
    pooled = make_pooled(raw, list(sites.values()), BASE_ID, "Pooled", test_root=heldout)
    return Task(root, raw, sites, ext, pooled)


def integer_images(task: Task) -> dict[str, int]:
    """Store every site's images as int16, as scanners do (DICOM): raw value x k rounded, k per site =
    max(1, round(1000 / intensity_scale)) so that each site keeps about a thousand levels per contrast
    unit (its own units, as before; nnU-Net's z-score normalisation removes k). Secure FFE sums integer
    intensity histograms exactly and refuses other data. Returns k per site. The pooled dataset is
    not converted (the centralized arm is refused with this option)."""
    import SimpleITK as sitk

    factors = {}
    for name, site in task.test_sites.items():
        k = factors[name] = max(1, round(1000.0 / site.style.intensity_scale))
        folders = [site.images_ts] + ([site.images_tr] if site.dataset_dir.exists() else [])
        for path in sorted(f for folder in folders for f in folder.glob("*.nii.gz")):
            im = sitk.ReadImage(str(path))
            arr = np.clip(np.rint(sitk.GetArrayFromImage(im).astype(np.float64) * k), -32768, 32767).astype(np.int16)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(im)
            sitk.WriteImage(out, str(path), True)
    return factors


# ------------------------------------------------------------------ the slow site, nnU-Net's folders per arm

class SlowMachine(threading.Thread):
    """Make one site's process run ``factor`` times slower, like a slower machine: its process group
    is stopped (SIGSTOP) for ``factor - 1`` of every ``factor`` time slices and continued (SIGCONT)
    for one. Everything it does (planning, training, polling, uploads) slows down alike; its
    nnU-Net budget is unchanged. The process is found among this process's own children by the
    key file on its command line."""

    def __init__(self, key_file: Path, factor: float, slice_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.key_file, self.factor, self.slice_s = str(key_file), float(factor), slice_s
        self.stopping = threading.Event()
        self.pgid: int | None = None

    def _find(self) -> int | None:
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me and self.key_file.encode() in argv and b"site" in argv:
                return int(entry.name)
        return None

    def run(self) -> None:
        while self.pgid is None and not self.stopping.wait(0.2):
            pid = self._find()
            if pid is not None:
                with contextlib.suppress(OSError):
                    pgid = os.getpgid(pid)
                    if pgid != os.getpgrp():  # simulate starts every party in its own session
                        self.pgid = pgid
        while self.pgid is not None and not self.stopping.is_set():
            try:
                os.killpg(self.pgid, signal.SIGSTOP)
            except OSError:  # the site has exited
                return
            try:
                self.stopping.wait(self.slice_s * (self.factor - 1))
            finally:
                with contextlib.suppress(OSError):
                    os.killpg(self.pgid, signal.SIGCONT)
            self.stopping.wait(self.slice_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        if self.pgid is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.pgid, signal.SIGCONT)


def arm_env(task: Task, arm: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """nnU-Net's folders for one arm (raw data shared, preprocessed and results its own)."""
    from fedfs.nnunet.build import trainer_search_path

    base = task.root / "arms" / arm
    env = {"nnUNet_raw": str(task.raw), "nnUNet_preprocessed": str(base / "nnUNet_preprocessed"),
           "nnUNet_results": str(base / "nnUNet_results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "nnUNet_extTrainer": trainer_search_path()}
    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    from fedfs.nnunet.build import nnunet_env

    with nnunet_env(env):
        yield


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------ arms

def plan_locally(dataset_id: int) -> None:
    """nnUNetv2_plan_and_preprocess -d ID -c 2d on the dataset's own fingerprint (caller sets the env)."""
    from fedfs.nnunet import adapter as nn

    nn.local_fingerprint(dataset_id, num_processes=1)
    nn.plan_and_preprocess(dataset_id, [CONFIGURATION], num_processes=1)


def train_centrally(dataset_id: int, budget: Budget, env: Mapping[str, str], out_dir: Path,
                    iterations: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """One plain nnU-Net training run (no federation), exported as a model folder."""
    from fedfs.nnunet.inference import export_model_folder
    from fedfs.nnunet.training import NnunetSession

    t0 = time.monotonic()
    session = NnunetSession.create(dataset_id, CONFIGURATION, FOLD, "nnUNetTrainer", device=_device(),
                                   total_epochs=budget.epochs, iterations_per_epoch=iterations or budget.iterations,
                                   val_iterations=budget.val_iterations, env=env,
                                   num_threads=None if _device() == "cuda" else (threads or os.cpu_count() or 1))
    try:
        for _ in range(budget.rounds):  # rounds x local_epochs: the same epochs, logged like a federation
            m = session.train_epochs(budget.local_epochs)
            log(f"    dataset {dataset_id}: epoch {m['epoch']}/{m['num_epochs']} train_loss {m['train_loss']:.3f} "
                f"pseudo_dice {m['pseudo_dice'] or float('nan'):.3f}")
        session.finish(validate=False)
        export_model_folder(session, session.weights(), out_dir, FOLD, current_epoch=session.epoch)
        n_train, _ = session.split_sizes()
    finally:
        session.close()
    return {"train_s": round(time.monotonic() - t0, 1), "num_train_cases": n_train}


def _local_site(dataset_id: int, budget: Budget, env: Mapping[str, str], out_dir: Path, threads: int) -> dict[str, Any]:
    """One site's local nnU-Net, start to end (in its own process, like a federated site)."""
    os.environ.update(env)
    plan_locally(dataset_id)
    return train_centrally(dataset_id, budget, env, out_dir, threads=threads)


def run_local(task: Task, budget: Budget, work: Path) -> dict[str, Any]:
    """Every site trains at once, each in its own process with cores / sites torch threads: the CPU
    share a site gets in ``fedfs simulate``."""
    env = arm_env(task, "local")
    threads = max(1, (os.cpu_count() or 1) // len(task.sites))
    models = {name: work / "models" / "local" / name for name in task.sites}
    with ProcessPoolExecutor(len(task.sites), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_local_site, site.dataset_id, budget, env, models[name], threads)
                   for name, site in task.sites.items()}
        log(f"  local: {', '.join(f'{n} ({s.n_train} cases)' for n, s in task.sites.items())} plan and train, "
            f"each in its own process")
        info = {name: f.result() for name, f in futures.items()}
    return {"models": models, "per_site": info}


def run_centralized(task: Task, budget: Budget, work: Path) -> dict[str, Any]:
    env = arm_env(task, "centralized")
    out = work / "models" / "centralized" / "pooled"
    with environ(env):
        log(f"  centralized: plan on the pooled fingerprint and train ({task.pooled.n_train} cases)")
        plan_locally(task.pooled.dataset_id)
        info = train_centrally(task.pooled.dataset_id, budget, env, out, budget.iterations * budget.central_scale)
    return {"models": {"*": out}, **info}


def privacy_config(arm: str, budget: Budget, clip: float | None) -> dict[str, Any]:
    """The federation settings of a privacy arm: secure aggregation, or DP-FedAvg at the arm's epsilon
    (the noise multiplier for ``budget.rounds`` rounds from fedfs's accountant, clip ``clip``)."""
    if arm == "ffe_secure":
        return {"secure_aggregation": True}
    m = _DP_ARM.match(arm)
    if not m:
        return {}
    from fedfs.privacy.dp import noise_multiplier_for

    if not clip:
        raise RuntimeError(f"{arm}: no clip norm: run ffe_sync first in the same invocation (its median first-round "
                           "update norm is the clip) or give --dp-clip")
    eps = float(m.group(1))
    return {"dp_epsilon": eps, "dp_delta": DP_DELTA, "dp_clip": clip, "weighting": "uniform",
            "dp_noise_multiplier": noise_multiplier_for(eps, DP_DELTA, budget.rounds)}


def first_update_norms(fed_dir: Path, sites: Sequence[str]) -> dict[str, float]:
    """Per site, the L2 norm of its round-0 update minus v0 (float tensors): what DP's clip is tuned on."""
    from safetensors.numpy import load_file

    from fedfs.federation import Federation
    from fedfs.protocol import layout
    from fedfs.protocol.schema import GlobalManifest

    fed = Federation.open(str(fed_dir / "bucket"))
    v0 = fed_dir / "v0.safetensors"
    fed.bucket.get_blob_file(fed.bucket.read(layout.global_version(0), GlobalManifest).doc.blob, str(v0))
    base = load_file(str(v0))
    out = {}
    for name in sites:
        upd = load_file(str(fed_dir / "work" / name / "updates" / "r000000.safetensors"))
        sq = sum(float(np.sum((upd[k].astype(np.float64) - base[k].astype(np.float64)) ** 2))
                 for k in base if base[k].dtype.kind == "f" and k in upd)
        out[name] = round(math.sqrt(sq), 6)
    return out


def run_federated(task: Task, budget: Budget, work: Path, arm: str, keep: bool = False,
                  clip: float | None = None) -> dict[str, Any]:
    from fedfs.ops.export import export_site_model
    from fedfs.federation import Federation
    from fedfs.ops.simulate import SimulationSpec, simulate

    mode = "asym" if arm.startswith("asym") else "ffe"
    aggregation = "async" if arm.endswith("async") else "sync"
    env = arm_env(task, arm)
    device = _device()
    site_args = {name: ["-device", device] for name in task.sites}
    spec = SimulationSpec(datasets={n: str(s.dataset_id) for n, s in task.sites.items()}, mode=mode,
                          rounds=budget.rounds, local_epochs=budget.local_epochs, aggregation=aggregation,
                          buffer_size=budget.buffer_size if aggregation == "async" else 0,
                          max_staleness=budget.rounds, trainer="nnUNetTrainer",
                          iterations_per_epoch=budget.iterations, val_iterations=budget.val_iterations,
                          final_validation=False, site_args=site_args, poll_interval=1.0,
                          config=privacy_config(arm, budget, clip))
    fed_dir = work / "federations" / arm
    if fed_dir.exists():
        shutil.rmtree(fed_dir)
    if aggregation == "async":
        spec = replace(spec, staleness=budget.staleness, staleness_a=budget.staleness_a,
                       staleness_b=budget.staleness_b, buffer_trigger=budget.buffer_trigger)
    slow = (SlowMachine(fed_dir / "keys" / f"{budget.slow_site}.key", budget.slow_factor)
            if aggregation == "async" else None)
    if slow is not None:
        slow.start()
    try:
        result = simulate(spec, workdir=fed_dir, env=env, echo=lambda m: log(f"  {arm}: {m}"), timeout_s=6 * 3600)
    finally:
        if slow is not None:
            slow.stop()
    models = {}
    with environ(env):
        # FFE: one global model (every site holds the same plans); AsymFedAvg: each site's own
        exporters = list(task.sites) if mode == "asym" else [n for n in task.sites if n != budget.slow_site][:1]
        for name in exporters:
            fed = Federation.open(result["bucket"], identity=Path(result["keys"]) / f"{name}.key")
            contributions = _contributions(fed, result["final_version"])
            out = work / "models" / arm / name
            export_site_model(fed, name, str(task.sites[name].dataset_id), out, configuration=CONFIGURATION,
                              fold=FOLD, trainer="nnUNetTrainer")
            models[name if mode == "asym" else "*"] = out
    norms = first_update_norms(fed_dir, list(task.sites)) if arm == "ffe_sync" else None
    privacy = _privacy_report(fed_dir, result["final_version"], spec.config) if spec.config else None
    if not keep:  # every round's globals and updates, in the bucket and at every site: GBs at 24 rounds
        for sub in ("bucket", "work"):
            shutil.rmtree(fed_dir / sub, ignore_errors=True)
    return {"models": models, "final_version": result["final_version"], "federation_wall_s": result["wall_s"],
            "updates_folded_per_site": {s: len(v) for s, v in contributions.items()},
            "staleness_per_site": contributions,
            **({"first_update_norms": norms} if norms else {}),
            **({"privacy": privacy} if privacy else {})}


def _privacy_report(fed_dir: Path, final_version: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """The arm's privacy settings and what the final global's report says (DP: the epsilon spent)."""
    from fedfs.federation import Federation
    from fedfs.protocol import layout
    from fedfs.protocol.schema import GlobalManifest

    fed = Federation.open(str(fed_dir / "bucket"))
    report = fed.bucket.read(layout.global_version(final_version), GlobalManifest).doc.report
    return {"config": dict(config), **({"dp": report["dp"]} if isinstance(report.get("dp"), dict) else {}),
            **({"secure": report["secure"]} if isinstance(report.get("secure"), dict) else {})}


def _contributions(fed: Any, final_version: int) -> dict[str, list[int]]:
    """Per site, the staleness of each of its updates folded into v1 .. v<final> (from the manifests)."""
    from fedfs import layout
    from fedfs.protocol.schema import GlobalManifest

    out: dict[str, list[int]] = {}
    for v in range(1, final_version + 1):
        for c in fed.bucket.read(layout.global_version(v), GlobalManifest).doc.contributions:
            out.setdefault(c.site, []).append(int(c.staleness))
    return dict(sorted(out.items()))


# ------------------------------------------------------------------ evaluation

def _test_inputs(task: Task, work: Path) -> dict[str, Path]:
    """Input folders: every test site's images together ('*'), and each site's plus the external's."""
    ext = task.external
    folders = {"*": list(task.test_sites.values())}
    folders.update({n: [s, ext] for n, s in task.sites.items()})
    out = {}
    for key, sites in folders.items():
        folder = work / "test_inputs" / ("all" if key == "*" else key)
        folder.mkdir(parents=True, exist_ok=True)
        for s in sites:
            for f in Path(s.images_ts).iterdir():
                if not (folder / f.name).exists():
                    shutil.copy2(f, folder / f.name)
        out[key] = folder
    return out


def evaluate(task: Task, models: Mapping[str, Path], inputs: Mapping[str, Path], work: Path,
             arm: str, tta: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{model key: {test site: {dice, hd95, n}}} with nnUNetv2_predict_from_modelfolder + nnU-Net's Dice."""
    from fedfs.nnunet.inference import dice_per_case, predict_folder

    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, model in models.items():
        pred = work / "predictions" / arm / ("all" if key == "*" else key)
        if pred.exists():
            shutil.rmtree(pred)
        predict_folder(model, inputs[key], pred, FOLD, device=_device(), num_processes=1, disable_tta=not tta)
        test_sites = task.test_sites if key == "*" else {key: task.sites[key], "External": task.external}
        out[key] = {}
        for name, site in test_sites.items():
            dice = dice_per_case(pred, site.labels_ts)
            hd = hd95_per_case(pred, site.labels_ts)
            out[key][name] = {"dice": float(np.nanmean(list(dice.values()))),
                              "hd95": float(np.mean(list(hd.values()))), "n": len(dice)}
    return out


def rows_for(arm: str, per_model: Mapping[str, Mapping[str, Mapping[str, float]]],
             test_sites: Sequence[str]) -> list[dict[str, Any]]:
    """The table's rows for one arm: a shared model on every test site, or each site model on its own
    site and the mean of the site models on the external one."""
    rows = []
    for site in test_sites:
        if "*" in per_model:
            m = per_model["*"][site]
            rows.append({"method": arm, "site": site, "dice": m["dice"], "hd95": m["hd95"], "n_cases": m["n"]})
        elif site in per_model:
            m = per_model[site][site]
            rows.append({"method": arm, "site": site, "dice": m["dice"], "hd95": m["hd95"], "n_cases": m["n"]})
        else:  # the external site: every site model, averaged
            vals = [per_model[k][site] for k in sorted(per_model)]
            rows.append({"method": arm, "site": site, "dice": float(np.mean([v["dice"] for v in vals])),
                         "hd95": float(np.mean([v["hd95"] for v in vals])), "n_cases": vals[0]["n"],
                         "per_model": {k: {"dice": round(per_model[k][site]["dice"], 4),
                                           "hd95": round(per_model[k][site]["hd95"], 2)} for k in sorted(per_model)}})
    for r in rows:
        r["dice"], r["hd95"] = round(r["dice"], 4), round(r["hd95"], 2)
    return rows


def means(rows: Sequence[Mapping[str, Any]], sites: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method and (sites is None or r["site"] in sites)]
        out[method] = {"dice": round(float(np.mean([r["dice"] for r in sel])), 4),
                       "hd95": round(float(np.mean([r["hd95"] for r in sel])), 2)}
    return out


def check_targets(m: Mapping[str, Mapping[str, float]], arms: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Differences of mean Dice between arms; one whose arm did not run (or failed) is not measured, not met."""
    def diff(a: str, b: str, rule: str, holds: Any) -> dict[str, Any] | None:
        if arms and not {a, b} <= set(arms):  # a run of other arms (the privacy arms) leaves this one out
            return None
        if a not in m or b not in m:
            return target(rule, None, False)
        d = m[a]["dice"] - m[b]["dice"]
        return target(rule, round(d, 4), holds(d))

    found = {
        "ffe_vs_centralized": diff("ffe_sync", "centralized", "ffe - centralized >= -0.01", lambda d: d >= -0.01),
        "ffe_vs_local": diff("ffe_sync", "local", "ffe - local > 0", lambda d: d > 0),
        "asym_vs_local": diff("asym_sync", "local", "asym - local > 0", lambda d: d > 0),
        "async_vs_sync": diff("ffe_async", "ffe_sync", "|ffe_async - ffe_sync| <= 0.02", lambda d: abs(d) <= 0.02),
        "secure_vs_ffe": diff("ffe_secure", "ffe_sync", "|ffe_secure - ffe_sync| <= 0.005", lambda d: abs(d) <= 0.005),
    }
    return {k: v for k, v in found.items() if v is not None}


# ------------------------------------------------------------------ machine and output

def machine() -> dict[str, Any]:
    """:func:`run_all.machine` (this folder's runner); called at the end, so its load average is the run's last."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from run_all import machine as describe

    return describe()


def format_table(result: Mapping[str, Any]) -> str:
    sites = list(dict.fromkeys(r["site"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    cell = {(r["method"], r["site"]): r for r in result["rows"]}
    head = "| method | " + " | ".join(sites) + " | mean |"
    lines = [head, "|" + "---|" * (len(sites) + 2)]
    for m in methods:
        vals = [f"{cell[m, s]['dice']:.3f} / {cell[m, s]['hd95']:.1f}" if (m, s) in cell else "" for s in sites]
        mm = result["means"][m]
        lines.append(f"| {m} | " + " | ".join(vals) + f" | **{mm['dice']:.3f}** / {mm['hd95']:.1f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Send everything written to fd 1 (nnU-Net's prints, child processes) to stderr; yield the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _median(norms: Mapping[str, float] | None) -> float | None:
    return float(np.median(list(norms.values()))) if norms else None


def run(budget: Budget, arms: Sequence[str], root: Path, seed: int, keep: bool = False,
        clip_norm: float | None = None, integer: bool = False) -> dict[str, Any]:
    t_start = time.monotonic()
    log(f"writing the synthetic sites in {root} ...")
    task = make_task(root, seed)
    factors = integer_images(task) if integer else None
    if factors:
        log(f"images stored as int16, raw value x {factors}")
    inputs = _test_inputs(task, root)
    runners = {"local": run_local, "centralized": run_centralized}
    test_sites = list(task.test_sites)
    rows: list[dict[str, Any]] = []
    wall: dict[str, float] = {}
    eval_s: dict[str, float] = {}
    extra: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for arm in arms:
        log(f"arm {arm} ...")
        t0 = time.monotonic()
        try:
            clip = clip_norm or _median((extra.get("ffe_sync") or {}).get("first_update_norms"))
            info = (runners[arm](task, budget, root) if arm in runners
                    else run_federated(task, budget, root, arm, keep, clip))
            wall[arm] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            per_model = evaluate(task, info["models"], inputs, root, arm, budget.tta)
            eval_s[arm] = round(time.monotonic() - t0, 1)
        except Exception as exc:  # noqa: BLE001 - one failed arm must not lose the others' results
            text = f"{type(exc).__name__}: {exc}"
            errors[arm] = text if len(text) <= 3000 else text[:1000] + " [...] " + text[-2000:]
            log(f"arm {arm} FAILED: {errors[arm]}")
            continue
        arm_rows = rows_for(arm, per_model, test_sites)
        rows += arm_rows
        extra[arm] = {k: v for k, v in info.items() if k != "models"}
        log(f"arm {arm}: training {wall[arm]:.0f} s, evaluation {eval_s[arm]:.0f} s, mean Dice "
            f"{np.mean([r['dice'] for r in arm_rows]):.3f}")
    all_means = means(rows)
    targets = check_targets(all_means, arms)
    return {
        "benchmark": "quality",
        "budget": {**asdict(budget), "epochs_per_training_run": budget.epochs, "configuration": CONFIGURATION,
                   "fold": FOLD, "trainer": "nnUNetTrainer",
                   "centralized_iterations_per_epoch": budget.iterations * budget.central_scale,
                   "device": _device()},
        "sites": {name: {"n_train": s.n_train, "n_test": s.n_test, "trains": name in task.sites,
                         **{k: v for k, v in asdict(s.style).items() if k not in ("n_train", "n_test")}}
                  for name, s in task.test_sites.items()},
        "rows": rows,
        "means": all_means,
        "means_internal": means(rows, list(task.sites)),
        "targets": targets,
        "all_targets_met": all_met(targets),
        "wall_s": wall,
        "eval_s": eval_s,
        "arms": extra,
        "errors": errors,
        "total_wall_s": round(time.monotonic() - t_start, 1),
        "seed": seed,
        **({"integer_images": factors} if factors else {}),
        "machine": machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CPU budget (default)")
    size.add_argument("--full", action="store_true", help="nnU-Net's default budget (1000 x 250 iterations), for a GPU")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help=f"comma-separated subset of {','.join(ARMS)}, or privacy arms {','.join(PRIVACY_ARMS)}")
    ap.add_argument("--rounds", type=int, default=None, help="override the budget's rounds")
    ap.add_argument("--local-epochs", type=int, default=None, help="override the budget's local epochs")
    ap.add_argument("--iterations", type=int, default=None, help="override the training iterations per epoch")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="test-time mirroring at prediction (default: off for --quick, on for --full)")
    ap.add_argument("--central-scale", type=int, default=1,
                    help="centralized iterations per epoch = iterations x this (default 1: the same as every site)")
    ap.add_argument("--slow-site", default=None, help="the async arm's slow site (default SiteA)")
    ap.add_argument("--slow-factor", type=float, default=None, help="how many times slower it is (default 3)")
    ap.add_argument("--staleness", default=None, choices=("inverse_sqrt", "constant", "polynomial", "hinge"),
                    help="FedBuff staleness weight of the async arm (default polynomial)")
    ap.add_argument("--staleness-a", type=float, default=None, help="its parameter a (default 1)")
    ap.add_argument("--staleness-b", type=float, default=None, help="its parameter b (hinge; default 4)")
    ap.add_argument("--buffer-trigger", default=None, choices=("fresh", "any"),
                    help="what counts toward the async arm's K (default fresh: updates from the current global)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ap.add_argument("--dir", default=None, help="work folder, kept (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--dp-clip", type=float, default=None,
                    help="DP arms' clip norm (default: the median first-round update norm of ffe_sync, run first)")
    ap.add_argument("--integer-images", action="store_true",
                    help="store every site's images as int16 in its own units (needed by ffe_secure: secure FFE "
                         "sums integer histograms); not with the centralized arm")
    ap.add_argument("--keep-federations", action="store_true",
                    help="keep each federation's bucket and site folders (GBs) after export")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(a for a in set(arms) - set(ARMS) if a not in ("ffe_secure", "ffe_sync_repeat")
                     and not _DP_ARM.match(a))
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {ARMS + PRIVACY_ARMS}")
    if args.integer_images and "centralized" in arms:
        ap.error("--integer-images converts the sites' images, not the pooled dataset: leave out the centralized arm")
    if args.slow_site is not None and args.slow_site not in _styles()[0]:
        ap.error(f"--slow-site must be one of {sorted(_styles()[0])}")
    budget = FULL if args.full else QUICK
    overrides = {k: v for k, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs),
                                   ("iterations", args.iterations), ("central_scale", args.central_scale),
                                   ("tta", args.tta), ("slow_site", args.slow_site),
                                   ("slow_factor", args.slow_factor), ("staleness", args.staleness),
                                   ("staleness_a", args.staleness_a),
                                   ("staleness_b", args.staleness_b), ("buffer_trigger", args.buffer_trigger))
                 if v is not None}
    budget = replace(budget, **overrides)
    root = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="fedfs-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    with stdout_to_stderr() as real_stdout:
        try:
            result = run(budget, arms, root, args.seed, args.keep_federations, args.dp_clip, args.integer_images)
            result["command"] = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        finally:
            if not args.dir:
                shutil.rmtree(root, ignore_errors=True)
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if args.json:
            real_stdout.write(text + "\n")
        else:
            real_stdout.write(format_table(result) + "\n\n" + json.dumps(result["targets"], indent=1) + "\n")
        real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
