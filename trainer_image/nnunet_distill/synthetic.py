"""Synthetic nnU-Net raw datasets for the demo, the tests and the benchmarks.

A real nnU-Net raw dataset (`DatasetXXX_Name` with imagesTr/labelsTr/imagesTs/labelsTs as .nii.gz and a
dataset.json) that a tiny nnU-Net learns in a few iterations, yet exercises what real data does: several
labels of very different sizes (including a small structure a few voxels across, the kind that suffers first
when a student is made narrower), Gaussian noise, a smooth multiplicative intensity inhomogeneity (bias
field), optional anisotropic spacing and optional extra channels with different contrasts. The labelled
held-out test set (imagesTs/labelsTs) is generated from its own random streams and is never listed in
`numTraining`, so no teacher fold ever sees it. With `label_noise`, the training labels carry annotator noise
(contours drawn up to a few millimetres off, smoothly, as inter-rater variability looks) while the test labels
stay exact: the setting in which an ensemble knows more than any one set of labels. With `unlabelled_cases`,
imagesTr also holds images without annotations (an all-background placeholder label each), which only the
teachers can label for a student.

Every case is drawn from its own generator seeded by (seed, split, index): the same seed gives
byte-identical images, and case i does not depend on how many cases were asked for.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "bright": 1, "dark": 2, "small": 3}
#: The "organ" layout: a large organ, a small lesion inside it and a thin tubular vessel, the three kinds of
#: structure whose Dice a narrower student loses at very different speeds (a CT-like abdominal scene).
ORGAN_LABELS = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
LAYOUTS = ("spheres", "organ")
# Mean intensity of each label (background, bright, dark, small) per channel: channel 0 is "CT"-like
# (nnU-Net's CT normalization), channel 1 inverts the bright/dark contrast like a second MR sequence,
# further channels rotate the table so every channel carries some information.
_CONTRAST = (
    (1.0, 2.0, 0.2, 3.0),
    (1.0, 0.4, 2.0, 2.6),
)
NOISE_SIGMA = 0.15
BIAS_AMPLITUDE = 0.2
ANISOTROPIC_SPACING = (1.0, 1.0, 3.0)
ANISOTROPIC_DEFAULT_SIZE = (48, 48, 16)
DEFAULT_SIZE = (48, 48, 48)
SYNTHETIC_MARKER = "nnunet-distill synthetic"
#: Training cases without annotations (`unlabelled_cases`): images in imagesTr with an all-background
#: placeholder label, for `--unlabelled_cases` (see nnunet_distill.unlabelled).
LABELLED_PREFIX = "case"
UNLABELLED_PREFIX = "unlabelled"
#: Annotator noise: the smoothing (mm) of the random displacement of a training label's contours. At an
#: amplitude of 0.8 mm per axis, a noisy label overlaps the exact one with Dice about 0.87 for the organ, 0.74
#: for the lesion and 0.63 for the vessel (organ layout, 32^3, 16 cases): inter-rater agreement as reported
#: for organs, lesions and vessels.
LABEL_NOISE_SMOOTHING_MM = 3.0


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. `size` and `spacing` are in SimpleITK (x, y, z) order."""

    dataset_id: int
    name: str
    cases: int = 16
    test_cases: int = 4
    size: tuple[int, int, int] = DEFAULT_SIZE
    channels: int = 1
    anisotropic: bool = False
    seed: int = 0
    layout: str = "spheres"
    label_noise: float = 0.0
    unlabelled_cases: int = 0
    image_noise: float = NOISE_SIGMA
    spacing: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset id (-d) must be in 1..999, got {self.dataset_id}")
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"dataset name (--name) must be letters, digits, '-' or '_', got {self.name!r}")
        if self.cases < 2:
            raise ValueError(f"--cases must be >= 2 (nnU-Net needs a train/val split), got {self.cases}")
        if self.test_cases < 0:
            raise ValueError(f"--test-cases must be >= 0, got {self.test_cases}")
        if len(self.size) != 3 or min(self.size) < 16:
            raise ValueError(f"--size needs three values >= 16 (x y z), got {list(self.size)}")
        if self.channels < 1:
            raise ValueError(f"--channels must be >= 1, got {self.channels}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.unlabelled_cases < 0:
            raise ValueError(f"--unlabelled-cases must be >= 0, got {self.unlabelled_cases}")
        if not 0.0 < self.image_noise <= 3.0:
            raise ValueError(f"--image-noise must be in (0, 3] (intensity units), got {self.image_noise}")
        if not 0.0 <= self.label_noise <= 5.0:
            raise ValueError(f"--label-noise must be in 0..5 (mm), got {self.label_noise}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", ANISOTROPIC_SPACING if self.anisotropic else (1.0, 1.0, 1.0))

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)

    @property
    def unlabelled_case_ids(self) -> list[str]:
        return unlabelled_case_ids(self.unlabelled_cases)


def labelled_case_ids(count: int) -> list[str]:
    """The identifiers `write_dataset` gives `count` labelled training cases (splits_final.json's)."""
    return [f"{LABELLED_PREFIX}_{i:04d}" for i in range(count)]


def unlabelled_case_ids(count: int) -> list[str]:
    """The identifiers `write_dataset` gives `count` unlabelled cases (what `--unlabelled_cases` names)."""
    return [f"{UNLABELLED_PREFIX}_{i:04d}" for i in range(count)]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def channel_names(channels: int) -> dict[str, str]:
    """Channel 0 is called CT so nnU-Net picks CT normalization; the others z-score normalization."""
    return {str(c): ("CT" if c == 0 else f"MR{c}") for c in range(channels)}


def contrast_table(channel: int) -> tuple[float, ...]:
    if channel < len(_CONTRAST):
        return _CONTRAST[channel]
    base = _CONTRAST[channel % len(_CONTRAST)]
    shift = channel // len(_CONTRAST)
    fg = base[1:]
    return (base[0], *fg[shift % 3 :], *fg[: shift % 3])


def _grid(shape_zyx: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Physical coordinates (mm) of every voxel, in numpy (z, y, x) order."""
    sz, sy, sx = spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]
    z, y, x = np.meshgrid(
        np.arange(shape_zyx[0]) * sz,
        np.arange(shape_zyx[1]) * sy,
        np.arange(shape_zyx[2]) * sx,
        indexing="ij",
        sparse=True,
    )
    return z, y, x


def _ellipsoid(grid: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    z, y, x = grid
    return ((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
        (x - center[2]) / radii[2]
    ) ** 2 <= 1.0


def _bias_field(rng: np.random.Generator, grid: tuple[np.ndarray, ...], extent: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field in [1-a, 1+a]: a random low-order (linear + quadratic) polynomial."""
    z, y, x = (g / e - 0.5 for g, e in zip(grid, extent, strict=False))
    coeffs = rng.uniform(-1.0, 1.0, size=6)
    poly = (
        coeffs[0] * z
        + coeffs[1] * y
        + coeffs[2] * x
        + coeffs[3] * z * y
        + coeffs[4] * y * x
        + coeffs[5] * (x * x + z * z - y * y)
    )
    peak = max(float(np.max(np.abs(poly))), 1e-6)
    return 1.0 + BIAS_AMPLITUDE * poly / peak


def _place(
    rng: np.random.Generator,
    extent: np.ndarray,
    radius: float,
    taken: list[tuple[np.ndarray, float]],
    margin: float,
) -> np.ndarray:
    """A centre at least one radius inside the field of view, clear of the objects already placed."""
    lo = np.minimum(radius + margin, extent / 2)
    hi = np.maximum(extent - radius - margin, extent / 2)
    best, best_gap = None, -np.inf
    for _ in range(50):
        c = rng.uniform(lo, hi)
        gap = min((np.linalg.norm(c - tc) - (radius + tr) for tc, tr in taken), default=np.inf)
        if gap >= 0:
            return c
        if gap > best_gap:
            best, best_gap = c, gap
    return best


def generate_case(
    rng: np.random.Generator,
    size_xyz: tuple[int, int, int],
    spacing_xyz: tuple[float, float, float],
    channels: int,
    noise_sigma: float = NOISE_SIGMA,
) -> tuple[list[np.ndarray], np.ndarray]:
    """One case: per-channel float32 images and a uint8 label map, both in numpy (z, y, x) order.

    1-2 bright and 1-2 dark ellipsoids (radii 12-22 % of the field of view) and one small sphere of
    about 2.5 mm radius, placed without overlap; noise and a bias field on top.
    """
    shape = (size_xyz[2], size_xyz[1], size_xyz[0])
    grid = _grid(shape, spacing_xyz)
    extent = np.array([shape[0] * spacing_xyz[2], shape[1] * spacing_xyz[1], shape[2] * spacing_xyz[0]])
    fov = float(np.min(extent))
    label = np.zeros(shape, dtype=np.uint8)
    taken: list[tuple[np.ndarray, float]] = []
    for lab, count in (
        (LABELS["dark"], int(rng.integers(1, 3))),
        (LABELS["bright"], int(rng.integers(1, 3))),
    ):
        for _ in range(count):
            radii = rng.uniform(0.12, 0.22, size=3) * fov
            center = _place(rng, extent, float(radii.max()), taken, margin=1.0)
            taken.append((center, float(radii.max())))
            label[_ellipsoid(grid, center, radii)] = lab
    small_r = max(2.5, float(max(spacing_xyz)))
    center = _place(rng, extent, small_r, taken, margin=2.0)
    label[_ellipsoid(grid, center, np.full(3, small_r))] = LABELS["small"]

    bias = _bias_field(rng, grid, extent)
    images = []
    for c in range(channels):
        table = np.asarray(contrast_table(c), dtype=np.float32)
        tissue = table[label]
        noise = rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
        images.append(((tissue + noise) * bias).astype(np.float32))
    return images, label


def _tube(grid: tuple[np.ndarray, ...], points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` of a polyline (a densely sampled curve): a vessel of constant calibre."""
    z, y, x = grid
    inside = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=bool)
    for p in points:
        inside |= (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2 <= radius**2
    return inside


def _vessel_path(rng: np.random.Generator, extent: np.ndarray, spacing: float) -> np.ndarray:
    """A smooth curve crossing the field of view: a straight chord bent by two low-frequency sine waves."""
    start = rng.uniform(0.15, 0.85, size=3) * extent
    end = rng.uniform(0.15, 0.85, size=3) * extent
    axis = int(rng.integers(0, 3))  # the vessel runs mostly along one axis, end to end
    start[axis], end[axis] = 0.0, extent[axis]
    n = int(np.ceil(np.linalg.norm(end - start) / (0.5 * spacing))) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    bend = np.stack(
        [
            rng.uniform(-0.12, 0.12) * extent[i] * np.sin(np.pi * t[:, 0] * rng.uniform(1, 2))
            for i in range(3)
        ],
        axis=1,
    )
    bend[:, axis] = 0.0
    return start + t * (end - start) + bend


def generate_organ_case(
    rng: np.random.Generator,
    size_xyz: tuple[int, int, int],
    spacing_xyz: tuple[float, float, float],
    channels: int,
    noise_sigma: float = NOISE_SIGMA,
) -> tuple[list[np.ndarray], np.ndarray]:
    """One case of the "organ" layout, in numpy (z, y, x) order.

    A large organ (an ellipsoid with radii 25-35 % of the field of view), one hypodense lesion of about 4 mm
    radius inside it, and a vessel of about 1.5 mm radius that crosses the whole field of view, over the organ
    where they meet; noise and a bias field on top.
    """
    shape = (size_xyz[2], size_xyz[1], size_xyz[0])
    grid = _grid(shape, spacing_xyz)
    extent = np.array([shape[0] * spacing_xyz[2], shape[1] * spacing_xyz[1], shape[2] * spacing_xyz[0]])
    fov = float(np.min(extent))
    label = np.zeros(shape, dtype=np.uint8)
    radii = rng.uniform(0.25, 0.35, size=3) * fov
    center = extent / 2 + rng.uniform(-0.08, 0.08, size=3) * extent
    organ = _ellipsoid(grid, center, radii)
    label[organ] = ORGAN_LABELS["organ"]
    lesion_r = max(4.0, float(max(spacing_xyz)))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    offset = direction * rng.uniform(0.0, 0.5) * (radii - lesion_r).clip(min=0)
    label[_ellipsoid(grid, center + offset, np.full(3, lesion_r))] = ORGAN_LABELS["lesion"]
    vessel_r = max(1.5, 0.75 * float(max(spacing_xyz)))
    vessel = _tube(grid, _vessel_path(rng, extent, float(min(spacing_xyz))), vessel_r)
    label[vessel] = ORGAN_LABELS["vessel"]

    bias = _bias_field(rng, grid, extent)
    images = []
    for c in range(channels):
        # background, organ, lesion, vessel: the lesion is darker than the organ, the vessel brightest
        table = np.asarray((1.0, 2.0, 0.5, 3.0) if c % 2 == 0 else (1.0, 0.5, 2.0, 2.4), dtype=np.float32)
        tissue = table[label]
        noise = rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
        images.append(((tissue + noise) * bias).astype(np.float32))
    return images, label


def annotator_noise(
    rng: np.random.Generator, label: np.ndarray, spacing_xyz: tuple[float, float, float], amplitude_mm: float
) -> np.ndarray:
    """The label as a human annotator might have drawn it: every contour displaced by a smooth random field
    (Gaussian-smoothed white noise, `amplitude_mm` standard deviation per axis), labels resampled
    nearest-neighbour. The noise is unbiased, so many annotations of one case average to the truth, as an
    ensemble of models trained on different annotations would."""
    from scipy import ndimage

    spacing_zyx = np.array([spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]])
    displacement = []
    for axis in range(3):
        field_ = ndimage.gaussian_filter(rng.normal(size=label.shape), LABEL_NOISE_SMOOTHING_MM / spacing_zyx)
        field_ *= amplitude_mm / spacing_zyx[axis] / max(float(field_.std()), 1e-9)
        displacement.append(field_)
    coords = np.indices(label.shape, dtype=np.float64) + np.stack(displacement)
    return ndimage.map_coordinates(label, coords, order=0, mode="nearest").astype(label.dtype)


def _write_nifti(array: np.ndarray, spacing_xyz: tuple[float, float, float], path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(image, str(path), useCompression=True)


def dataset_json(spec: SyntheticSpec) -> dict:
    return {
        "name": spec.name,
        "description": f"{SYNTHETIC_MARKER}: "
        + (
            "an organ, a small lesion inside it and a thin vessel"
            if spec.layout == "organ"
            else "bright/dark ellipsoids and a small sphere"
        )
        + ", noise and bias field",
        "channel_names": channel_names(spec.channels),
        "labels": dict(ORGAN_LABELS if spec.layout == "organ" else LABELS),
        "numTraining": spec.cases + spec.unlabelled_cases,
        "file_ending": ".nii.gz",
        "synthetic": {
            "generator": SYNTHETIC_MARKER,
            "seed": spec.seed,
            "size": list(spec.size),
            "spacing": list(spec.spacing),
            "test_cases": spec.test_cases,
            "layout": spec.layout,
            "label_noise_mm": spec.label_noise,
            "image_noise_sigma": spec.image_noise,
            # placeholders: keep them out of the teachers' splits_final.json (nnunet_distill.unlabelled)
            "unlabelled_cases": spec.unlabelled_case_ids,
        },
    }


def _check_target(raw_dir: Path, spec: SyntheticSpec) -> Path:
    """Refuse to clobber real data: only an earlier synthetic dataset of the same name is replaced."""
    target = raw_dir / spec.folder_name
    prefix = f"Dataset{spec.dataset_id:03d}_"
    clashes = [p.name for p in raw_dir.glob(prefix + "*") if p.is_dir() and p.name != spec.folder_name]
    if clashes:
        raise FileExistsError(
            f"dataset id {spec.dataset_id} is already used by {clashes[0]} in {raw_dir}: "
            "choose another -d or remove that folder"
        )
    if target.exists():
        try:
            marker = json.loads((target / "dataset.json").read_text()).get("synthetic", {}).get("generator")
        except (OSError, json.JSONDecodeError):
            marker = None
        if marker != SYNTHETIC_MARKER:
            raise FileExistsError(
                f"{target} exists and is not a synthetic dataset: remove it or choose another -d"
            )
        shutil.rmtree(target)
    return target


def write_dataset(raw_dir: str | Path, spec: SyntheticSpec) -> Path:
    """Write the dataset under `raw_dir` (usually $nnUNet_raw) and return its folder."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    target = _check_target(raw_dir, spec)
    tmp = raw_dir / f".{spec.folder_name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True)
    for split, count, prefix, images_dir, labels_dir in (
        (0, spec.cases, LABELLED_PREFIX, "imagesTr", "labelsTr"),
        (1, spec.test_cases, "test", "imagesTs", "labelsTs"),
        (2, spec.unlabelled_cases, UNLABELLED_PREFIX, "imagesTr", "labelsTr"),
    ):
        for i in range(count):
            rng = np.random.default_rng([spec.seed, split, i])
            generate = generate_organ_case if spec.layout == "organ" else generate_case
            images, label = generate(rng, spec.size, spec.spacing, spec.channels, spec.image_noise)
            if split == 0 and spec.label_noise > 0:
                # its own stream, so the images (and the exact test labels) do not depend on the noise
                noise_rng = np.random.default_rng([spec.seed, split, i, 1])
                label = annotator_noise(noise_rng, label, spec.spacing, spec.label_noise)
            if split == 2:  # drawn like any training case; only its label is a placeholder
                label = np.zeros_like(label)
            case = f"{prefix}_{i:04d}"
            for c, image in enumerate(images):
                _write_nifti(image, spec.spacing, tmp / images_dir / f"{case}_{c:04d}.nii.gz")
            _write_nifti(label, spec.spacing, tmp / labels_dir / f"{case}.nii.gz")
    (tmp / "dataset.json").write_text(json.dumps(dataset_json(spec), indent=2) + "\n")
    tmp.rename(target)
    return target
