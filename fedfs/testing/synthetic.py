"""Synthetic nnU-Net datasets for tests, the demo and benchmarks: one per site, heterogeneous.

Each site is a raw nnU-Net dataset (``DatasetXXX_Name/dataset.json``, ``imagesTr/CASE_0000.nii.gz``,
``labelsTr/CASE.nii.gz``) of single-channel images (64x64 unless the site's style sets
``image_size``) with one foreground label, ``lesion``.

A style with a three-entry ``image_size`` and ``spacing`` makes 3D volumes (ellipsoids or
lobulated blobs, written as 3D NIfTI volumes; :data:`DEFAULT_STYLES_3D` are tiny volumes of 12-24
voxels a side that nnU-Net plans as 3-stage ``3d_fullres`` networks and trains in well under a
second per iteration on a CPU).
``label_scheme`` picks nnU-Net's label conventions (:data:`LABEL_SCHEMES`): ``"lesion"`` (one
label), ``"regions"`` (a lesion with a brighter core, trained as the overlapping regions
``whole = [1, 2]`` and ``core = 2`` with ``regions_class_order``) or ``"ignore"`` (sparse
annotation: in the training labels, bands of voxels carry nnU-Net's ``ignore`` label; the
held-out references stay dense).
2D images are written as 2D NIfTI files: nnU-Net's ``SimpleITKIO`` reads a 2D file as one slice
with a dummy out-of-plane spacing (999 x the in-plane spacing), plans a ``2d`` configuration
for it and writes 2D predictions back, which is what nnU-Net's documentation recommends for
2D data in NIfTI.

Sites differ the way hospitals do (:class:`SiteStyle`): intensity scale and offset, contrast,
noise, pixel spacing, matrix size, lesion size and shape (ellipses or lobulated blobs), a multiplicative
bias field, stripe artefacts, motion ghosts (a faint copy shifted by about half the field of
view, lesions included but unlabelled), and case counts. The channel is named ``"MRI"`` so nnU-Net
z-scores every image: a per-case normalisation is what makes such different scanners
comparable, and it is the same for every site of a federation.

Held-out test cases are written outside the raw dataset (``<test_root>/DatasetXXX_Name/
imagesTs`` and ``labelsTs``) so that nothing that walks the raw dataset ever sees them.

Only numpy is needed to make the arrays; SimpleITK is imported when files are written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "SiteStyle",
    "SitePaths",
    "DEFAULT_STYLES",
    "make_case",
    "make_site",
    "make_federation",
    "make_pooled",
    "dataset_folder_name",
    "DEFAULT_STYLES_3D",
    "LABEL_SCHEMES",
    "dataset_labels",
    "sparse_annotation",
]

IMAGE_SIZE = (64, 64)
LABELS = {"background": 0, "lesion": 1}
FILE_ENDING = ".nii.gz"

#: dataset.json's ``labels`` (and, for regions, ``regions_class_order``) of each label scheme.
#: ``"regions"``: label 1 is the lesion's rim and 2 its core; nnU-Net trains the overlapping
#: regions ``whole`` (1 or 2) and ``core`` (2) and writes predictions back as 1 and 2.
#: ``"ignore"``: 2 marks voxels nobody annotated (nnU-Net wants it to be the highest value).
LABEL_SCHEMES: dict[str, dict] = {
    "lesion": {"labels": dict(LABELS)},
    "regions": {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]},
    "ignore": {"labels": {"background": 0, "lesion": 1, "ignore": 2}},
}
IGNORE_VALUE = 2


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner and population look. Intensities are in 'contrast units' before
    ``intensity_scale`` / ``intensity_offset`` map them to the site's raw values."""

    intensity_scale: float = 1.0
    intensity_offset: float = 0.0
    contrast: float = 1.0                  # lesion minus background, before scaling
    noise: float = 0.2                     # Gaussian noise std, in contrast units
    texture: float = 0.15                  # smooth background texture amplitude
    spacing: tuple[float, float] = (1.0, 1.0)   # (row, column) pixel spacing in mm
    radius_mm: tuple[float, float] = (9.0, 16.0)  # lesion mean radius range
    shape: str = "ellipse"                 # "ellipse" or "blob" (lobulated)
    max_lesions: int = 1                   # 1..max_lesions lesions per case
    bias_field: float = 0.0                # amplitude of a smooth multiplicative field
    stripes: float = 0.0                   # amplitude of sinusoidal stripes, contrast units
    ghosting: float = 0.0                  # amplitude of a motion ghost: a copy shifted by ~half the FOV
    image_size: tuple[int, int] = IMAGE_SIZE  # (rows, columns) of the site's acquisition matrix
    n_train: int = 12
    n_test: int = 4
    channel_name: str = "MRI"              # anything but "CT" gives nnU-Net's per-case z-score
    label_scheme: str = "lesion"           # a key of LABEL_SCHEMES: "lesion", "regions" or "ignore"


#: Three heterogeneous sites: different scanners (scale, offset, spacing, artefacts), lesion
#: shapes and case counts. All three are learnable by the tiny trainer in a few CPU epochs.
DEFAULT_STYLES: tuple[SiteStyle, ...] = (
    SiteStyle(intensity_scale=100.0, intensity_offset=50.0, contrast=1.0, noise=0.2,
              spacing=(1.0, 1.0), radius_mm=(9.0, 15.0), shape="ellipse", n_train=16, n_test=4),
    SiteStyle(intensity_scale=2000.0, intensity_offset=-300.0, contrast=1.2, noise=0.3,
              spacing=(0.75, 0.8), radius_mm=(7.0, 12.0), shape="blob", bias_field=0.3,
              max_lesions=2, n_train=12, n_test=4),
    SiteStyle(intensity_scale=0.05, intensity_offset=1.0, contrast=0.9, noise=0.25,
              spacing=(1.4, 1.25), radius_mm=(12.0, 20.0), shape="ellipse", stripes=0.25,
              n_train=8, n_test=4),
)

#: Three tiny 3D sites ((z, y, x) matrices of 16-24 voxels, spacing in mm): an isotropic one, an
#: anisotropic one with thick slices (nnU-Net plans 1x3x3 first convolutions and pools the slice
#: axis later there) and a third with blobs and a bias field. Small on purpose: 3D nnU-Net on a CPU
#: costs seconds per iteration at 64^3, a few tens of milliseconds at these sizes.
DEFAULT_STYLES_3D: tuple[SiteStyle, ...] = (
    SiteStyle(intensity_scale=100.0, intensity_offset=50.0, contrast=1.2, noise=0.15, texture=0.1,
              spacing=(1.0, 1.0, 1.0), radius_mm=(4.0, 6.0), image_size=(20, 20, 20), n_train=6, n_test=2),
    SiteStyle(intensity_scale=2000.0, intensity_offset=-300.0, contrast=1.2, noise=0.2, texture=0.1,
              spacing=(2.0, 0.9, 0.9), radius_mm=(4.5, 6.5), image_size=(12, 24, 24), n_train=5, n_test=2),
    SiteStyle(intensity_scale=0.05, intensity_offset=1.0, contrast=1.3, noise=0.2, texture=0.1,
              spacing=(1.2, 1.2, 1.2), radius_mm=(4.0, 5.5), image_size=(16, 16, 16), shape="blob",
              bias_field=0.2, n_train=4, n_test=2),
)


@dataclass(frozen=True)
class SitePaths:
    """Where :func:`make_site` put a site's files."""

    dataset_id: int
    dataset_name: str                      # DatasetXXX_Name
    dataset_dir: Path                      # the raw dataset folder (nnUNet_raw/DatasetXXX_Name)
    images_ts: Path                        # held-out images (CASE_0000.nii.gz), outside dataset_dir
    labels_ts: Path                        # held-out labels (CASE.nii.gz)
    n_train: int
    n_test: int
    style: SiteStyle = field(default_factory=SiteStyle)

    @property
    def images_tr(self) -> Path:
        return self.dataset_dir / "imagesTr"

    @property
    def labels_tr(self) -> Path:
        return self.dataset_dir / "labelsTr"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset007_Name``."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"dataset name must be alphanumeric (underscores allowed), got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


# --------------------------------------------------------------------------- arrays (pure numpy)

def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_waves: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1]: a sum of a few low-frequency plane waves (2D or 3D)."""
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(n_waves):
        freqs = rng.uniform(-2.0, 2.0, len(shape))
        phase = sum(f * g for f, g in zip(freqs, grids))
        out += np.cos(2 * np.pi * phase + rng.uniform(0, 2 * np.pi))
    return out / max(np.abs(out).max(), 1e-8)


def _lesion_radius(rng: np.random.Generator, style: SiteStyle, shape: tuple[int, ...]) -> np.ndarray:
    """One lesion (ellipse/ellipsoid or lobulated blob) at a random place, sized in mm then in
    voxels, as a normalised radius: the lesion is ``<= 1``, its core ``<= 0.5``. In 3D the
    ellipsoid turns in the (row, column) plane, the slice axis keeps its own radius."""
    if len(shape) != len(style.spacing):
        raise ValueError(f"image_size {shape} and spacing {style.spacing} have different dimensions")
    if len(shape) not in (2, 3):
        raise ValueError(f"only 2D and 3D images are made, got shape {shape}")
    r_mm = rng.uniform(*style.radius_mm)
    ry, rx = r_mm / style.spacing[-2], r_mm / style.spacing[-1]
    aspect = rng.uniform(0.7, 1.3)
    ry, rx = ry * aspect, rx / aspect
    radii = ([r_mm / style.spacing[0]] if len(shape) == 3 else []) + [ry, rx]
    centre = []
    for r, n in zip(radii, shape):
        margin = min(r + 2, n / 2 - 1)
        centre.append(rng.uniform(margin, n - margin))
    theta = rng.uniform(0, np.pi)
    grids = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
    yy, xx = grids[-2], grids[-1]
    u = (yy * np.cos(theta) + xx * np.sin(theta)) / ry
    v = (-yy * np.sin(theta) + xx * np.cos(theta)) / rx
    rho2 = u ** 2 + v ** 2
    if len(shape) == 3:
        rho2 = rho2 + (grids[0] / radii[0]) ** 2
    rho = np.sqrt(rho2)
    if style.shape == "blob":
        phi = np.arctan2(v, u)
        wobble = sum(rng.uniform(0.05, 0.15) * np.sin(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        return rho / (1.0 + wobble)
    if style.shape != "ellipse":
        raise ValueError(f"unknown lesion shape {style.shape!r} (use 'ellipse' or 'blob')")
    return rho


def _ghost(rng: np.random.Generator, img: np.ndarray, amplitude: float) -> np.ndarray:
    """An MRI motion ghost: a faint copy of the image (lesions included, unlabelled) shifted along
    a random phase-encoding axis by about half the field of view, as periodic motion produces."""
    axis = int(rng.integers(0, img.ndim))
    shift = img.shape[axis] // 2 + int(rng.integers(-img.shape[axis] // 8, img.shape[axis] // 8 + 1))
    return amplitude * np.roll(img - img.mean(), shift, axis=axis)


def make_case(rng: np.random.Generator, style: SiteStyle,
              shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair in the site's raw intensity units, 2D or 3D
    (``shape`` defaults to the style's ``image_size``).

    The label follows the style's ``label_scheme``: 0/1 for ``"lesion"`` and ``"ignore"`` (dense;
    :func:`sparse_annotation` makes the sparse training labels), 0/1/2 for ``"regions"`` (2 is the
    core, half the lesion's radius, brighter by 0.8 x ``contrast``).
    """
    shape = tuple(style.image_size if shape is None else shape)
    if style.label_scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {style.label_scheme!r} (use one of {sorted(LABEL_SCHEMES)})")
    radius = np.full(shape, np.inf)
    for _ in range(int(rng.integers(1, style.max_lesions + 1))):
        radius = np.minimum(radius, _lesion_radius(rng, style, shape))
    lesion = radius <= 1.0
    img = style.texture * _smooth_field(rng, shape) + style.contrast * lesion
    seg = lesion.astype(np.uint8)
    if style.label_scheme == "regions":
        core = radius <= 0.5
        img += 0.8 * style.contrast * core
        seg[core] = 2
    if style.stripes:
        idx = np.indices(shape)
        yy, xx = idx[-2], idx[-1]
        angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 9.0)
        img += style.stripes * np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period)
    if style.ghosting:
        img += _ghost(rng, img, style.ghosting)
    img += rng.normal(0.0, style.noise, shape)
    img += 1.0  # keep the tissue positive so a bias field scales it like a real coil would
    if style.bias_field:
        img *= 1.0 + style.bias_field * _smooth_field(rng, shape, n_waves=2)
    img = img * style.intensity_scale + style.intensity_offset
    return img.astype(np.float32), seg


def sparse_annotation(seg: np.ndarray, rng: np.random.Generator, ignore_value: int = IGNORE_VALUE,
                      band: int = 3) -> np.ndarray:
    """A dense label turned into a sparse one, as an annotator who labels only some rows would
    leave it: bands of ``band`` rows along the first axis (slices, in 3D), every other band
    with a random phase, become ``ignore_value``; a row through the lesion's middle always stays
    annotated, so every case keeps some foreground. Returns a new array."""
    if seg.max(initial=0) >= ignore_value:
        raise ValueError(f"the ignore value {ignore_value} must be above every label in the segmentation")
    out = seg.copy()
    rows = np.arange(seg.shape[0])
    ignored = ((rows + int(rng.integers(0, 2 * band))) // band) % 2 == 1
    fg_rows = np.flatnonzero(np.any(seg.reshape(seg.shape[0], -1) > 0, axis=1))
    if fg_rows.size:
        ignored[fg_rows[fg_rows.size // 2]] = False
    out[ignored] = ignore_value
    return out


# --------------------------------------------------------------------------- files

def _write_image(arr: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    import SimpleITK as sitk  # only needed to write files

    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(x) for x in reversed(spacing)))  # SimpleITK wants (x, y[, z]): reversed
    sitk.WriteImage(im, str(path), True)


def dataset_labels(label_scheme: str = "lesion") -> dict:
    """dataset.json's ``labels`` (and ``regions_class_order`` for regions) for a label scheme."""
    if label_scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {label_scheme!r} (use one of {sorted(LABEL_SCHEMES)})")
    return json.loads(json.dumps(LABEL_SCHEMES[label_scheme]))  # a deep copy


def _write_dataset_json(folder: Path, n_train: int, channel_name: str, label_scheme: str = "lesion") -> None:
    doc = {"channel_names": {"0": channel_name}, **dataset_labels(label_scheme),
           "numTraining": int(n_train), "file_ending": FILE_ENDING}
    (folder / "dataset.json").write_text(json.dumps(doc, indent=2))


def make_site(raw_root: str | os.PathLike, dataset_id: int, name: str, n_train: int | None = None,
              n_test: int | None = None, style: SiteStyle | None = None, seed: int = 0,
              test_root: str | os.PathLike | None = None) -> SitePaths:
    """Write one site's raw nnU-Net dataset and its held-out cases; return where they are.

    ``n_train`` / ``n_test`` default to the style's counts. Case ids are ``<name>_NNN`` so that
    pooled datasets never collide. Held-out cases go to ``<test_root>/DatasetXXX_Name/``
    (``test_root`` defaults to ``<parent of raw_root>/nnUNet_heldout``). Deterministic in ``seed``.
    An existing dataset folder is replaced.
    """
    style = style or SiteStyle()
    n_train = style.n_train if n_train is None else int(n_train)
    n_test = style.n_test if n_test is None else int(n_test)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    folder_name, dataset_dir, test_dir = _fresh_folders(raw_root, test_root, dataset_id, name)
    images_ts, labels_ts = test_dir / "imagesTs", test_dir / "labelsTs"
    for d in (dataset_dir / "imagesTr", dataset_dir / "labelsTr", images_ts, labels_ts):
        d.mkdir(parents=True)

    rng = np.random.default_rng([int(seed), int(dataset_id)])
    for i in range(n_train + n_test):
        img, seg = make_case(rng, style, tuple(style.image_size))
        case = f"{name}_{i:03d}"
        train = i < n_train
        if train and style.label_scheme == "ignore":
            seg = sparse_annotation(seg, rng)
        img_dir = dataset_dir / "imagesTr" if train else images_ts
        seg_dir = dataset_dir / "labelsTr" if train else labels_ts
        _write_image(img, style.spacing, img_dir / f"{case}_0000{FILE_ENDING}")
        _write_image(seg, style.spacing, seg_dir / f"{case}{FILE_ENDING}")
    _write_dataset_json(dataset_dir, n_train, style.channel_name, style.label_scheme)
    return SitePaths(int(dataset_id), folder_name, dataset_dir, images_ts, labels_ts, n_train, n_test, style)


def _fresh_folders(raw_root: str | os.PathLike, test_root: str | os.PathLike | None, dataset_id: int,
                   name: str) -> tuple[str, Path, Path]:
    """(folder name, empty raw dataset folder, empty held-out folder); existing ones are replaced.
    ``test_root`` defaults to ``<parent of raw_root>/nnUNet_heldout``."""
    folder_name = dataset_folder_name(dataset_id, name)
    raw_root = Path(raw_root)
    test_root = Path(test_root) if test_root is not None else raw_root.parent / "nnUNet_heldout"
    dataset_dir, test_dir = raw_root / folder_name, test_root / folder_name
    for d in (dataset_dir, test_dir):
        if d.exists():
            shutil.rmtree(d)
    return folder_name, dataset_dir, test_dir


def make_federation(raw_root: str | os.PathLike, n_sites: int = 3, base_id: int = 501, seed: int = 0,
                    styles: Sequence[SiteStyle] | None = None, names: Sequence[str] | None = None,
                    test_root: str | os.PathLike | None = None) -> list[SitePaths]:
    """One dataset per site (ids ``base_id``, ``base_id+1``, ...; names ``SiteA``, ``SiteB``, ...).

    Styles default to :data:`DEFAULT_STYLES`, cycled with a shifted spacing and offset when
    more than three sites are asked for so that every site stays distinct.
    """
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    styles = list(styles) if styles is not None else list(DEFAULT_STYLES)
    chosen: list[SiteStyle] = []
    for i in range(n_sites):
        s = styles[i % len(styles)]
        lap = i // len(styles)
        if lap:
            s = replace(s, spacing=tuple(x * (1 + 0.1 * lap) for x in s.spacing),
                        intensity_offset=s.intensity_offset + 10.0 * lap)
        chosen.append(s)
    names = list(names) if names is not None else [_site_letter_name(i) for i in range(n_sites)]
    if len(names) != n_sites:
        raise ValueError(f"{n_sites} sites but {len(names)} names")
    return [make_site(raw_root, base_id + i, names[i], style=chosen[i], seed=seed, test_root=test_root)
            for i in range(n_sites)]


def _site_letter_name(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(ord("A") + r) + letters
    return f"Site{letters}"


def make_pooled(raw_root: str | os.PathLike, sites: Sequence[SitePaths], dataset_id: int,
                name: str = "Pooled", test_root: str | os.PathLike | None = None) -> SitePaths:
    """Pool the sites' training cases (and held-out cases) into one dataset for centralized runs.

    Files are copied unchanged, so every case keeps its site's spacing and intensities: the
    pooled dataset is exactly what a central hospital would have if the sites shared their data.
    """
    if not sites:
        raise ValueError("make_pooled needs at least one site")
    channels = {s.style.channel_name for s in sites}
    if len(channels) != 1:
        raise ValueError(f"sites disagree on the channel name: {sorted(channels)}")
    schemes = {s.style.label_scheme for s in sites}
    if len(schemes) != 1:
        raise ValueError(f"sites disagree on the label scheme: {sorted(schemes)}")
    folder_name, dataset_dir, test_dir = _fresh_folders(raw_root, test_root, dataset_id, name)
    pairs = [(dataset_dir / "imagesTr", [s.images_tr for s in sites]),
             (dataset_dir / "labelsTr", [s.labels_tr for s in sites]),
             (test_dir / "imagesTs", [s.images_ts for s in sites]),
             (test_dir / "labelsTs", [s.labels_ts for s in sites])]
    for target, sources in pairs:
        target.mkdir(parents=True)
        for src in sources:
            for f in sorted(Path(src).iterdir()):
                if (target / f.name).exists():
                    raise ValueError(f"case file {f.name} exists in two sites; give the sites distinct names")
                shutil.copy2(f, target / f.name)
    n_train, n_test = sum(s.n_train for s in sites), sum(s.n_test for s in sites)
    _write_dataset_json(dataset_dir, n_train, channels.pop(), schemes.pop())
    return SitePaths(int(dataset_id), folder_name, dataset_dir, test_dir / "imagesTs", test_dir / "labelsTs",
                     n_train, n_test, sites[0].style)
