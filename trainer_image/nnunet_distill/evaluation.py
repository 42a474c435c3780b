"""Honest student-vs-ensemble figures: held-out Dice per label, retention, and which cases and models made
them.

The only figure worth reporting as *retention* compares student and teacher ensemble on cases that none of
them trained on:

1. **A held-out test set** (the default whenever there is one): nnU-Net's own convention, ``imagesTs`` with
   labels in ``labelsTs`` beside them in ``$nnUNet_raw/<Dataset>``, or the cases named by ``--test_cases``.
   Both models go through nnU-Net's own predictor from the raw images (preprocessing, sliding window, Gaussian
   weighting, the same mirroring decision) and nnU-Net's own metric code (``compute_metrics_on_folder``). A
   ``--test_cases`` entry that lives in ``imagesTr`` is accepted only when ``splits_final.json`` proves that
   neither the student nor any teacher fold trained on it.
2. **No test set:** the student's validation cases, scored against an ensemble of only the teacher folds whose
   training split excludes them. In nnU-Net's 5-fold CV that is at most the student's own fold, so with
   ``-tf`` lacking it there is no honest teacher figure at all and no retention is reported.

An ensemble that includes folds trained on the scored cases is optimistic, and a ratio against it flatters
nobody in particular: it is simply not a measurement of retention, so it is never written as one. Every figure
records the case identifiers, the teacher folds and the checkpoint that produced it. The result goes to
``<student fold>/validation/distillation_summary.json``; the quality gate, the operator's status, Prometheus
and the model card read it from there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import contract
from nnunet_distill.gate import result_metrics  # noqa: F401 - status.metrics: one definition, in gate

#: Where the summary goes, beside nnU-Net's summary.json.
SUMMARY_NAME = contract.SUMMARY_NAME
SCHEMA_VERSION = contract.SUMMARY_SCHEMA_VERSION

TEST_SET = contract.SUMMARY_TEST_SET
VALIDATION_UNSEEN = contract.SUMMARY_VALIDATION_UNSEEN
NO_HONEST_BASELINE = contract.SUMMARY_NO_HONEST_BASELINE


class EvaluationError(ValueError):
    """The held-out evaluation cannot be done honestly as asked; the message names the flag or file to fix."""


@dataclass(frozen=True)
class HeldOutCase:
    identifier: str
    images: tuple[str, ...]
    label: str
    source: str  # "imagesTs" or "imagesTr"


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def folds_that_trained_on(
    splits: Sequence[dict], teacher_folds: Iterable[int], cases: Iterable[str]
) -> list[int]:
    """Teacher folds whose training split (in splits_final.json) contains any of ``cases``."""
    cases = set(cases)
    out = []
    for f in teacher_folds:
        if f >= len(splits) or cases & set(splits[f]["train"]):
            out.append(f)  # a fold outside the split file: we cannot prove it did not see them
    return out


def label_names(dataset_json: dict, keys: Iterable[str]) -> dict[str, str]:
    """summary.json keys ('1', '(1, 2)') -> label/region names from dataset.json."""
    by_key = {}
    for name, value in dataset_json.get("labels", {}).items():
        key = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
        by_key[key] = name
    return {k: by_key.get(k, k) for k in keys}


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def dice_by_label(summary: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, float | None]:
    """nnU-Net summary.json -> {label name: mean Dice over cases}."""
    return {names.get(k, k): _finite((v or {}).get("Dice")) for k, v in (summary.get("mean") or {}).items()}


def mean_dice(dice: Mapping[str, float | None]) -> float | None:
    values = [v for v in dice.values() if v is not None]
    return sum(values) / len(values) if values and len(values) == len(dice) else None


def retention(
    student: Mapping[str, float | None], teacher: Mapping[str, float | None]
) -> dict[str, Any] | None:
    """Student / ensemble Dice: the mean over labels, per label, and the worst label. None if not computable.

    A label the ensemble itself never finds (Dice 0) has no ratio; it is listed in ``undefined`` and left out
    of the worst-label search, but still counts in both means. A missing student or teacher figure means no
    ratio.
    """
    if not teacher or any(student.get(k) is None or v is None for k, v in teacher.items()):
        return None
    s_mean, t_mean = mean_dice({k: student[k] for k in teacher}), mean_dice(teacher)
    if s_mean is None or not t_mean:
        return None
    per_label = {k: student[k] / t for k, t in teacher.items() if t > 0}
    undefined = [k for k, t in teacher.items() if not t > 0]
    worst = min(per_label, key=per_label.get) if per_label else None
    return {
        "mean": s_mean / t_mean,
        "per_label": per_label,
        "worst_label": worst,
        "worst": per_label[worst] if worst is not None else None,
        "undefined": undefined,
    }


def find_test_cases(
    raw_dataset: Path, dataset_json: Mapping[str, Any], requested: Sequence[str] | None = None
) -> list[HeldOutCase]:
    """Labelled held-out cases in nnU-Net's raw layout; ``requested`` may also name cases of imagesTr.

    Without ``requested``: every ``imagesTs`` case that has its label in ``labelsTs`` (unlabelled test images
    are ignored: they cannot be scored). With it: each identifier must exist, with its label, in
    imagesTs/labelsTs or imagesTr/labelsTr, or the error names what is missing.
    """
    ending = dataset_json.get("file_ending", ".nii.gz")
    channels = sorted(
        int(c) for c in (dataset_json.get("channel_names") or dataset_json.get("modality") or {"0": 0})
    )

    def case(identifier: str, split: str) -> HeldOutCase | None:
        images = tuple(
            str(raw_dataset / f"images{split}" / f"{identifier}_{c:04d}{ending}") for c in channels
        )
        label = raw_dataset / f"labels{split}" / f"{identifier}{ending}"
        if label.is_file() and all(Path(i).is_file() for i in images):
            return HeldOutCase(identifier, images, str(label), f"images{split}")
        return None

    if requested is None:
        folder = raw_dataset / "imagesTs"
        if not folder.is_dir():
            return []
        ids = sorted(
            {
                p.name[: -len(ending) - 5]
                for p in folder.iterdir()
                if p.name.endswith(ending) and len(p.name) > len(ending) + 5
            }
        )
        return [c for c in (case(i, "Ts") for i in ids) if c is not None]
    found = []
    for identifier in requested:
        c = case(identifier, "Ts") or case(identifier, "Tr")
        if c is None:
            raise EvaluationError(
                f"--test_cases: {identifier} has no image + label pair in {raw_dataset}/imagesTs+labelsTs or "
                f"imagesTr+labelsTr (expected {identifier}_0000{ending} and {identifier}{ending})"
            )
        found.append(c)
    return found


def check_unseen(
    cases: Sequence[HeldOutCase],
    splits: Sequence[dict],
    teacher_folds: Sequence[int],
    student_fold: int,
    student_training: Iterable[str],
) -> None:
    """Refuse imagesTr test cases that the student or a teacher fold trained on: they would flatter both."""
    training = [c.identifier for c in cases if c.source == "imagesTr"]
    if not training:
        return
    seen_by_student = sorted(set(training) & set(student_training))
    if seen_by_student:
        raise EvaluationError(
            f"--test_cases: the student (fold {student_fold}) trains on {', '.join(seen_by_student)}; "
            "a held-out case must be one no model trained on (use imagesTs cases)"
        )
    leaky = folds_that_trained_on(splits, teacher_folds, training)
    if leaky:
        raise EvaluationError(
            f"--test_cases: teacher fold(s) {leaky} trained on some of {', '.join(training)}; a "
            "held-out case must be one no teacher trained on (use imagesTs cases)"
        )


def label_rows(
    student: Mapping[str, float | None], teacher: Mapping[str, float | None], ret: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    per = (ret or {}).get("per_label") or {}
    return [
        {
            "name": name,
            "student_dice": student.get(name),
            "teacher_dice": teacher.get(name),
            "retention": per.get(name),
        }
        for name in teacher
    ]


# ---------------------------------------------------------------------------------------------
# Side effects: prediction and scoring with nnU-Net's own code
# ---------------------------------------------------------------------------------------------


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


def predictor_from_model_folder(
    model_folder: str | Path,
    folds: Sequence[int | str],
    device,
    *,
    checkpoint: str = "checkpoint_final.pth",
    mirroring: bool = True,
):
    """nnU-Net's predictor for a trained model folder (teacher or student), as ``nnUNetv2_predict`` builds
    it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        str(model_folder), tuple(folds), checkpoint_name=checkpoint
    )
    return predictor


def predict_cases(predictor, cases: Sequence[HeldOutCase], out_dir: Path) -> tuple[Path, float]:
    """Segment every case from its raw images into ``out_dir`` (replaced), without worker processes.

    Returns the folder and the wall-clock seconds nnU-Net's whole pipeline took (read, preprocess, sliding
    window, resample, write): the same work for student and ensemble, so their ratio is an honest speed-up.
    """
    import time

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    predictor.predict_from_files_sequential(
        [list(c.images) for c in cases], [str(out_dir / c.identifier) for c in cases], False, True, None
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
    for (
        c
    ) in cases:  # the labels of imagesTs and imagesTr cases live in different folders: link them side by side
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


def _predict_preprocessed(predictor, trainer, keys: Sequence[str], out_dir: Path) -> Path:
    """Teacher-ensemble logits on preprocessed validation cases, exported like nnU-Net's final validation."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    dataset = trainer.dataset_class(
        trainer.preprocessed_dataset_folder,
        list(keys),
        folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage,
    )
    for key in dataset.identifiers:
        data, _, _, properties = dataset.load_case(key)
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data[:])).float().cpu()
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
    """Score student and teacher ensemble honestly (see the module docstring) and write the summary JSON."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_distill.atomic import atomic_write_json

    output = Path(trainer.output_folder)
    validation_dir = output / "validation"
    validation_dir.mkdir(parents=True, exist_ok=True)
    train_keys, val_keys = trainer.do_split()
    splits_file = Path(trainer.preprocessed_dataset_folder_base) / "splits_final.json"
    splits = load_json(str(splits_file)) if splits_file.is_file() else []
    mirror_axes = trainer.validation_mirroring_axes()
    teacher_mirror = mirror_axes  # the same test-time mirroring for both, so the comparison is like for like
    teacher_network = copy.deepcopy(trainer.teachers.teachers[0]).float()
    teacher_params = [{k: v.float() for k, v in t.state_dict().items()} for t in trainer.teachers.teachers]
    student_network = _student_network(trainer)
    student_params = [student_network.state_dict()]
    names = label_names(
        trainer.dataset_json,
        [
            str(x)
            for x in (
                trainer.label_manager.foreground_regions
                if trainer.label_manager.has_regions
                else trainer.label_manager.foreground_labels
            )
        ],
    )

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

    meta = trainer.distillation_meta
    validation_student = None
    student_summary_file = validation_dir / "summary.json"
    if student_summary_file.is_file():
        validation_student = json.loads(student_summary_file.read_text())
    leaky = folds_that_trained_on(splits, teacher_folds, val_keys)
    unseen = [f for f in teacher_folds if f not in leaky]
    validation_record = {
        "fold": trainer.fold,
        "cases": sorted(val_keys),
        "count": len(val_keys),
        "student_dice": dice_by_label(validation_student, names) if validation_student else None,
        "teacher_folds_trained_on_these_cases": leaky,
        "note": "nnU-Net's final validation of the student on its fold's validation split; not a retention "
        "figure" + (f": teacher folds {leaky} trained on these cases" if leaky else ""),
    }

    if cases:
        kind = TEST_SET
        trainer.print_to_log_file(
            f"held-out evaluation: student and teacher ensemble {list(teacher_folds)} on "
            f"{len(cases)} test cases (mirroring {'off' if mirror_axes is None else 'on'})"
        )
        student_pred, student_seconds = predict_cases(
            make_predictor(
                student_network,
                trainer.plans_manager.plans,
                trainer.configuration_name,
                trainer.dataset_json,
                student_params,
                mirror_axes,
                trainer.device,
            ),
            cases,
            output / "test_set" / "student",
        )
        student_summary = score_cases(student_pred, cases, trainer.dataset_json, trainer.plans_manager.plans)
        teacher_pred, teacher_seconds = predict_cases(
            make_predictor(
                teacher_network,
                teacher_plans,
                trainer.configuration_name,
                teacher_dataset_json,
                teacher_params,
                teacher_mirror,
                trainer.device,
            ),
            cases,
            output / "test_set" / "teacher_ensemble",
        )
        teacher_summary = score_cases(teacher_pred, cases, teacher_dataset_json, teacher_plans)
        case_record = {
            "ids": [c.identifier for c in cases],
            "count": len(cases),
            "source": "+".join(sorted({c.source for c in cases})),
            "mirroring_tta": mirror_axes is not None,
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
        ensemble_folds, student_src, teacher_src = list(teacher_folds), str(student_pred), str(teacher_pred)
        note = "held-out test cases: no teacher fold and not the student trained on any of them"
    elif unseen and validation_student is not None:
        kind = VALIDATION_UNSEEN
        trainer.print_to_log_file(
            f"no labelled test set: teacher folds {unseen} (never trained on fold "
            f"{trainer.fold}'s validation cases) on the same {len(val_keys)} cases"
        )
        unseen_params = [p for f, p in zip(teacher_folds, teacher_params, strict=False) if f in unseen]
        teacher_pred = _predict_preprocessed(
            make_predictor(
                teacher_network,
                teacher_plans,
                trainer.configuration_name,
                teacher_dataset_json,
                unseen_params,
                teacher_mirror,
                trainer.device,
            ),
            trainer,
            val_keys,
            output / "validation_teachers" / "unseen_folds",
        )
        teacher_summary = _score_validation(trainer, teacher_pred)
        student_summary = validation_student
        case_record = {
            "ids": sorted(val_keys),
            "count": len(val_keys),
            "source": f"fold {trainer.fold} validation split (splits_final.json)",
            "mirroring_tta": mirror_axes is not None,
        }
        ensemble_folds, student_src, teacher_src = unseen, str(student_summary_file.parent), str(teacher_pred)
        timing = None
        note = (
            "no labelled test set (imagesTs+labelsTs): the student's validation cases, against only the "
            "teacher "
            f"folds {unseen} that never trained on them"
            + (f"; folds {leaky} did, and are left out" if leaky else "")
        )
    else:
        kind = NO_HONEST_BASELINE
        student_summary = validation_student or {}
        teacher_summary = None
        case_record = {
            "ids": sorted(val_keys),
            "count": len(val_keys),
            "source": f"fold {trainer.fold} validation split (splits_final.json)",
            "mirroring_tta": mirror_axes is not None,
        }
        ensemble_folds, student_src, teacher_src = [], str(student_summary_file.parent), None
        timing = None
        note = (
            "no honest baseline: there is no labelled test set (add imagesTs+labelsTs or pass --test_cases) "
            "and "
            f"every teacher fold {list(teacher_folds)} trained on the student's validation cases, so no "
            "retention is reported (include the student's fold in -tf to get one)"
        )

    student_dice = dice_by_label(student_summary, names) if student_summary else {}
    teacher_dice = dice_by_label(teacher_summary, names) if teacher_summary else {}
    ret = retention(student_dice, teacher_dice) if teacher_summary else None
    summary = {
        "schema_version": SCHEMA_VERSION,
        "evaluation": kind,
        "cases": case_record,
        "note": note,
        "student": {
            "model_folder": str(output.parent),
            "fold": trainer.fold,
            "checkpoint": "checkpoint_final.pth",
            "plans": trainer.plans_manager.plans_name,
            "parameters": meta.get("student_parameters"),
            "dice": student_dice,
            "mean_dice": mean_dice(student_dice),
            "predictions": student_src,
        },
        "teacher_ensemble": (
            {
                "folder": teacher_folder,
                "folds": ensemble_folds,
                "checkpoint": teacher_checkpoint or meta.get("teacher_checkpoint"),
                "parameters_per_fold": meta.get("teacher_parameters"),
                "dice": teacher_dice,
                "mean_dice": mean_dice(teacher_dice),
                "predictions": teacher_src,
            }
            if teacher_summary
            else None
        ),
        "retention": ret,
        "per_label": label_rows(student_dice, teacher_dice, ret) if teacher_summary else [],
        "inference": timing,
        "validation": validation_record,
        "distillation": {
            k: meta.get(k)
            for k in (
                "alpha",
                "temperature",
                "reduction_factor",
                "teacher_folds",
                "block_strategy",
                "student_plans",
                "da5",
                "rotate_folds",
                "kd_mode",
                "student_init",
                "init_teacher_fold",
            )
        },
    }
    path = validation_dir / SUMMARY_NAME
    atomic_write_json(summary, path)
    trainer.print_to_log_file(
        f"distillation summary ({kind}, {case_record['count']} cases): student mean Dice "
        f"{summary['student']['mean_dice']}, teacher ensemble {ensemble_folds} "
        f"{(summary['teacher_ensemble'] or {}).get('mean_dice')}, retention "
        f"{(ret or {}).get('mean')} (worst label {(ret or {}).get('worst_label')}: "
        f"{(ret or {}).get('worst')}) -> {path}"
    )
    return path
