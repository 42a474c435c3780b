"""Shared by the slow distillation tests: run the real console scripts, read checkpoints, and run nnU-Net's
stock predictor in a process where importing ``nnunet_distill`` is impossible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from nnunet_distill.nnunet_env import Workspace

from tests.conftest import CONFIGURATION

#: The r=2 student of the default plans that the resumable runs below train.
STUDENT_FOLDER = f"nnUNetDistillationTrainer__nnUNetPlans_r2__{CONFIGURATION}"

# Run as a script by `stock_predict`: nnU-Net's own nnUNetv2_predict entry point, with every import of our
# package refused, so the student must load from its plans.json and a stock trainer name alone.
_BLOCKED_PREDICT = r"""
import sys

class _RefuseOurPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "nnunet_distill" or name.startswith("nnunet_distill."):
            raise ImportError("nnunet_distill must not be needed to predict with a distilled student")
        return None

sys.meta_path.insert(0, _RefuseOurPackage())

if __name__ == "__main__":  # nnU-Net's spawn workers re-import this file
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    sys.argv = ["nnUNetv2_predict", *sys.argv[1:]]
    predict_entry_point()
    assert not [m for m in sys.modules if m.startswith("nnunet_distill")]
    print("STOCK_PREDICT_OK")
"""


def console_script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def private_workspace(nnunet_teachers, root: Path) -> Workspace:
    """A private copy of the session workspace (preprocessed data + trained teachers) at ``root``, without the
    raw data and without the students other tests distilled into it: a pod that starts with none."""
    shutil.copytree(
        nnunet_teachers.dataset.root,
        root,
        ignore=shutil.ignore_patterns("nnUNet_raw", "fixtures.log", "nnUNetDistillationTrainer*"),
    )
    return Workspace(root)


def resumable_distill_argv(epochs: int, iterations: int) -> list[str]:
    """The student's command in a pod that may be killed and restarted: fold 0, r=2 on the CPU, -c_continue
    (a fresh start when there is no checkpoint yet)."""
    return [
        console_script("nnUNetv2_distillation_train"),
        *("-d", "901", "-c", CONFIGURATION, "-f", "0", "-a", "0.3", "-temp", "3.0", "-r", "2"),
        *("-e", str(epochs), "--iterations_per_epoch", str(iterations), "--val_iterations", "1"),
        *("-d_device", "cpu", "-disable_mirroring", "-c_continue"),
    ]


def run_cli(argv: list[str], env: dict, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command, keep its full output in ``log`` (appended), return the completed process."""
    proc = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n[rc={proc.returncode}]\n{proc.stdout}\n{proc.stderr}\n")
    return proc


def require_ok(proc: subprocess.CompletedProcess, log: Path) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{proc.args[0]} failed ({proc.returncode}); see {log}:\n{proc.stderr[-3000:]}"
    )
    return proc


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def stock_predict(
    tmp_dir: Path,
    env: dict,
    log: Path,
    input_dir: Path,
    output_dir: Path,
    dataset_id: int,
    trainer: str,
    plans: str,
    fold: int,
    configuration: str = "3d_fullres",
    extra: Sequence[str] = (),
):
    script = tmp_dir / "stock_predict.py"
    script.write_text(_BLOCKED_PREDICT)
    argv = [
        sys.executable,
        str(script),
        "-i",
        str(input_dir),
        "-o",
        str(output_dir),
        "-d",
        str(dataset_id),
        "-c",
        configuration,
        "-tr",
        trainer,
        "-p",
        plans,
        "-f",
        str(fold),
        "-device",
        "cpu",
        "-npp",
        "1",
        "-nps",
        "1",
        "--disable_progress_bar",
        *extra,
    ]
    return require_ok(run_cli(argv, env, log), log)
