"""The held-out evaluation, run: nnU-Net's own predictor and metric code on student and teacher ensemble, and
the distillation summary they produce (``contract.SUMMARY_NAME``).

Which cases are honest and how the figures are computed is decided by the pure functions in
``evaluation.py`` (see its docstring); this module only predicts, scores and writes. The summary is one of
three kinds: a held-out test set, the student's validation cases against the teacher folds that never trained
on them, or no honest baseline at all (then no retention is written).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import cascade
from nnunet_distill.evaluation import (
    NO_HONEST_BASELINE,
    SCHEMA_VERSION,
    SUMMARY_NAME,
    TEST_SET,
    VALIDATION_UNSEEN,
    EvaluationError,
    HeldOutCase,
    check_unseen,
    dice_by_label,
    find_test_cases,
    folds_that_trained_on,
    label_names,
    label_rows,
    mean_dice,
    retention,
)

#: The checkpoint record of the distillation trainer copied into the summary.
_DISTILLATION_KEYS = (
    *("alpha", "temperature", "reduction_factor", "teacher_folds", "block_strategy", "student_plans"),
    *("da5", "rotate_folds", "kd_mode", "student_init", "init_teacher_fold", "unlabelled_cases"),
    "labelled_share",
)


def make_predictor(
    network,
    plans: dict,
    configuration: str,
    dataset_json: dict,
    parameters: list[dict],
    mirror_axes: tuple[int, ...] | None,
    device,
):
    """nnU-Net's predictor over ``network`` with one state dict per ensemble member (it averages their
    logits)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror_axes is not None,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        pm,
        pm.get_configuration(configuration),
        parameters,
        dataset_json,
        "nnUNetTrainer",
        mirror_axes,
    )
    return predictor


def predict_cases(
    predictor, cases: Sequence[HeldOutCase], out_dir: Path, previous_stage: Path | None = None
) -> tuple[Path, float]:
    """Segment every case from its raw images into ``out_dir`` (replaced), without worker processes; a
    cascade stage reads the previous stage's segmentation of each case from ``previous_stage``.

    Returns the folder and the wall-clock seconds nnU-Net's whole pipeline took (read, preprocess, sliding
    window, resample, write): the same work for student and ensemble, so their ratio is an honest speed-up.
    """
    import time

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    previous = str(previous_stage) if previous_stage else None
    start = time.perf_counter()
    predictor.predict_from_files_sequential(
        [list(c.images) for c in cases], [str(out_dir / c.identifier) for c in cases], False, True, previous
    )
    return out_dir, time.perf_counter() - start


def score_cases(pred_dir: Path, cases: Sequence[HeldOutCase], dataset_json: dict, plans: dict) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` on the predictions, against the cases' own label files."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ending = dataset_json["file_ending"]
    reference = pred_dir.parent / f"{pred_dir.name}_reference"
    if reference.exists():
        shutil.rmtree(reference)
    reference.mkdir(parents=True)
    # the labels of imagesTs and imagesTr cases live in different folders: link them side by side
    for c in cases:
        os.symlink(os.path.abspath(c.label), reference / f"{c.identifier}{ending}")
    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    compute_metrics_on_folder(
        str(reference),
        str(pred_dir),
        str(pred_dir / "summary.json"),
        PlansManager(plans).image_reader_writer_class(),
        ending,
        lm.foreground_regions if lm.has_regions else lm.foreground_labels,
        lm.ignore_label,
        num_processes=1,
    )
    return json.loads((pred_dir / "summary.json").read_text())


def _predict_preprocessed(predictor, trainer, keys: Sequence[str], out_dir: Path, segs: Path | None) -> Path:
    """Teacher-ensemble logits on preprocessed validation cases, exported like nnU-Net's final validation
    (a cascade's teachers get the one-hot previous-stage segmentation from ``segs``, as nnU-Net stacks it)."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    dataset = trainer.dataset_class(
        trainer.preprocessed_dataset_folder,
        list(keys),
        folder_with_segs_from_previous_stage=str(segs) if segs else None,
    )
    for key in dataset.identifiers:
        data, _, seg_prev, properties = dataset.load_case(key)
        data = data[:]
        if seg_prev is not None:
            data = cascade.with_previous_stage(data, seg_prev, trainer.label_manager.foreground_labels)
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float().cpu()
        export_prediction_from_logits(
            logits,
            properties,
            predictor.configuration_manager,
            predictor.plans_manager,
            predictor.dataset_json,
            str(out_dir / key),
            False,
        )
    return out_dir


def _score_validation(trainer, pred_dir: Path) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    lm = trainer.label_manager
    compute_metrics_on_folder(
        os.path.join(trainer.preprocessed_dataset_folder_base, "gt_segmentations"),
        str(pred_dir),
        str(pred_dir / "summary.json"),
        trainer.plans_manager.image_reader_writer_class(),
        trainer.dataset_json["file_ending"],
        lm.foreground_regions if lm.has_regions else lm.foreground_labels,
        lm.ignore_label,
        chill=True,
        num_processes=1,
    )
    return json.loads((pred_dir / "summary.json").read_text())


def _student_network(trainer):
    network = copy.deepcopy(trainer._unwrapped_network())
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
    return network


@dataclass
class _Run:
    """What every kind of evaluation needs: the trained student, the teachers and where the results go."""

    trainer: Any
    teacher_plans: dict
    teacher_dataset_json: dict
    teacher_folds: list[int]
    output: Path
    val_keys: list[str]
    mirror_axes: tuple[int, ...] | None
    teacher_network: Any
    teacher_params: list[dict]
    validation_student: dict | None
    student_summary_dir: Path
    teacher_folder: str = ""

    def predictor(self, network: Any, plans: dict, dataset_json: dict, params: list[dict]):
        trainer = self.trainer
        return make_predictor(
            network,
            plans,
            trainer.configuration_name,
            dataset_json,
            params,
            self.mirror_axes,  # the same test-time mirroring for both, so the comparison is like for like
            trainer.device,
        )

    def validation_cases(self) -> dict[str, Any]:
        return {
            "ids": sorted(self.val_keys),
            "count": len(self.val_keys),
            "source": f"fold {self.trainer.fold} validation split (splits_final.json)",
            "mirroring_tta": self.mirror_axes is not None,
        }


@dataclass
class _Scored:
    """One kind of evaluation's result: the nnU-Net summaries it scored and where they came from."""

    kind: str
    student_summary: dict | None
    teacher_summary: dict | None
    cases: dict[str, Any]
    ensemble_folds: list[int]
    student_src: str
    teacher_src: str | None
    timing: dict[str, Any] | None
    note: str
    previous_stage: dict[str, Any] | None = None  # a cascade: which models made its previous-stage input


def _score_test_set(run: _Run, cases: Sequence[HeldOutCase]) -> _Scored:
    trainer = run.trainer
    trainer.print_to_log_file(
        f"held-out evaluation: student and teacher ensemble {run.teacher_folds} on "
        f"{len(cases)} test cases (mirroring {'off' if run.mirror_axes is None else 'on'})"
    )
    student_network = _student_network(trainer)
    plans, dataset_json = trainer.plans_manager.plans, trainer.dataset_json
    previous = cascade.test_set_inputs(run, cases)
    student_pred, student_seconds = predict_cases(
        run.predictor(student_network, plans, dataset_json, [student_network.state_dict()]),
        cases,
        run.output / "test_set" / "student",
        previous and previous.student,
    )
    student_summary = score_cases(student_pred, cases, dataset_json, plans)
    teacher_pred, teacher_seconds = predict_cases(
        run.predictor(run.teacher_network, run.teacher_plans, run.teacher_dataset_json, run.teacher_params),
        cases,
        run.output / "test_set" / "teacher_ensemble",
        previous and previous.teacher,
    )
    teacher_summary = score_cases(teacher_pred, cases, run.teacher_dataset_json, run.teacher_plans)
    case_record = {
        "ids": [c.identifier for c in cases],
        "count": len(cases),
        "source": "+".join(sorted({c.source for c in cases})),
        "mirroring_tta": run.mirror_axes is not None,
        "files": {c.identifier: {"images": list(c.images), "label": c.label} for c in cases},
    }
    timing = {
        "student_seconds": round(student_seconds, 3),
        "teacher_ensemble_seconds": round(teacher_seconds, 3),
        "speedup": round(teacher_seconds / student_seconds, 2) if student_seconds > 0 else None,
        "device": str(trainer.device),
        "what": "nnU-Net's predictor in PyTorch on the same cases, device and mirroring: read, "
        "preprocess, sliding window, resample and write, one process",
    }
    note = "held-out test cases: no teacher fold and not the student trained on any of them"
    return _Scored(
        TEST_SET,
        student_summary,
        teacher_summary,
        case_record,
        list(run.teacher_folds),
        str(student_pred),
        str(teacher_pred),
        timing,
        note,
        previous and previous.record,
    )


def _score_unseen_folds(run: _Run, unseen: list[int], leaky: list[int]) -> _Scored:
    trainer = run.trainer
    trainer.print_to_log_file(
        f"no labelled test set: teacher folds {unseen} (never trained on fold "
        f"{trainer.fold}'s validation cases) on the same {len(run.val_keys)} cases"
    )
    unseen_params = [p for f, p in zip(run.teacher_folds, run.teacher_params, strict=False) if f in unseen]
    previous = cascade.validation_inputs(run)
    teacher_pred = _predict_preprocessed(
        run.predictor(run.teacher_network, run.teacher_plans, run.teacher_dataset_json, unseen_params),
        trainer,
        run.val_keys,
        run.output / "validation_teachers" / "unseen_folds",
        previous and previous.teacher,
    )
    note = (
        "no labelled test set (imagesTs+labelsTs): the student's validation cases, against only the "
        f"teacher folds {unseen} that never trained on them"
        + (f"; folds {leaky} did, and are left out" if leaky else "")
    )
    return _Scored(
        VALIDATION_UNSEEN,
        run.validation_student,
        _score_validation(trainer, teacher_pred),
        run.validation_cases(),
        unseen,
        str(run.student_summary_dir),
        str(teacher_pred),
        None,
        note,
        previous and previous.record,
    )


def _no_baseline(run: _Run) -> _Scored:
    note = (
        "no honest baseline: there is no labelled test set (add imagesTs+labelsTs or pass --test_cases) "
        f"and every teacher fold {run.teacher_folds} trained on the student's validation cases, so no "
        "retention is reported (include the student's fold in -tf to get one)"
    )
    return _Scored(
        NO_HONEST_BASELINE,
        run.validation_student or {},
        None,
        run.validation_cases(),
        [],
        str(run.student_summary_dir),
        None,
        None,
        note,
    )


def _validation_record(run: _Run, names: dict[str, str], leaky: list[int]) -> dict[str, Any]:
    """nnU-Net's own final validation of the student: reported, but never as a retention figure."""
    return {
        "fold": run.trainer.fold,
        "cases": sorted(run.val_keys),
        "count": len(run.val_keys),
        "student_dice": dice_by_label(run.validation_student, names) if run.validation_student else None,
        "teacher_folds_trained_on_these_cases": leaky,
        "note": "nnU-Net's final validation of the student on its fold's validation split; not a retention "
        "figure" + (f": teacher folds {leaky} trained on these cases" if leaky else ""),
    }


def _summary_document(
    run: _Run, scored: _Scored, names: dict[str, str], validation: dict, teacher_folder: str, checkpoint: str
) -> dict[str, Any]:
    trainer, meta = run.trainer, run.trainer.distillation_meta
    student_dice = dice_by_label(scored.student_summary, names) if scored.student_summary else {}
    teacher_dice = dice_by_label(scored.teacher_summary, names) if scored.teacher_summary else {}
    ret = retention(student_dice, teacher_dice) if scored.teacher_summary else None
    teacher = {
        "folder": teacher_folder,
        "folds": scored.ensemble_folds,
        "checkpoint": checkpoint or meta.get("teacher_checkpoint"),
        "parameters_per_fold": meta.get("teacher_parameters"),
        "dice": teacher_dice,
        "mean_dice": mean_dice(teacher_dice),
        "predictions": scored.teacher_src,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "evaluation": scored.kind,
        "cases": scored.cases,
        "note": scored.note,
        "student": {
            "model_folder": str(run.output.parent),
            "fold": trainer.fold,
            "checkpoint": "checkpoint_final.pth",
            "plans": trainer.plans_manager.plans_name,
            "parameters": meta.get("student_parameters"),
            "dice": student_dice,
            "mean_dice": mean_dice(student_dice),
            "predictions": scored.student_src,
        },
        "teacher_ensemble": teacher if scored.teacher_summary else None,
        "retention": ret,
        "per_label": label_rows(student_dice, teacher_dice, ret) if scored.teacher_summary else [],
        "inference": scored.timing,
        "previous_stage": scored.previous_stage,
        "validation": validation,
        "distillation": {k: meta.get(k) for k in _DISTILLATION_KEYS},
    }


def _label_names(trainer) -> dict[str, str]:
    lm = trainer.label_manager
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    return label_names(trainer.dataset_json, [str(x) for x in keys])


def _prepare(
    trainer,
    teacher_plans: dict,
    teacher_dataset_json: dict,
    teacher_folds: Sequence[int],
    val_keys: Sequence[str],
) -> _Run:
    output = Path(trainer.output_folder)
    (output / "validation").mkdir(parents=True, exist_ok=True)
    student_summary_file = output / "validation" / "summary.json"
    return _Run(
        trainer=trainer,
        teacher_plans=teacher_plans,
        teacher_dataset_json=teacher_dataset_json,
        teacher_folds=list(teacher_folds),
        output=output,
        val_keys=list(val_keys),
        mirror_axes=trainer.validation_mirroring_axes(),
        teacher_network=copy.deepcopy(trainer.teachers.teachers[0]).float(),
        teacher_params=[{k: v.float() for k, v in t.state_dict().items()} for t in trainer.teachers.teachers],
        validation_student=(
            json.loads(student_summary_file.read_text()) if student_summary_file.is_file() else None
        ),
        student_summary_dir=student_summary_file.parent,
    )


def write_distillation_summary(
    trainer,
    teacher_plans: dict,
    teacher_dataset_json: dict,
    teacher_folds: Sequence[int],
    teacher_folder: str,
    *,
    raw_dataset: Path | None,
    test_cases: Sequence[str] | None = None,
    teacher_checkpoint: str = "",
) -> Path:
    """Score student and teacher ensemble honestly (see evaluation.py's docstring) and write the summary."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_distill.atomic import atomic_write_json

    train_keys, val_keys = trainer.do_split()
    splits_file = Path(trainer.preprocessed_dataset_folder_base) / "splits_final.json"
    splits = load_json(str(splits_file)) if splits_file.is_file() else []
    cases: list[HeldOutCase] = []
    if raw_dataset is not None and raw_dataset.is_dir():
        cases = find_test_cases(raw_dataset, trainer.dataset_json, test_cases)
    elif test_cases:
        raise EvaluationError(
            f"--test_cases needs the raw dataset, but {raw_dataset} does not exist "
            "(set nnUNet_raw to the folder holding it)"
        )
    if cases:
        check_unseen(cases, splits, teacher_folds, trainer.fold, train_keys)

    run = _prepare(trainer, teacher_plans, teacher_dataset_json, teacher_folds, val_keys)
    run.teacher_folder = teacher_folder
    names = _label_names(trainer)
    leaky = folds_that_trained_on(splits, teacher_folds, val_keys)
    unseen = [f for f in teacher_folds if f not in leaky]
    if cases:
        scored = _score_test_set(run, cases)
    elif unseen and run.validation_student is not None:
        scored = _score_unseen_folds(run, unseen, leaky)
    else:
        scored = _no_baseline(run)
    validation = _validation_record(run, names, leaky)
    summary = _summary_document(run, scored, names, validation, teacher_folder, teacher_checkpoint)
    path = run.output / "validation" / SUMMARY_NAME
    atomic_write_json(summary, path)
    ret = summary["retention"] or {}
    trainer.print_to_log_file(
        f"distillation summary ({scored.kind}, {scored.cases['count']} cases): student mean Dice "
        f"{summary['student']['mean_dice']}, teacher ensemble {scored.ensemble_folds} "
        f"{(summary['teacher_ensemble'] or {}).get('mean_dice')}, retention "
        f"{ret.get('mean')} (worst label {ret.get('worst_label')}: {ret.get('worst')}) -> {path}"
    )
    return path
