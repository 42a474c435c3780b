"""The demo picture: the slice where the smallest structure is largest, drawn from the summary's own files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_distill.figure import pick_slice, render


def test_pick_slice_prefers_the_rarest_label_at_its_largest():
    a = np.zeros((4, 8, 8), np.uint8)
    a[:, :6, :6] = 1  # a large label on every slice
    a[2, 1:3, 1:3] = 2  # the rare label: 4 voxels on slice 2
    b = np.zeros((4, 8, 8), np.uint8)
    b[1, 0, 0] = 2  # 1 voxel elsewhere
    assert pick_slice({"a": a, "b": b}) == ("a", 2)
    assert pick_slice({"empty": np.zeros((6, 2, 2), np.uint8)}) == ("empty", 3)


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_render_draws_a_png_from_a_test_set_summary(tmp_path):
    label = np.zeros((8, 16, 16), np.uint8)
    label[:, 4:12, 4:12] = 1
    label[4, 7:9, 7:9] = 2
    image = label.astype(np.float32) + np.random.default_rng(0).normal(0, 0.1, label.shape).astype(np.float32)
    for sub in ("img", "lab", "student", "teacher"):
        (tmp_path / sub).mkdir()
    _write(image, tmp_path / "img" / "c_0000.nii.gz")
    _write(label, tmp_path / "lab" / "c.nii.gz")
    _write(label, tmp_path / "teacher" / "c.nii.gz")
    _write((label > 0).astype(np.uint8), tmp_path / "student" / "c.nii.gz")  # the student misses the lesion
    summary = {
        "evaluation": "test_set",
        "cases": {
            "count": 1,
            "source": "imagesTs",
            "ids": ["c"],
            "files": {
                "c": {
                    "images": [str(tmp_path / "img" / "c_0000.nii.gz")],
                    "label": str(tmp_path / "lab" / "c.nii.gz"),
                }
            },
        },
        "student": {
            "predictions": str(tmp_path / "student"),
            "dice": {"organ": 0.99, "lesion": 0.0},
            "parameters": 10,
            "model_folder": str(tmp_path / "none"),
            "fold": 0,
        },
        "teacher_ensemble": {
            "predictions": str(tmp_path / "teacher"),
            "dice": {"organ": 1.0, "lesion": 1.0},
            "folds": [0, 1],
            "parameters_per_fold": 40,
        },
        "retention": {"mean": 0.495, "worst_label": "lesion", "worst": 0.0},
        "inference": {"speedup": 3.0},
    }
    path = tmp_path / "distillation_summary.json"
    path.write_text(json.dumps(summary))
    out = render(path, tmp_path / "out" / "demo.png")
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert picture.shape[0] > 400 and picture.shape[1] > 1000  # a real, full-size PNG
    assert picture.std() > 10  # not a blank canvas
    summary["cases"].pop("files")
    path.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="no held-out test-set predictions"):
        render(path, tmp_path / "none.png")
