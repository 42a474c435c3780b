"""Names and folders shared by the trainer, the exporter and the operator's plan.

The original tool wrote every reduction factor into the same results folder and left the teacher's
plans.json beside the student, so artifacts were not self-describing. Here the student gets a plans
identifier of its own that encodes r (and the ResEnc block strategy), so the folder name alone says
which student it holds and stock nnU-Net tools rebuild the right network from its plans.json.
"""

from __future__ import annotations

from pathlib import Path

DISTILL_TRAINER = "nnUNetDistillationTrainer"
DISTILL_TRAINER_DA5 = "nnUNetDistillationTrainerDA5"
DEFAULT_CONFIGURATION = "3d_fullres"
DEFAULT_TEACHER_TRAINER = "nnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_RESENC_TEACHER_PLANS = "nnUNetResEncUNetLPlans"
BLOCK_STRATEGIES = ("reduce", "keep", "increase", "adaptive")


def student_plans_identifier(
    base_plans: str, reduction_factor: int, block_strategy: str | None = None
) -> str:
    """`nnUNetPlans` + r=2 -> `nnUNetPlans_r2`; ResEnc students add the block strategy unless it is `keep`."""
    if reduction_factor < 1:
        raise ValueError(f"reduction factor must be >= 1, got {reduction_factor}")
    name = f"{base_plans}_r{reduction_factor}"
    if block_strategy is not None and block_strategy != "keep":
        if block_strategy not in BLOCK_STRATEGIES:
            raise ValueError(f"block strategy must be one of {BLOCK_STRATEGIES}, got {block_strategy!r}")
        name += f"_bs{block_strategy}"
    return name


def distill_trainer_name(use_da5: bool) -> str:
    return DISTILL_TRAINER_DA5 if use_da5 else DISTILL_TRAINER


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's own `<trainer>__<plans>__<configuration>` convention."""
    return f"{trainer}__{plans}__{configuration}"


def student_model_folder(
    results_dataset_dir: str | Path, plans_identifier: str, configuration: str, use_da5: bool
) -> Path:
    return Path(results_dataset_dir) / model_folder_name(
        distill_trainer_name(use_da5), plans_identifier, configuration
    )
