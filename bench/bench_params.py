"""Teacher vs student parameter counts for r = 2, 4, 8 on architectures planned by nnU-Net itself.

A synthetic dataset of two 192^3 cases (1 mm) is fingerprinted and planned by nnU-Net's default planner
and its ResEnc M/L/XL planners (nothing is trained or preprocessed): 6 stages of up to 320 channels, the
size class nnU-Net plans for real CT/MR data. Each teacher and each student (standard: channels / r;
ResEnc: also every block strategy) is built with nnU-Net's own `build_network_architecture` from its plans
and its parameters are counted. The tiny 48^3 demo dataset's 4-stage plans are listed too.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

SIZES = {"realistic": ("192", "192", "192"), "demo": ("48", "48", "48")}
BOUND = {2: 0.26, 4: 0.07, 8: 0.02}
PLANNERS = {
    "nnUNetPlans": None,
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
}
CFG = "3d_fullres"


def plan_dataset(root: Path, dataset_id: int, name: str, size: tuple[str, str, str]) -> tuple[dict, dict]:
    """Write a synthetic dataset, extract its fingerprint and plan it with every planner.

    Returns (plans identifier -> plans, dataset.json).
    """
    import json

    from nnunet_distill.nnunet_env import Workspace, nnunet_executable, run_logged

    workspace = Workspace(root / name).create()
    env = {**workspace.env(), "nnUNet_n_proc_DA": "1"}  # nnU-Net's planners set torch threads to n_proc_DA
    log = workspace.root / "bench.log"
    run_logged(
        [
            sys.executable,
            "-m",
            "nnunet_distill.cli.synthetic",
            "-d",
            str(dataset_id),
            "--name",
            name,
            "--cases",
            "2",
            "--test-cases",
            "0",
            "--size",
            *size,
        ],
        env,
        log,
    )
    run_logged(
        [nnunet_executable("nnUNetv2_extract_fingerprint"), "-d", str(dataset_id), "-np", "2"], env, log
    )
    for planner in PLANNERS.values():
        run_logged(
            [
                nnunet_executable("nnUNetv2_plan_experiment"),
                "-d",
                str(dataset_id),
                *(["-pl", planner] if planner else []),
            ],
            env,
            log,
        )
    folder = workspace.preprocessed / f"Dataset{dataset_id:03d}_{name}"
    dataset_json = json.loads((workspace.raw / folder.name / "dataset.json").read_text())
    return {
        identifier: json.loads((folder / f"{identifier}.json").read_text()) for identifier in PLANNERS
    }, dataset_json


def table(label: str, all_plans: dict, dataset_json: dict) -> list[str]:
    from nnunet_distill.student import build_network, count_parameters, derive_student_plans

    rows = [
        (
            f"{'plans (' + label + ')':30s} {'patch':>15s} {'-bs':>9s} {'r':>2s} {'features per stage':>30s} "
            f"{'blocks':>20s} {'parameters':>12s} {'ratio':>7s} {'1/r^2':>7s} {'bound':>6s}"
        )
    ]
    for identifier, plans in all_plans.items():
        kwargs = plans["configurations"][CFG]["architecture"]["arch_kwargs"]
        patch = "x".join(str(p) for p in plans["configurations"][CFG]["patch_size"])
        teacher = count_parameters(build_network(plans, CFG, dataset_json))
        rows.append(
            f"{identifier:30s} {patch:>15s} {'teacher':>9s} {'':>2s} {kwargs['features_per_stage']!s:>30s} "
            f"{kwargs.get('n_blocks_per_stage', '-')!s:>20s} {teacher:>12,d} {1.0:>7.4f}"
        )
        strategies = ["keep", "reduce", "increase", "adaptive"] if "n_blocks_per_stage" in kwargs else [None]
        for r in (2, 4, 8):
            for strategy in strategies:
                student_plans = derive_student_plans(plans, CFG, r, strategy)
                skw = student_plans["configurations"][CFG]["architecture"]["arch_kwargs"]
                n = count_parameters(build_network(student_plans, CFG, dataset_json))
                ratio = n / teacher
                verdict = "ok" if ratio <= BOUND[r] else ("over" if strategy != "increase" else "(deeper)")
                rows.append(
                    f"{'':30s} {'':>15s} {strategy or '-':>9s} {r:>2d} {skw['features_per_stage']!s:>30s} "
                    f"{skw.get('n_blocks_per_stage', '-')!s:>20s} {n:>12,d} {ratio:>7.4f} "
                    f"{1 / r**2:>7.4f} {verdict:>6s}"
                )
    return rows


def main() -> None:
    print(__doc__.strip().splitlines()[0])
    print(
        f"bounds (student/teacher): {', '.join(f'r={r}: <= {b}' for r, b in BOUND.items())}; "
        "`increase` is the deeper-than-teacher-depth strategy and is not held to them."
    )
    with tempfile.TemporaryDirectory(prefix="bench_params_") as tmp:
        for dataset_id, (label, size) in zip((951, 952), SIZES.items(), strict=False):
            start = time.perf_counter()
            all_plans, dataset_json = plan_dataset(Path(tmp), dataset_id, label.capitalize(), size)
            planned = time.perf_counter() - start
            print(
                f"\n{label}: {'x'.join(size)} voxels, planned in {planned:.0f} s "
                f"({len(dataset_json['labels'])} labels, {len(dataset_json['channel_names'])} channel)"
            )
            print("\n".join(table(label, all_plans, dataset_json)))


if __name__ == "__main__":
    main()
