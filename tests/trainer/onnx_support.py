"""A real distilled student for the export, package and predictor tests, built once per test session.

The student is trained by `nnUNetv2_distillation_train` itself (teachers: the session's two stock nnU-Net
folds) with a tiny budget, into a results folder of its own: other tests may distil students of the same name
into the shared workspace, and a student that changed under these tests would make them flaky. The teachers
and the preprocessed data are shared read-only (`-t` names the teacher folder).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STUDENT_FOLD = 0
REDUCTION = 2
ALPHA = 0.3
TEMPERATURE = 3.0
STUDENT_BUDGET = ("-e", "1", "--iterations_per_epoch", "2", "--val_iterations", "1")
STUDENT_FOLDER = "nnUNetDistillationTrainer__nnUNetPlans_r2__3d_fullres"


@dataclass(frozen=True)
class Student:
    dataset: object  # tests.conftest.NnUNetDataset
    teachers: object  # tests.conftest.Teachers
    results: Path

    @property
    def model_dir(self) -> Path:
        return self.results / self.dataset.dataset_name / STUDENT_FOLDER

    @property
    def fold_dir(self) -> Path:
        return self.model_dir / f"fold_{STUDENT_FOLD}"

    @property
    def env(self) -> dict[str, str]:
        return {**self.dataset.env, "nnUNet_results": str(self.results)}

    def copy_to(self, results_root: Path) -> Path:
        """A private copy of the student's model folder (for tests that damage it); returns the fold
        folder."""
        target = results_root / self.dataset.dataset_name / STUDENT_FOLDER
        shutil.copytree(self.model_dir, target, ignore=shutil.ignore_patterns("validation*", "*.png"))
        return target / f"fold_{STUDENT_FOLD}"


_BUILT: dict[Path, Student] = {}


def distilled_student(dataset, teachers, tmp_path_factory) -> Student:
    key = dataset.root
    if key not in _BUILT:
        from nnunet_distill.nnunet_env import nnunet_executable, run_logged

        results = tmp_path_factory.mktemp("onnx_student_results")
        env = {**dataset.env, "nnUNet_results": str(results)}
        argv = [
            nnunet_executable("nnUNetv2_distillation_train"),
            "-d",
            str(dataset.dataset_id),
            "-f",
            str(STUDENT_FOLD),
            "-r",
            str(REDUCTION),
            "-a",
            str(ALPHA),
            "-temp",
            str(TEMPERATURE),
            "-tf",
            *map(str, teachers.folds),
            "-t",
            str(teachers.folder),
            *STUDENT_BUDGET,
            "-d_device",
            "cpu",
        ]
        run_logged(argv, env, dataset.log, timeout=900)
        _BUILT[key] = Student(dataset, teachers, results)
    return _BUILT[key]


def run_cli(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def console(name: str) -> str:
    from nnunet_distill.nnunet_env import nnunet_executable

    return nnunet_executable(name)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def read_segmentation(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_per_label(reference: np.ndarray, candidate: np.ndarray, labels) -> dict[int, float]:
    """Dice of each label; 1.0 where both are empty (the segmentations agree that the label is absent)."""
    out = {}
    for label in labels:
        a, b = reference == label, candidate == label
        denominator = a.sum() + b.sum()
        out[int(label)] = 1.0 if denominator == 0 else float(2 * np.logical_and(a, b).sum() / denominator)
    return out
