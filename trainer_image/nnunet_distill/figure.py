"""One picture of a distillation: a held-out slice (image, ground truth, teacher ensemble, student) and the
curves.

Drawn from what the distill stage already wrote, nothing recomputed: the held-out predictions of both models
and the case files named in ``distillation_summary.json``, and nnU-Net's training logs stored in each model's
``checkpoint_final.pth``. The slice is the one of all test cases where the smallest structure is largest,
because that is where a thinner network fails first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _read(path: str | Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def pick_slice(labels: dict[str, np.ndarray]) -> tuple[str, int]:
    """(case, axial index) showing the most labels, and among those the most voxels of the rarest one
    (pure)."""
    counts: dict[int, int] = {}
    for arr in labels.values():
        for value, n in zip(*np.unique(arr, return_counts=True), strict=False):
            if value > 0:
                counts[int(value)] = counts.get(int(value), 0) + int(n)
    if not counts:
        case = min(labels)
        return case, labels[case].shape[0] // 2
    rarest = min(counts, key=counts.get)
    best = max(
        (
            (case, z, int((arr[z] == rarest).sum()), len(np.unique(arr[z])))
            for case, arr in labels.items()
            for z in range(arr.shape[0])
        ),
        key=lambda t: (t[3], t[2]),
    )
    return best[0], best[1]


def training_curves(checkpoint: str | Path) -> dict[str, list[float]]:
    """nnU-Net's per-epoch logs from a checkpoint: train/val loss and the pseudo Dice."""
    import torch

    logging = torch.load(checkpoint, map_location="cpu", weights_only=False).get("logging") or {}
    return {k: [float(v) for v in logging.get(k, [])] for k in ("train_losses", "val_losses", "mean_fg_dice")}


_COLOURS = (
    (0, 0, 0, 0),
    (0.2, 0.6, 1.0, 0.55),
    (1.0, 0.25, 0.2, 0.8),
    (1.0, 0.85, 0.1, 0.8),
    (0.4, 1.0, 0.4, 0.8),
    (0.8, 0.4, 1.0, 0.8),
)
_CURVES = (
    ("train_losses", "training loss (student: mixed with KD)"),
    ("val_losses", "validation loss (nnU-Net Dice+CE)"),
    ("mean_fg_dice", "pseudo Dice (validation patches)"),
)


def _held_out_slice(summary_path: str | Path, summary: dict) -> tuple[str, int, Any, Any, dict[str, Any]]:
    """(case, z, image, label, {panel name: prediction}) of the slice to draw, read from the summary's
    held-out test-set predictions."""
    files: dict[str, Any] = (summary.get("cases") or {}).get("files") or {}
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    if not files or not teacher.get("predictions"):
        raise ValueError(
            f"{summary_path} has no held-out test-set predictions to draw (evaluation "
            f"{summary.get('evaluation')!r}); the figure needs a labelled imagesTs"
        )
    ending = (
        ".nii.gz"
        if str(next(iter(files.values()))["label"]).endswith(".nii.gz")
        else Path(next(iter(files.values()))["label"]).suffix
    )
    labels = {case: _read(f["label"]) for case, f in files.items()}
    case, z = pick_slice(labels)
    image = _read(files[case]["images"][0])
    predictions = {
        "teacher ensemble": _read(Path(teacher["predictions"]) / f"{case}{ending}"),
        "student": _read(Path(student["predictions"]) / f"{case}{ending}"),
    }
    return case, z, image, labels[case], predictions


def _draw_segmentations(plt, fig, grid, summary: dict, z: int, image, label, predictions: dict) -> None:
    """Top row: the image, the ground truth, the teachers' and the student's segmentation, with their Dice."""
    from matplotlib.colors import ListedColormap

    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    names = list((student.get("dice") or {}).keys())
    colours = ListedColormap(list(_COLOURS))
    n_labels = max(int(label.max()), 1)
    panels = [("image", None), ("ground truth", label), *predictions.items()]
    for i, (name, seg) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image[z], cmap="gray")
        if seg is not None:
            ax.imshow(seg[z], cmap=colours, vmin=0, vmax=len(colours.colors) - 1, interpolation="nearest")
        dice = ""
        if name == "teacher ensemble":
            dice = "\n" + ", ".join(f"{k} {v:.3f}" for k, v in (teacher.get("dice") or {}).items())
        elif name == "student":
            dice = "\n" + ", ".join(f"{k} {v:.3f}" for k, v in (student.get("dice") or {}).items())
        ax.set_title(f"{name}{dice}", fontsize=9)
        ax.axis("off")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colours.colors[i + 1]) for i in range(min(n_labels, len(names)))
    ]
    fig.legend(handles, names[: len(handles)], loc="upper right", fontsize=9, ncol=len(handles))


def _curves(teacher_checkpoints: Sequence[str | Path], student: dict) -> dict[str, dict[str, list[float]]]:
    """Training curves of every teacher checkpoint that exists and of the student's final checkpoint."""
    curves = {
        f"teacher fold {Path(c).parent.name.removeprefix('fold_')}": training_curves(c)
        for c in teacher_checkpoints
        if Path(c).is_file()
    }
    student_ckpt = (
        Path(student.get("model_folder", "")) / f"fold_{student.get('fold')}" / "checkpoint_final.pth"
    )
    if student_ckpt.is_file():
        curves[f"student ({student.get('plans')})"] = training_curves(student_ckpt)
    return curves


def _draw_curves(fig, grid, curves: dict[str, dict[str, list[float]]]) -> None:
    """Bottom row, first three panels: training loss, validation loss and pseudo Dice per epoch."""
    for col, (key, label) in enumerate(_CURVES):
        ax = fig.add_subplot(grid[1, col])
        for name, series in curves.items():
            values = series.get(key) or []
            if values:
                ax.plot(
                    range(1, len(values) + 1), values, label=name, lw=2 if name.startswith("student") else 1
                )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if col == 0 and curves:
            ax.legend(fontsize=7)


def _numbers(summary: dict, case: str, z: int) -> list[str]:
    """The text panel: cases, folds, retention, sizes, speed-up and which slice is drawn."""
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    ret = summary.get("retention") or {}
    inference = summary.get("inference") or {}
    cases = summary.get("cases") or {}
    text = [
        f"held-out cases: {cases.get('count')} ({cases.get('source')})",
        f"teacher folds: {', '.join(map(str, teacher.get('folds') or []))}",
        f"retention (mean): {ret.get('mean', float('nan')):.3f}" if ret else "retention: n/a",
        f"worst label: {ret.get('worst_label')} {ret.get('worst', float('nan')):.3f}" if ret else "",
        f"parameters: {student.get('parameters') or 0:,} vs {teacher.get('parameters_per_fold') or 0:,} per "
        "fold",
        f"inference speed-up: {inference.get('speedup')}x" if inference.get("speedup") else "",
        f"slice: {case}, z={z}",
    ]
    return [t for t in text if t]


def render(
    summary_path: str | Path,
    out_png: str | Path,
    teacher_checkpoints: Sequence[str | Path] = (),
    title: str | None = None,
) -> Path:
    """Write the PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads(Path(summary_path).read_text())
    case, z, image, label, predictions = _held_out_slice(summary_path, summary)

    fig = plt.figure(figsize=(16, 7.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1.15, 1.0])
    _draw_segmentations(plt, fig, grid, summary, z, image, label, predictions)
    _draw_curves(fig, grid, _curves(teacher_checkpoints, summary.get("student") or {}))
    ax = fig.add_subplot(grid[1, 3])
    ax.axis("off")
    ax.text(0, 1, "\n".join(_numbers(summary, case, z)), va="top", fontsize=10, family="monospace")
    fig.suptitle(title or "nnunet-distill: teacher ensemble vs student on held-out data", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
