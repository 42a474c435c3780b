"""What an exported student carries so that it can run without its training folders.

An ONNX graph of an nnU-Net network is useless on its own: inference also needs the target spacing, the axis
transposition, the per-channel normalisation and its intensity statistics, the patch size, the labels or
regions and the tile step. The original tool left all of that out of its ONNX files, so every deployment
copied numbers by hand. Here one dict (built by the pure :func:`build_inference_metadata`) is written twice
with the same content: as ONNX ``metadata_props`` (one JSON-encoded value per top-level key, so the graph is
self-describing) and as a sidecar beside the file, named after it (``<stem>.nnunet_inference.json``, see
``contract.sidecar_path``), for people and tools that do not parse ONNX.

The dict also holds the subsets of ``plans.json`` and ``dataset.json`` that nnU-Net's own preprocessing and
resampling need (``nnunet.plans`` / ``nnunet.dataset_json``), so the ONNX Runtime predictor can rebuild a
``PlansManager`` and ``ConfigurationManager`` from the served package alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from copy import deepcopy
from importlib import metadata as importlib_metadata
from typing import Any

from nnunet_distill.nnunet_env import PlansError, resolved_configuration, total_stride

FORMAT = "nnunet-distill-inference"
FORMAT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# dataset.json keys that list training/test files: large, path-bearing and useless at inference time.
_DATASET_JSON_FILE_LISTS = ("training", "test", "validation", "dataset")
_VERSIONED_PACKAGES = (
    "torch",
    "nnunetv2",
    "dynamic_network_architectures",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "nnunet-distill",
)
_MODEL_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class MetadataError(ValueError):
    """The metadata is missing, of another format or inconsistent with the model it describes."""


def plans_for_inference(plans: Mapping[str, Any], configuration: str) -> dict:
    """The plans reduced to the one configuration that was exported, with inheritance already resolved.

    Resolving `inherits_from` here means the consumer never needs the parent configuration, and dropping the
    others keeps the metadata small and unambiguous about which configuration the graph implements.
    """
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise MetadataError(
            f"configuration {configuration!r} is not in the plans (available: "
            f"{sorted(configurations)}); pass the configuration the student was trained with (-c)"
        )
    try:
        resolved = resolved_configuration(configurations, configuration)
    except PlansError as exc:
        raise MetadataError(str(exc)) from None
    out = {k: deepcopy(v) for k, v in plans.items() if k != "configurations"}
    out["configurations"] = {configuration: resolved}
    return out


def dataset_json_for_inference(dataset_json: Mapping[str, Any]) -> dict:
    """dataset.json without its file lists (they are training-time paths, not model properties)."""
    return {k: deepcopy(v) for k, v in dataset_json.items() if k not in _DATASET_JSON_FILE_LISTS}


def spatial_divisor(configuration: Mapping[str, Any]) -> list[int]:
    """Per-axis factor every spatial size must be a multiple of: the product of the encoder strides.

    A U-Net's skip connections only line up when each axis survives all downsamplings exactly, so dynamic
    spatial axes are exported (and served) as multiples of this factor.
    """
    arch = configuration.get("architecture", {}).get("arch_kwargs", {})
    strides = arch.get("strides") or configuration.get("pool_op_kernel_sizes")
    return total_stride(strides, len(configuration["patch_size"]))


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide what the graph computes (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def default_model_name(dataset_name: str, plans_identifier: str, configuration: str, fold: int | str) -> str:
    """A Triton-safe model name that says which student it is: dataset, student plans (with r), config,
    fold."""
    return _MODEL_NAME_UNSAFE.sub("_", f"{dataset_name}__{plans_identifier}__{configuration}__fold{fold}")


def _label_summary(
    plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str
) -> tuple[bool, int | None, int, int]:
    """(has_regions, ignore_label, input channels, output heads) exactly as nnU-Net's own managers define
    them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(deepcopy(dict(plans)))
    lm = pm.get_label_manager(dict(dataset_json))
    channels = determine_num_input_channels(pm, pm.get_configuration(configuration), dict(dataset_json))
    return lm.has_regions, lm.ignore_label, int(channels), int(lm.num_segmentation_heads)


def build_inference_metadata(
    *,
    plans: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    configuration: str,
    fold: int | str,
    student_folder: str,
    checkpoint_name: str,
    checkpoint_trainer: str,
    mirror_axes: list[int] | None,
    distillation: Mapping[str, Any] | None,
    io: Mapping[str, Any],
    versions: Mapping[str, str | None],
    fingerprint_sha256: str | None,
    parameters: int,
    tile_step_size: float = 0.5,
    metrics: Mapping[str, Any] | None = None,
    verification: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Everything needed to run the exported student, as plain JSON-able data.

    Pure: all inputs are passed in (versions and the fingerprint hash are gathered by the caller), so the
    same student and export options always give the same dict, which keeps packages reproducible.
    `distillation` is the checkpoint's `distillation` dict (None for a model not trained by our trainer);
    only the keys the contract names are carried over, with None for absent ones.
    """
    inf_plans = plans_for_inference(plans, configuration)
    cfg = inf_plans["configurations"][configuration]
    plans_identifier = plans.get("plans_name")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name
        or default_model_name(plans.get("dataset_name", "dataset"), plans_identifier, configuration, fold),
        **_preprocessing(plans, cfg, dataset_json, configuration),
        "mirror_axes": None if mirror_axes is None else [int(a) for a in mirror_axes],
        "tile_step_size": float(tile_step_size),
        "use_gaussian": True,
        "spatial_divisor": spatial_divisor(cfg),
        "distillation": _distillation_record(plans, distillation),
        "student": {
            "dataset": plans.get("dataset_name"),
            "plans_identifier": plans_identifier,
            "model_folder": student_folder,
            "fold": fold,
            "checkpoint": checkpoint_name,
            "checkpoint_trainer": checkpoint_trainer,
            "architecture": cfg.get("architecture", {}).get("network_class_name"),
            "parameters": int(parameters),
        },
        "dataset_fingerprint_sha256": fingerprint_sha256,
        "versions": dict(versions),
        "io": deepcopy(dict(io)),
        "metrics": deepcopy(dict(metrics)) if metrics else None,
        "verification": deepcopy(dict(verification)) if verification else None,
        "nnunet": {"plans": inf_plans, "dataset_json": dataset_json_for_inference(dataset_json)},
    }


def _preprocessing(
    plans: Mapping[str, Any], cfg: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str
) -> dict[str, Any]:
    """What turns an image into the network's input and its output back into labels: geometry,
    normalisation, channels, labels/regions and the heads, from the plans (`cfg`: the resolved
    configuration) and dataset.json."""
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if channel_names is None:
        raise MetadataError("dataset.json has neither 'channel_names' nor 'modality'")
    has_regions, ignore_label, channels, heads = _label_summary(plans, dataset_json, configuration)
    intensity = plans.get(
        "foreground_intensity_properties_per_channel",
        plans.get("foreground_intensity_properties_by_modality", {}),
    )
    return {
        "configuration": configuration,
        "patch_size": list(cfg["patch_size"]),
        "spacing": list(cfg["spacing"]),
        "transpose_forward": list(plans["transpose_forward"]),
        "transpose_backward": list(plans["transpose_backward"]),
        "normalization_schemes": list(cfg["normalization_schemes"]),
        "use_mask_for_norm": list(cfg["use_mask_for_norm"]),
        "intensity_properties": deepcopy(dict(intensity)),
        "channel_names": deepcopy(dict(channel_names)),
        "labels": deepcopy(dict(dataset_json["labels"])),
        "regions_class_order": deepcopy(dataset_json.get("regions_class_order")),
        "has_regions": has_regions,
        "ignore_label": ignore_label,
        "num_input_channels": channels,
        "num_segmentation_heads": heads,
        "file_ending": dataset_json.get("file_ending"),
    }


def _distillation_record(plans: Mapping[str, Any], distillation: Mapping[str, Any] | None) -> dict[str, Any]:
    """How the student was distilled: only the keys the contract names, None for absent ones.

    The checkpoint's record wins; the student plans' own `distillation` entry (written when they were
    derived) fills what an older or foreign checkpoint lacks, so r and the block strategy are never lost.
    """
    d = {k: v for k, v in dict(plans.get("distillation") or {}).items() if v is not None}
    d.update({k: v for k, v in dict(distillation or {}).items() if v is not None})
    return {
        "reduction_factor": d.get("reduction_factor"),
        "alpha": d.get("alpha"),
        "temperature": d.get("temperature"),
        "teacher_folds": d.get("teacher_folds"),
        "block_strategy": d.get("block_strategy"),
        "da5": d.get("da5"),
        "student_plans": d.get("student_plans", plans.get("plans_name")),
        "student_base_plans": d.get("base_plans", d.get("student_base_plans")),
        "teacher_plans": d.get("teacher_plans"),
        "teacher_trainer": d.get("teacher_trainer"),
    }


def to_metadata_props(meta: Mapping[str, Any]) -> dict[str, str]:
    """ONNX metadata_props: one entry per top-level key, its value JSON-encoded (props are strings only)."""
    return {k: json.dumps(v, sort_keys=True, separators=(",", ":")) for k, v in meta.items()}


def from_metadata_props(props: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`to_metadata_props`; props written by other tools (not JSON) are ignored."""
    meta: dict[str, Any] = {}
    for k, v in props.items():
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError):
            continue
    check_metadata(meta)
    return meta


def check_metadata(meta: Mapping[str, Any]) -> None:
    if meta.get("format") != FORMAT:
        raise MetadataError(
            f"not nnunet-distill inference metadata (format={meta.get('format')!r}); export the "
            "model with nnUNetv2_distillation_export_onnx"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise MetadataError(
            f"metadata format_version {meta.get('format_version')!r} is not supported "
            f"(this nnunet-distill reads {FORMAT_VERSION})"
        )
    missing = [k for k in ("configuration", "patch_size", "io", "nnunet") if k not in meta]
    if missing:
        raise MetadataError(f"metadata lacks {missing}; re-export the model")


def dumps(meta: Mapping[str, Any]) -> str:
    """Canonical JSON text (sorted keys, fixed indent, trailing newline) so identical metadata gives identical
    bytes."""
    return json.dumps(meta, sort_keys=True, indent=2) + "\n"


def metrics_from_summaries(
    distillation_summary: Mapping[str, Any] | None, nnunet_summary: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Student and teacher-ensemble Dice for the model card, saying which cases and models produced each
    number.

    The distill stage's `validation/distillation_summary.json` (schema 2, see `evaluation.py`) scores student
    and ensemble on held-out cases (`evaluation` says how) and carries `retention` only when that comparison
    is honest. Without it, only nnU-Net's own `summary.json` of the student's validation cases exists: the
    card then shows the student's figure alone, with its source, and no teacher figure or retention.
    """

    if distillation_summary and distillation_summary.get("schema_version", 1) >= 2:
        return _metrics_from_distillation_summary(distillation_summary)
    if nnunet_summary and isinstance(nnunet_summary.get("foreground_mean"), Mapping):
        return _metrics_from_nnunet_summary(nnunet_summary)
    return None


def _finite(value: Any) -> float | None:
    """A JSON number as a float; None for missing, non-numeric, NaN or infinite values."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metrics_from_distillation_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Student and teacher-ensemble Dice on the held-out cases the distill stage scored both on."""
    student = summary.get("student") or {}
    teacher = summary.get("teacher_ensemble") or {}
    ret = summary.get("retention") or {}
    cases = summary.get("cases") or {}
    return {
        "source": "distillation_summary.json",
        "evaluation": summary.get("evaluation"),
        "student_dice": _finite(student.get("mean_dice")),
        "teacher_ensemble_dice": _finite(teacher.get("mean_dice")),
        "teacher_folds": teacher.get("folds"),
        "retention": _finite(ret.get("mean")),
        "worst_label": ret.get("worst_label"),
        "worst_label_retention": _finite(ret.get("worst")),
        "per_label": {
            row["name"]: {
                "student_dice": _finite(row.get("student_dice")),
                "teacher_ensemble_dice": _finite(row.get("teacher_dice")),
                "retention": _finite(row.get("retention")),
            }
            for row in summary.get("per_label") or []
            if isinstance(row, Mapping)
        }
        or None,
        "num_cases": cases.get("count"),
        "case_source": cases.get("source"),
        "case_ids": cases.get("ids"),
        "note": summary.get("note"),
    }


def _metrics_from_nnunet_summary(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The student's own Dice on its validation split (nnU-Net's summary.json): no teacher, no retention."""
    student = _finite(summary["foreground_mean"].get("Dice"))
    if student is None:
        return None
    per_label = {
        str(k): {"student_dice": _finite(v.get("Dice")), "teacher_ensemble_dice": None, "retention": None}
        for k, v in sorted((summary.get("mean") or {}).items())
        if isinstance(v, Mapping)
    }
    return {
        "source": "nnU-Net validation summary.json, student only",
        "evaluation": "validation (student only)",
        "student_dice": student,
        "teacher_ensemble_dice": None,
        "teacher_folds": None,
        "retention": None,
        "worst_label": None,
        "worst_label_retention": None,
        "per_label": per_label or None,
        "num_cases": len(summary.get("metric_per_case", [])) or None,
        "case_source": "the student's validation split",
        "case_ids": None,
        "note": "no distillation summary: no teacher figure and no retention",
    }
