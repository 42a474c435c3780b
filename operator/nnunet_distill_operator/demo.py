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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnunet_distill.contract import CPU_FRIENDLY_ENV

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
DEMO_DATASET_NAME = "DemoOrgan"
# : An organ, a small lesion in it and a thin vessel (32^3 voxels): small enough to train well on 2 CPU cores
# in : minutes, with the two kinds of structure a thinner student loses first. 6 labelled held-out test cases.
SYNTHETIC_ARGS = (
    "--layout",
    "organ",
    "--cases",
    "16",
    "--test-cases",
    "6",
    "--size",
    "32",
    "32",
    "32",
    "--seed",
    "0",
)
FIGURE_NAME = "demo.png"


def synthetic_stage(spec: api.DistillationJobSpec, paths: DataPaths) -> Stage:
    d = spec.dataset.id
    argv = ("nnunet-distill", "synthetic", "-d", str(d), "--name", DEMO_DATASET_NAME, *SYNTHETIC_ARGS)
    return Stage(
        name="synthetic",
        description=f"write the synthetic Dataset{d:03d}_{DEMO_DATASET_NAME}",
        commands=(Command("synthetic", argv),),
        resources=StageResources(0, "1", "1Gi", 0),
        done_when_exists=(f"{paths.raw}/Dataset{d:03d}_*/dataset.json",),
    )


def demo_paths(workdir: Path) -> DataPaths:
    data = workdir.resolve() / "data"
    return DataPaths(
        str(data / "nnUNet_raw"),
        str(data / "nnUNet_preprocessed"),
        str(data / "nnUNet_results"),
        str(workdir.resolve() / "run"),
    )


def summary_path(spec: api.DistillationJobSpec, paths: DataPaths) -> Path | None:
    """The student's distillation_summary.json (the distill stage's held-out evaluation), if it exists."""
    pattern = (
        f"{paths.results}/Dataset{spec.dataset.id:03d}_*/{student_model_folder(spec)}/"
        f"fold_{spec.distillation.fold}/validation/distillation_summary.json"
    )
    found = sorted(glob.glob(pattern))
    return Path(found[0]) if found else None


def teacher_checkpoints(spec: api.DistillationJobSpec, paths: DataPaths) -> list[str]:
    folds = spec.teacher_folds or ()
    base = f"{paths.results}/Dataset{spec.dataset.id:03d}_*/{teacher_model_folder(spec)}"
    found = sorted(glob.glob(f"{base}/fold_*/checkpoint_final.pth"))
    return [
        f for f in found if not folds or any(f.endswith(f"/fold_{k}/checkpoint_final.pth") for k in folds)
    ]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def summary_rows(
    spec: api.DistillationJobSpec, paths: DataPaths, status: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """(what, teachers, student) rows for the final table, from the held-out evaluation and the run's
    status."""
    path = summary_path(spec, paths)
    summary = json.loads(path.read_text()) if path is not None else {}
    return _accuracy_rows(summary, status) + _model_rows(spec, paths, status, summary)


def _accuracy_rows(summary: dict[str, Any], status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Which cases, Dice per label and mean, retention, the gate's verdict."""
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    ret = summary.get("retention") or {}
    cases = summary.get("cases") or {}
    rows: list[tuple[str, str, str]] = []
    if summary.get("evaluation") == "test_set":
        rows.append(
            (
                "held-out cases",
                f"{cases.get('count')} of {cases.get('source')} (no model trained on them)",
                f"mirroring TTA {'on' if cases.get('mirroring_tta') else 'off'}",
            )
        )
    elif summary:
        rows.append(("evaluated on", str(summary.get("note")), ""))
    per_ret = ret.get("per_label") or {}
    for name, s_dice in (student.get("dice") or {}).items():
        t_dice = (teacher.get("dice") or {}).get(name)
        r = per_ret.get(name)
        rows.append((f"Dice {name}", _fmt(t_dice), _fmt(s_dice) + (f"  (retention {r:.1%})" if r else "")))
    rows.append(("Dice mean", _fmt(teacher.get("mean_dice")), _fmt(student.get("mean_dice"))))
    rows.append(
        (
            "retention (mean / worst label)",
            "",
            f"{ret['mean']:.1%} / {ret.get('worst_label')} {ret['worst']:.1%}"
            if ret
            else "n/a (no honest baseline)",
        )
    )
    gate = next((c for c in status.get("conditions") or () if c.get("type") == "QualityGate"), None)
    if gate is not None:
        rows.append(("quality gate", "", f"{gate.get('reason')}"))
    return rows


def _model_rows(
    spec: api.DistillationJobSpec, paths: DataPaths, status: dict[str, Any], summary: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """Sizes, inference time, where the models, the export and the package are."""
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    cases = summary.get("cases") or {}
    rows: list[tuple[str, str, str]] = []
    artifacts = status.get("artifacts") or {}
    folds = teacher.get("folds") or list(spec.teacher_folds or ())
    t_params = teacher.get("parameters_per_fold") or artifacts.get("teacherParameters")
    s_params = student.get("parameters") or artifacts.get("studentParameters")
    rows.append(
        ("parameters", f"{_fmt(t_params)} x {len(folds)} folds" if t_params else "n/a", _fmt(s_params))
    )
    inference = summary.get("inference") or {}
    if inference.get("speedup"):
        rows.append(
            (
                f"inference, {cases.get('count')} cases ({inference.get('device')})",
                f"{inference['teacher_ensemble_seconds']:.1f} s",
                f"{inference['student_seconds']:.1f} s  ({inference['speedup']:.1f}x faster)",
            )
        )
    rows.append(
        (
            "model folder",
            teacher_model_folder(spec) + f" (folds {' '.join(map(str, folds)) or 'auto'})",
            student_model_folder(spec) + f" (fold {spec.distillation.fold})",
        )
    )
    _, onnx_file, package_dir = export_paths(paths)
    onnx = artifacts.get("onnx") or onnx_file
    size = Path(onnx).stat().st_size if Path(onnx).is_file() else artifacts.get("sizeBytes")
    rows.append(("ONNX", "", f"{onnx}" + (f" ({size / 1e6:.1f} MB)" if isinstance(size, int) else "")))
    rows.append(("package", "", artifacts.get("package") or package_dir))
    if artifacts.get("uri"):
        rows.append(("published", "", artifacts["uri"]))
    rows.append(("status / logs", "", f"{Path(paths.work) / 'status.yaml'} / {Path(paths.work) / 'logs'}"))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("", "teacher ensemble", "student")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)

    def row(cells: tuple[str, ...]) -> str:
        # one space of padding each side, so every "|" sits under a "+" of the rule lines
        return " " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + " "

    out = [line, row(header), line, *(row(r) for r in rows)]
    out.append(line)
    return "\n".join(out)


def draw_figure(spec: api.DistillationJobSpec, paths: DataPaths) -> Path | None:
    """The demo picture (`nnunet-distill figure`, a trainer command): None, with the reason printed, if it
    fails."""
    import subprocess

    from nnunet_distill_operator.local import resolve_executable

    path = summary_path(spec, paths)
    if path is None:
        return None
    out = Path(paths.work) / FIGURE_NAME
    argv = [
        resolve_executable("nnunet-distill"),
        "figure",
        "--summary",
        str(path),
        "-o",
        str(out),
        "--teacher-checkpoints",
        *teacher_checkpoints(spec, paths),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"figure not drawn: {(done.stderr or done.stdout).strip()}")
        return None
    return out


def run_demo(
    name: str,
    spec: api.DistillationJobSpec,
    *,
    workdir: Path,
    clean: bool,
    device: str,
    run_local: Callable[..., dict[str, Any]],
) -> int:
    if clean and workdir.exists():
        shutil.rmtree(workdir)
    for key, value in CPU_FRIENDLY_ENV.items():
        if device == "cpu":
            os.environ.setdefault(key, value)
    paths = demo_paths(workdir)
    started = time.perf_counter()
    status = run_local(name, spec, paths, device, extra_first=[synthetic_stage(spec, paths)])
    figure = draw_figure(spec, paths)
    print()
    print(
        f"DistillationJob {name}: {status.get('phase')} in {time.perf_counter() - started:.0f} s"
        + (
            f" ({status.get('reason')}: {status.get('message')})"
            if status.get("phase") != "Succeeded"
            else ""
        )
    )
    print(format_table(summary_rows(spec, paths, status)))
    if figure is not None:
        print(f"picture: {figure}")
    return 0 if status.get("phase") == "Succeeded" else 1
