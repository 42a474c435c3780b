"""`nnunet-distill demo`: the whole product on one machine in minutes, ending with a comparison table.

It runs the embedded DistillationJob (demo.yaml) through the local executor, preceded by one extra
stage that writes a synthetic nnU-Net dataset. Everything goes under the workdir (default ./.demo):
`data/` (nnUNet_raw, nnUNet_preprocessed, nnUNet_results), `run/` (logs, status.yaml, export, package).
Rerunning skips what is already there (dataset, preprocessing, trained teacher folds).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnunet_distill_operator import api
from nnunet_distill_operator.plan import (
    Command,
    DataPaths,
    Stage,
    StageResources,
    export_paths,
    student_model_folder,
    teacher_model_folder,
)

DEMO_JOB = Path(__file__).with_name("demo.yaml")
DEMO_DATASET_NAME = "DemoSpheres"
CPU_FRIENDLY_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}


def synthetic_stage(spec: api.DistillationJobSpec, paths: DataPaths) -> Stage:
    d = spec.dataset.id
    argv = ("nnunet-distill", "synthetic", "-d", str(d), "--name", DEMO_DATASET_NAME, "--cases", "16",
            "--test-cases", "4", "--seed", "0")
    return Stage(name="synthetic", description=f"write the synthetic Dataset{d:03d}_{DEMO_DATASET_NAME}",
                 commands=(Command("synthetic", argv),), resources=StageResources(0, "1", "1Gi", 0),
                 done_when_exists=(f"{paths.raw}/Dataset{d:03d}_*/dataset.json",))


def demo_paths(workdir: Path) -> DataPaths:
    data = workdir.resolve() / "data"
    return DataPaths(str(data / "nnUNet_raw"), str(data / "nnUNet_preprocessed"), str(data / "nnUNet_results"),
                     str(workdir.resolve() / "run"))


def _validation_dice(pattern: str) -> float | None:
    """Mean foreground Dice from nnU-Net's validation/summary.json files matching `pattern`."""
    values = []
    for path in sorted(glob.glob(pattern)):
        try:
            summary = json.loads(Path(path).read_text())
            values.append(float(summary["foreground_mean"]["Dice"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sum(values) / len(values) if values else None


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def summary_rows(spec: api.DistillationJobSpec, paths: DataPaths, status: dict[str, Any]
                 ) -> list[tuple[str, str, str]]:
    """(what, teacher, student) rows for the final table, from the run's status and nnU-Net's outputs."""
    results = f"{paths.results}/Dataset{spec.dataset.id:03d}_*"
    folds = spec.teacher_folds or ()
    teacher_glob = f"{results}/{teacher_model_folder(spec)}/fold_*/validation/summary.json"
    if folds:
        per_fold = [_validation_dice(f"{results}/{teacher_model_folder(spec)}/fold_{f}/validation/summary.json")
                    for f in folds]
        known = [v for v in per_fold if v is not None]
        teacher_dice = sum(known) / len(known) if known else None
    else:
        teacher_dice = _validation_dice(teacher_glob)
    student_dice = _validation_dice(f"{results}/{student_model_folder(spec)}/fold_{spec.distillation.fold}/"
                                    "validation/summary.json")
    metrics = status.get("metrics") or {}
    teacher_dice = metrics.get("teacherDice", teacher_dice)
    student_dice = metrics.get("finalDice", student_dice)
    artifacts = status.get("artifacts") or {}
    _, onnx_file, package_dir = export_paths(paths)
    onnx = artifacts.get("onnx") or onnx_file
    size = Path(onnx).stat().st_size if Path(onnx).is_file() else artifacts.get("sizeBytes")
    retention = metrics.get("retention")
    if retention is None and teacher_dice and student_dice is not None:
        retention = student_dice / teacher_dice
    rows = [
        ("validation Dice (fg mean)", _fmt(teacher_dice), _fmt(student_dice)),
        ("Dice retention", "", f"{retention:.1%}" if isinstance(retention, (int, float)) else "n/a"),
        ("parameters", _fmt(artifacts.get("teacherParameters")), _fmt(artifacts.get("studentParameters"))),
        ("model folder", teacher_model_folder(spec) + f" (folds {' '.join(map(str, folds)) or 'auto'})",
         student_model_folder(spec) + f" (fold {spec.distillation.fold})"),
        ("ONNX", "", f"{onnx}" + (f" ({size / 1e6:.1f} MB)" if isinstance(size, int) else "")),
        ("package", "", artifacts.get("package") or package_dir),
    ]
    if artifacts.get("uri"):
        rows.append(("published", "", artifacts["uri"]))
    rows.append(("status / logs", "", f"{Path(paths.work) / 'status.yaml'} / {Path(paths.work) / 'logs'}"))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("", "teachers", "student")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    def row(cells: tuple[str, ...]) -> str:
        # one space of padding each side, so every "|" sits under a "+" of the rule lines
        return " " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " "

    out = [line, row(header), line, *(row(r) for r in rows)]
    out.append(line)
    return "\n".join(out)


def run_demo(name: str, spec: api.DistillationJobSpec, *, workdir: Path, clean: bool, device: str,
             run_local: Callable[..., dict[str, Any]]) -> int:
    if clean and workdir.exists():
        shutil.rmtree(workdir)
    for key, value in CPU_FRIENDLY_ENV.items():
        if device == "cpu":
            os.environ.setdefault(key, value)
    paths = demo_paths(workdir)
    status = run_local(name, spec, paths, device, extra_first=[synthetic_stage(spec, paths)])
    print()
    print(f"DistillationJob {name}: {status.get('phase')}")
    print(format_table(summary_rows(spec, paths, status)))
    return 0
