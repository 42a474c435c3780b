"""Where a job's teachers and student live in nnUNet_results, from the spec through the shared contract.

The names are the trainer's (`nnunet_distill.contract`): the student's plans name says its teacher plans,
r, and its base plans and block strategy where they are not the default, so students of different teachers
or settings never share a folder. The stages that read a student's files (export, gate, demo) find it here.
"""

from __future__ import annotations

from nnunet_distill.contract import student_model_folder_name

from nnunet_distill_operator import api


def student_model_folder(spec: api.DistillationJobSpec) -> str:
    """`<trainer>__<studentPlans>__<configuration>`: the student's folder in nnUNet_results/DatasetXXX."""
    block = spec.student.block_strategy if spec.student.architecture == "resenc" else None
    return student_model_folder_name(
        spec.teacher_plans,
        spec.student.reduction_factor,
        block,
        spec.configuration,
        spec.distillation.use_da5,
        student_base_plans=spec.student_base_plans,
    )


def teacher_model_folder(spec: api.DistillationJobSpec) -> str:
    return f"{spec.teachers.trainer}__{spec.teacher_plans}__{spec.configuration}"
