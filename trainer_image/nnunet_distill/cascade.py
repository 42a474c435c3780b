"""nnU-Net's cascade (3d_lowres -> 3d_cascade_fullres) for distilled students: where each stage's
previous-stage segmentations come from, and the checks that refuse a cascade run before it trains.

nnU-Net itself does the cascade's work, and nothing of it is repeated here:

* a configuration with ``next_stage`` (3d_lowres) writes ``predicted_next_stage/<next stage>/<case>`` for its
  validation cases at the end of training (``nnUNetTrainer.perform_actual_validation``), since the student
  plans keep nnU-Net's ``next_stage``/``previous_stage`` keys (``student.derive_student_plans``);
* a configuration with ``previous_stage`` (3d_cascade_fullres) reads them from
  ``<trainer>__<plans>__<previous stage>/predicted_next_stage/<configuration>`` under the *same* trainer
  class and plans name (``nnUNetTrainer.folder_with_segs_from_previous_stage``), for every training and
  validation case of its fold, and its data loader appends their one-hot encoding to the image channels.
  The teachers get that same batch (image + one-hot), and they are built with nnU-Net's cascade input
  channel count (``determine_num_input_channels``, in ``nnunet_env.network_from_plans``).

So a cascade student needs lowres students on every fold whose validation split holds one of its cases
(in nnU-Net's 5-fold split: all five), and its held-out scoring needs lowres models for the test cases: the
teachers' lowres folds for the teacher ensemble, the student's own lowres fold for the student. The summary
records which models produced the previous-stage segmentations (:func:`previous_stage_record`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import contract

#: The sub-folder of a lowres model folder where nnU-Net's final validation writes the next stage's input.
PREDICTED_NEXT_STAGE = "predicted_next_stage"
CHECKPOINT = "checkpoint_final.pth"


class CascadeError(RuntimeError):
    """A cascade stage lacks its previous stage; the message names the missing folder and the fix."""


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def previous_stage(plans: dict, configuration: str) -> str | None:
    """The configuration's ``previous_stage`` (nnU-Net's key, as ``ConfigurationManager`` reads it)."""
    return (plans.get("configurations", {}).get(configuration) or {}).get("previous_stage")


def sibling_model_folder(model_folder: str | Path, configuration: str) -> Path:
    """``<trainer>__<plans>__<configuration>`` beside ``model_folder`` (same trainer and plans): where
    nnU-Net looks for the other stage of a cascade."""
    folder = Path(model_folder)
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise CascadeError(
            f"{folder} is not an nnU-Net model folder named <trainer>__<plans>__<configuration>"
        )
    return folder.parent / contract.model_folder_name(parts[0], parts[1], configuration)


def segs_folder(previous_model_folder: str | Path, configuration: str) -> Path:
    """The previous stage's segmentations for ``configuration``, as nnU-Net's final validation wrote them."""
    return Path(previous_model_folder) / PREDICTED_NEXT_STAGE / configuration


def missing_cases(present_files: Iterable[str], cases: Iterable[str]) -> list[str]:
    """Cases without a file ``<case>.<ext>`` among ``present_files`` (nnU-Net writes .b2nd, .npz or .npy)."""
    stems = {name.split(".", 1)[0] for name in present_files}
    return sorted(set(cases) - stems)


def folds_validating(splits: Sequence[dict], cases: Iterable[str]) -> list[int]:
    """The folds of splits_final.json whose validation split holds any of ``cases``."""
    wanted = set(cases)
    return [i for i, s in enumerate(splits) if wanted & set(s.get("val", ()))]


def missing_folds(model_folder: Path, folds: Iterable[int], present: Iterable[str]) -> list[int]:
    """Folds of ``folds`` without ``fold_N/checkpoint_final.pth`` among the ``present`` relative paths."""
    have = set(present)
    return [f for f in folds if f"fold_{f}/{CHECKPOINT}" not in have]


def previous_stage_record(
    previous: str,
    student: tuple[Path, Sequence[int], Path],
    teacher: tuple[Path, Sequence[int], Path] | None,
    how: str,
) -> dict[str, Any]:
    """The summary's ``previous_stage``: which models made each cascade model's previous-stage input.

    ``student``/``teacher`` are (model folder, folds, folder of the segmentations they produced).
    """

    def one(source: tuple[Path, Sequence[int], Path] | None) -> dict[str, Any] | None:
        if source is None:
            return None
        folder, folds, segs = source
        return {"model_folder": str(folder), "folds": list(folds), "segmentations": str(segs)}

    return {"configuration": previous, "student": one(student), "teacher_ensemble": one(teacher), "how": how}


# ---------------------------------------------------------------------------------------------
# Checks before training (file-system queries)
# ---------------------------------------------------------------------------------------------


def _relative_checkpoints(folder: Path) -> list[str]:
    return (
        [str(p.relative_to(folder)) for p in folder.glob(f"fold_*/{CHECKPOINT}")] if folder.is_dir() else []
    )


def check_student_previous_stage(
    student_folder: Path, configuration: str, previous: str, splits: Sequence[dict], fold: int, dataset: str
) -> Path:
    """The student lowres model's segmentations for every case of the cascade fold, and its own fold for the
    held-out test set; the folder, or a CascadeError that says which lowres folds to distill first."""
    lowres = sibling_model_folder(student_folder, previous)
    segs = segs_folder(lowres, configuration)
    if fold >= len(splits):
        raise CascadeError(f"splits_final.json has no fold {fold}: cannot tell which cases the cascade needs")
    cases = [*splits[fold]["train"], *splits[fold]["val"]]
    missing = missing_cases((p.name for p in segs.iterdir()) if segs.is_dir() else (), cases)
    no_fold = missing_folds(lowres, [fold], _relative_checkpoints(lowres))
    need = sorted(set(folds_validating(splits, missing)) | set(no_fold))
    if not missing and not no_fold:
        return segs
    problem = (
        f"{segs} lacks the {previous} segmentations of {len(missing)} case(s) ({', '.join(missing[:5])})"
        if missing
        else f"{lowres} has no fold_{fold}/{CHECKPOINT} (the held-out scoring segments with it)"
    )
    raise CascadeError(
        f"{problem}: a {configuration} student needs its {previous} student under the same plans first "
        f"(nnU-Net reads the {previous} segmentation of every training and validation case); distill "
        f"{previous} on fold(s) {', '.join(map(str, need)) or 'that validate them'} first "
        f"(nnUNetv2_distillation_train -d {dataset} -c {previous} -f N, with the same -r/-p/-tr flags)"
    )


def check_teacher_previous_stage(
    teacher_folder: Path, previous: str, folds: Sequence[int], dataset: str
) -> Path:
    """The teachers' lowres folds (the cascade ensemble's folds), which segment the held-out cases for the
    teacher cascade; the folder, or a CascadeError naming it and the fix."""
    lowres = sibling_model_folder(teacher_folder, previous)
    absent = missing_folds(lowres, folds, _relative_checkpoints(lowres))
    if absent:
        raise CascadeError(
            f"{lowres} has no {previous} teacher fold(s) {', '.join(map(str, absent))} ({CHECKPOINT}): the "
            f"cascade teachers' held-out scoring needs their own {previous} segmentations; train them first "
            f"(nnunet-distill train-teacher -d {dataset} -c {previous} -f N, same -tr/-p as the cascade "
            "teachers), or pass -t with a teacher folder that has its lowres sibling"
        )
    return lowres


def check_before_training(run) -> None:
    """A cascade distillation (``run``: distill.PreparedRun) refuses to start without its previous stage:
    the student's lowres segmentations of every case of its fold, and the teachers' lowres folds."""
    cfg = run.config
    previous = previous_stage(run.student_plans, cfg.configuration)
    if previous is None:
        return
    splits_file = run.preprocessed_dir / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else []
    dataset = run.dataset_name[7:10].lstrip("0")
    check_student_previous_stage(
        run.output_folder.parent, cfg.configuration, previous, splits, cfg.fold, dataset
    )
    check_teacher_previous_stage(run.teacher_folder, previous, [f.fold for f in run.teacher_folds], dataset)


@dataclass(frozen=True)
class PreviousStage:
    """The previous-stage segmentations each cascade model of a held-out evaluation gets, and the record."""

    student: Path
    teacher: Path
    record: dict[str, Any]


def test_set_inputs(run, cases) -> PreviousStage | None:
    """Held-out test cases (``run``: held_out._Run): the student's lowres fold segments them for the student
    cascade, the teachers' lowres folds (the ensemble's folds) for the teacher cascade; None: no cascade."""
    trainer = run.trainer
    previous = previous_stage(trainer.plans_manager.plans, trainer.configuration_name)
    if previous is None:
        return None
    images = [list(c.images) for c in cases]
    mirroring = run.mirror_axes is not None
    student_lowres = sibling_model_folder(trainer.output_folder_base, previous)
    teacher_lowres = sibling_model_folder(run.teacher_folder, previous)
    out = run.output / "test_set"
    student = predict_previous_stage(
        student_lowres, [trainer.fold], images, out / f"student_{previous}", trainer.device, mirroring
    )
    teacher = predict_previous_stage(
        teacher_lowres,
        run.teacher_folds,
        images,
        out / f"teacher_ensemble_{previous}",
        trainer.device,
        mirroring,
    )
    record = previous_stage_record(
        previous,
        (student_lowres, [trainer.fold], student),
        (teacher_lowres, run.teacher_folds, teacher),
        f"nnU-Net's predictor with each {previous} model folder on the test images (as nnUNetv2_predict -c "
        f"{previous}), then the cascade models with those segmentations",
    )
    return PreviousStage(student, teacher, record)


def validation_inputs(run) -> PreviousStage | None:
    """The student's validation cases: both lowres models' own final validation segmentations (nnU-Net's
    predicted_next_stage); the teachers' must hold every case, or a CascadeError names the folder."""
    trainer = run.trainer
    previous = previous_stage(trainer.plans_manager.plans, trainer.configuration_name)
    if previous is None:
        return None
    teacher_lowres = sibling_model_folder(run.teacher_folder, previous)
    teacher = segs_folder(teacher_lowres, trainer.configuration_name)
    missing = missing_cases((p.name for p in teacher.iterdir()) if teacher.is_dir() else (), run.val_keys)
    if missing:
        raise CascadeError(
            f"{teacher} lacks the teachers' {previous} segmentations of {', '.join(missing)}: train the "
            f"{previous} teacher folds whose validation split holds them (nnunet-distill train-teacher -c "
            f"{previous}), or add a labelled test set (imagesTs+labelsTs)"
        )
    student = Path(trainer.folder_with_segs_from_previous_stage)
    record = previous_stage_record(
        previous,
        (student.parent.parent, [], student),
        (teacher_lowres, [], teacher),
        f"the {previous} models' own final validation segmentations (nnU-Net's {PREDICTED_NEXT_STAGE}), "
        "each case from the fold that validated it",
    )
    return PreviousStage(student, teacher, record)


# ---------------------------------------------------------------------------------------------
# nnU-Net edges
# ---------------------------------------------------------------------------------------------


def with_previous_stage(data, seg_prev, foreground_labels):
    """Image channels + the one-hot previous-stage segmentation, as nnU-Net's final validation stacks them."""
    import numpy as np
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    return np.vstack(
        (data, convert_labelmap_to_one_hot(seg_prev[:], foreground_labels, output_dtype=data.dtype))
    )


def predict_previous_stage(
    model_folder: Path, folds: Sequence[int], images: list[list[str]], out_dir: Path, device, mirroring: bool
) -> Path:
    """Segment raw images with a lowres model folder through nnU-Net's predictor (its own loading by trainer
    name), as ``nnUNetv2_predict -c 3d_lowres`` would: the input of the cascade stage on test cases."""
    import shutil

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    predictor = nnUNetPredictor(
        use_mirroring=mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_folder), tuple(folds), CHECKPOINT)
    predictor.predict_from_files_sequential(images, str(out_dir), False, True, None)
    return out_dir
