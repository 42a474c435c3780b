"""Student vs teacher-ensemble Dice on the same cases, and the retention ratio (student / teacher).

After nnU-Net's final validation has written ``validation/summary.json`` for the student, the teacher ensemble is
run through nnU-Net's own predictor (sliding window, Gaussian weighting, the same mirroring decision) on exactly
the student fold's validation cases, exported and scored with nnU-Net's ``compute_metrics_on_folder``. The
result goes to ``validation/distillation_summary.json``.

Leakage, stated rather than hidden: in nnU-Net's 5-fold CV every teacher fold except the student's own trained
on the student's validation cases, so an ensemble of all folds is optimistic there. When the student's fold is
among the teacher folds we also score the teachers that never saw these cases ("unseen" = folds whose training
split excludes them) and report retention against both.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Where the summary goes, beside nnU-Net's summary.json.
SUMMARY_NAME = "distillation_summary.json"


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------

def folds_that_trained_on(splits: Sequence[dict], teacher_folds: Iterable[int], cases: Iterable[str]) -> list[int]:
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


def _dice(summary: dict, key: str) -> float | None:
    try:
        v = float(summary["mean"][key]["Dice"])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def retention_table(student: dict, teacher: dict, names: dict[str, str],
                    unseen: dict | None = None) -> dict[str, dict]:
    """Per label/region: student Dice, teacher Dice, retention (student/teacher); plus the unseen teachers'."""
    table = {}
    for key in student.get("mean", {}):
        s, t = _dice(student, key), _dice(teacher, key)
        row = {"name": names.get(key, key), "student_dice": s, "teacher_dice": t, "retention": _ratio(s, t)}
        if unseen is not None:
            u = _dice(unseen, key)
            row.update({"teacher_unseen_dice": u, "retention_vs_unseen": _ratio(s, u)})
        table[key] = row
    return table


def foreground_row(student: dict, teacher: dict, unseen: dict | None) -> dict:
    def fg(summary):
        try:
            v = float(summary["foreground_mean"]["Dice"])
        except (KeyError, TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    s, t = fg(student), fg(teacher)
    row = {"student_dice": s, "teacher_dice": t, "retention": _ratio(s, t)}
    if unseen is not None:
        u = fg(unseen)
        row.update({"teacher_unseen_dice": u, "retention_vs_unseen": _ratio(s, u)})
    return row


# ---------------------------------------------------------------------------------------------
# Side effects: prediction, export, scoring
# ---------------------------------------------------------------------------------------------

def _predict_ensembles(trainer, teacher_plans: dict, teacher_dataset_json: dict, groups: dict[str, list[int]],
                       val_keys: Sequence[str], mirror_axes, out_root: Path) -> dict[str, Path]:
    """Run each teacher fold once per case and export the mean logits of every group of folds."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(teacher_plans)
    cm = pm.get_configuration(trainer.configuration_name)
    teachers = dict(zip(trainer.teachers.folds, trainer.teachers.teachers))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror_axes is not None,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    folders = {}
    for name in groups:
        folders[name] = out_root / name
        if folders[name].exists():
            shutil.rmtree(folders[name])
        folders[name].mkdir(parents=True)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    needed = sorted({f for folds in groups.values() for f in folds})
    for key in dataset.identifiers:
        data, _, _, properties = dataset.load_case(key)
        data = torch.from_numpy(data[:])
        per_fold = {}
        for f in needed:
            predictor.manual_initialization(teachers[f], pm, cm, None, teacher_dataset_json, "nnUNetTrainer",
                                            mirror_axes)
            per_fold[f] = predictor.predict_sliding_window_return_logits(data).float().cpu()
        for name, folds in groups.items():
            logits = torch.stack([per_fold[f] for f in folds]).mean(0)
            export_prediction_from_logits(logits, properties, cm, pm, teacher_dataset_json,
                                          str(folders[name] / key), False)
    return folders


def _score(trainer, prediction_folder: Path) -> dict:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    lm = trainer.label_manager
    compute_metrics_on_folder(
        os.path.join(trainer.preprocessed_dataset_folder_base, "gt_segmentations"), str(prediction_folder),
        str(prediction_folder / "summary.json"), trainer.plans_manager.image_reader_writer_class(),
        trainer.dataset_json["file_ending"], lm.foreground_regions if lm.has_regions else lm.foreground_labels,
        lm.ignore_label, chill=True, num_processes=default_num_processes)
    import json
    return json.loads((prediction_folder / "summary.json").read_text())


def write_distillation_summary(trainer, teacher_plans: dict, teacher_dataset_json: dict,
                               teacher_folds: Sequence[int], teacher_folder: str) -> Path:
    """Score the teacher ensemble on the student's validation cases and write the comparison JSON."""
    import json

    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_distill.atomic import atomic_write_json

    validation_dir = Path(trainer.output_folder) / "validation"
    student_summary = json.loads((validation_dir / "summary.json").read_text())
    _, val_keys = trainer.do_split()
    splits_file = Path(trainer.preprocessed_dataset_folder_base) / "splits_final.json"
    splits = load_json(str(splits_file)) if splits_file.is_file() else []
    leaky = folds_that_trained_on(splits, teacher_folds, val_keys)
    unseen_folds = [f for f in teacher_folds if f not in leaky]

    groups = {"all_folds": list(teacher_folds)}
    if leaky and unseen_folds:
        groups["unseen_folds"] = unseen_folds
    mirror_axes = trainer.validation_mirroring_axes()
    trainer.print_to_log_file(f"teacher ensemble {list(teacher_folds)} on the same {len(val_keys)} validation cases"
                              f" (mirroring {'off' if mirror_axes is None else 'on'})")
    folders = _predict_ensembles(trainer, teacher_plans, teacher_dataset_json, groups, val_keys, mirror_axes,
                                 Path(trainer.output_folder) / "validation_teachers")
    teacher_summary = _score(trainer, folders["all_folds"])
    unseen_summary = _score(trainer, folders["unseen_folds"]) if "unseen_folds" in folders else None

    names = label_names(trainer.dataset_json, student_summary.get("mean", {}).keys())
    meta = trainer.distillation_meta
    summary = {
        "cases": {
            "fold": trainer.fold,
            "validation_cases": sorted(val_keys),
            "count": len(val_keys),
            "covers": f"fold {trainer.fold}'s validation split in splits_final.json; the student never trains on "
                      "these cases (fold rotation holds them out too)",
            "mirroring_tta": mirror_axes is not None,
        },
        "per_label": retention_table(student_summary, teacher_summary, names, unseen_summary),
        "foreground_mean": foreground_row(student_summary, teacher_summary, unseen_summary),
        "student": {
            "summary": str(validation_dir / "summary.json"),
            "plans": trainer.plans_manager.plans_name,
            "parameters": meta.get("student_parameters"),
        },
        "teacher_ensemble": {
            "folds": list(teacher_folds),
            "folder": teacher_folder,
            "summary": str(folders["all_folds"] / "summary.json"),
            "parameters_per_fold": meta.get("teacher_parameters"),
        },
        "teacher_unseen": ({"folds": unseen_folds, "summary": str(folders["unseen_folds"] / "summary.json")}
                           if "unseen_folds" in folders else None),
        "leakage": {
            "teacher_folds_trained_on_these_cases": leaky,
            "note": ("teacher_dice uses every teacher fold, and the listed folds trained on these validation cases, "
                     "so teacher_dice is optimistic and retention pessimistic; teacher_unseen_dice/"
                     "retention_vs_unseen use only folds that never saw them" if leaky and unseen_folds else
                     "every teacher fold trained on these validation cases: teacher_dice is optimistic and "
                     "retention pessimistic (include the student's fold in -tf to get an unseen-teacher baseline)"
                     if leaky else "no teacher fold trained on these validation cases"),
            "assumes": "teachers were trained on this dataset's splits_final.json (nnU-Net's default)",
        },
        "distillation": {k: meta.get(k) for k in ("alpha", "temperature", "reduction_factor", "teacher_folds",
                                                  "block_strategy", "student_plans", "da5", "rotate_folds")},
    }
    path = validation_dir / SUMMARY_NAME
    atomic_write_json(summary, path)
    fg = summary["foreground_mean"]
    trainer.print_to_log_file(
        f"distillation summary: student Dice {fg['student_dice']}, teacher ensemble {fg['teacher_dice']}, "
        f"retention {fg['retention']}" + (f", vs unseen teachers {fg.get('retention_vs_unseen')}"
                                          if unseen_summary is not None else "") + f" -> {path}")
    return path
