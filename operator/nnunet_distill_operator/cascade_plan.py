"""The stages a `3d_cascade_fullres` job adds, in nnU-Net's cascade order (pure, like plan.py).

nnU-Net's cascade trains 3d_lowres first: its final validation writes each case's lowres segmentation
(`predicted_next_stage`), and a 3d_cascade_fullres fold reads those of every case it trains and validates on,
under the same trainer and plans name. Every case is validated by exactly one fold, so the lowres stage needs
all folds of the cross-validation (`teachers.numFolds`), both for the teachers and for the students:

1. preprocess `-c 3d_lowres 3d_fullres` (the cascade reads 3d_fullres data, which it inherits);
2. `teachers-lowres`: every lowres teacher fold, when the operator trains teachers;
3. `teachers`: the cascade teacher folds;
4. `distill-lowres`: the lowres student on every fold, one command per fold on the distill stage's GPUs
   (one node: the folds are short runs; each resumes with -c_continue after a restart);
5. `distill`: the cascade student, whose held-out scoring segments the test cases with the student's own
   lowres fold and the teachers' lowres folds; then export, gate and publish as for any configuration.
"""

from __future__ import annotations

from collections.abc import Callable

from nnunet_distill_operator import api

CASCADE = "3d_cascade_fullres"
LOWRES = "3d_lowres"
#: What a cascade preprocesses: its previous stage's data and the full-resolution data it inherits.
CASCADE_DATA = (LOWRES, "3d_fullres")


def is_cascade(spec: api.DistillationJobSpec) -> bool:
    return spec.configuration == CASCADE


def preprocess_configurations(spec: api.DistillationJobSpec) -> tuple[str, ...]:
    """The `-c` values of nnUNetv2_plan_and_preprocess (and the data folders `nnUNetPlans_<c>` it makes)."""
    return CASCADE_DATA if is_cascade(spec) else (spec.configuration,)


def lowres_teachers_spec(spec: api.DistillationJobSpec) -> api.DistillationJobSpec:
    """The job for the cascade's lowres teachers: every fold (nnU-Net needs each case's lowres segmentation,
    and each case is validated by one fold)."""
    teachers = spec.teachers.model_copy(update={"folds": list(range(spec.teachers.num_folds))})
    return spec.model_copy(update={"configuration": LOWRES, "teachers": teachers})


def lowres_student_spec(spec: api.DistillationJobSpec, fold: int) -> api.DistillationJobSpec:
    """The job for one fold of the cascade's lowres student: the same teacher folds as the cascade student
    (those of the lowres teachers), on a single node."""
    distillation = spec.distillation.model_copy(update={"fold": fold})
    resources = spec.resources.model_copy(
        update={"distill": spec.resources.distill.model_copy(update={"nodes": None})}
    )
    return spec.model_copy(
        update={"configuration": LOWRES, "distillation": distillation, "resources": resources}
    )


def _renamed(stage, name: str, description: str):
    return type(stage)(**{**stage.__dict__, "name": name, "description": description})


def lowres_teachers(spec: api.DistillationJobSpec, build: Callable):
    """`teachers-lowres` (plan._teachers of the lowres teachers' spec), before the cascade teachers; None
    when the job is no cascade or trains no teachers."""
    if not is_cascade(spec):
        return None
    stage = build(lowres_teachers_spec(spec))
    if stage is None:
        return None
    return _renamed(stage, "teachers-lowres", f"{LOWRES} stage of the cascade: {stage.description}")


def lowres_students(spec: api.DistillationJobSpec, build: Callable):
    """`distill-lowres`: the lowres student on every fold (plan._distill of each fold's spec), one
    command after another; None when the job is no cascade."""
    if not is_cascade(spec):
        return None
    folds = range(spec.teachers.num_folds)
    stages = [build(lowres_student_spec(spec, fold)) for fold in folds]
    commands = tuple(
        type(s.commands[-1])(f"distill-lowres-fold{fold}", s.commands[-1].argv)
        for fold, s in zip(folds, stages, strict=True)
    )
    first = stages[0]
    description = (
        f"{LOWRES} stage of the cascade: distill the lowres student on folds "
        f"{' '.join(map(str, folds))} (its segmentations are the cascade student's input)"
    )
    return type(first)(
        **{**first.__dict__, "name": "distill-lowres", "description": description, "commands": commands}
    )
