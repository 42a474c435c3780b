"""`nnunet-distill run --local` end to end with the real trainer (slow: real nnU-Net training on CPU).

Reuses the session's planned dataset and trained teacher folds (tests/conftest.py), so preprocessing and
teacher training are skipped by the stages' own "outputs present" checks — the path a rerun takes — and
the student is distilled (tiny budget), exported to ONNX, packaged, judged by the quality gate (reporting
only: a student of two iterations is not expected to pass it; tests/operator/test_quality_gate.py covers
blocking) and published to a file:// bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_run_local_distills_exports_packages_and_publishes(nnunet_teachers, tmp_path: Path) -> None:
    dataset = nnunet_teachers.dataset
    bucket = tmp_path / "bucket"
    job = {
        "apiVersion": "distillation.nnunet.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "local-e2e"},
        "spec": {
            "dataset": {"id": dataset.dataset_id},
            "storage": {"claimName": "unused-locally"},
            "preprocess": {"mode": "IfMissing", "processes": 1},
            "teachers": {
                "train": True,
                "folds": list(nnunet_teachers.folds),
                "training": {"epochs": 2, "iterationsPerEpoch": 4, "valIterations": 2},
            },
            # r=6: a student folder of its own, so no other test's student is touched
            "student": {"reductionFactor": 6},
            "distillation": {
                "epochs": 1,
                "iterationsPerEpoch": 2,
                "valIterations": 1,
                "fold": 0,
                "disableMirroring": True,
            },  # no test-time mirroring: a faster final validation
            "export": {"modelName": "local-e2e"},
            "qualityGate": {"enforce": False},
            "output": {"uri": f"file://{bucket}"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "nnunet-distill"),
            "run",
            str(path),
            "--local",
            "--raw",
            str(dataset.raw),
            "--preprocessed",
            str(dataset.preprocessed),
            "--results",
            str(dataset.results),
            "--workdir",
            str(workdir),
            "--device",
            "cpu",
        ],
        env={**os.environ, **dataset.env},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = result.stdout
    assert "[preprocess] outputs already present; skipping" in out
    assert (
        "[teachers:0] outputs already present; skipping" in out
        and "[teachers:1] outputs already present" in out
    )
    assert "[distill] $ nnUNetv2_distillation_train" in out and "-d_device cpu" in out

    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded"
    assert list(status["stages"]) == ["preprocess", "teachers", "distill", "export", "gate", "publish"]
    assert [s["state"] for s in status["stages"].values()] == ["Succeeded"] * 6
    assert "[gate] $ nnunet-distill gate --summary" in out and "--no-enforce" in out
    gate = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert gate["reason"] in ("QualityGatePassed", "QualityGateNotEnforced")
    assert "evaluated on test_set: 4 cases (imagesTs)" in gate["message"]
    assert status["stages"]["teachers"]["reason"] == "AlreadyDone"
    assert status["progress"]["stage"] == "distill" and status["progress"]["epoch"] == 1
    assert status["artifacts"]["studentParameters"] < status["artifacts"]["teacherParameters"]
    assert status["artifacts"]["uri"].startswith(f"file://{bucket}")
    assert isinstance(status["metrics"]["finalDice"], float)
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"

    student = dataset.results_dataset / "nnUNetDistillationTrainer__nnUNetPlans_r6__3d_fullres" / "fold_0"
    assert (student / "checkpoint_final.pth").is_file()
    assert (workdir / "export" / "model.onnx").is_file()
    assert (workdir / "package" / "SHA256SUMS").is_file()
    latest = (bucket / "LATEST").read_text().strip()
    published = json.loads((bucket / latest / "_PUBLISHED").read_text())
    assert published["files"]
