"""The serving layout of an exported student: what the operator publishes to object storage.

```
PACKAGE_DIR/
    <name>/config.pbtxt      Triton model configuration (onnxruntime_onnx)
    <name>/1/model.onnx      the verified graph, byte for byte as exported
    nnunet_inference.json    everything needed to run it (metadata.py), plus the model's sha256
    README.md                model card with a Hugging Face YAML header (license, tags, Dice metrics)
    SHA256SUMS               `sha256sum -c SHA256SUMS` checks every other file
```

The directory is a Triton model repository as it stands (point `--model-repository` at it) and is what
`nnUNetv2_distillation_predict -m` reads. Output is deterministic (sorted JSON keys, no timestamps), so the
same ONNX file always gives byte-identical packages and identical SHA256SUMS, which makes publishing
idempotent and lets anyone re-derive a published package.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nnunet_distill import metadata as md

SUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"
DEFAULT_MAX_BATCH = 8
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HF_LICENSES = {
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
    "cc0-1.0",
    "apache-2.0",
    "mit",
    "bsd-3-clause",
    "gpl-3.0",
    "odbl",
    "pddl",
    "odc-by",
    "other",
}


class PackageError(RuntimeError):
    """The package cannot be built as asked; the message names the flag or file and the fix."""


def check_model_name(name: str) -> str:
    if not _NAME_OK.match(name):
        raise PackageError(
            f"--name {name!r} is not a valid model name: use letters, digits, '_', '-', '.' "
            "(it becomes a directory and the Triton model name)"
        )
    return name


def hf_license(text: str | None) -> tuple[str, str | None]:
    """(Hugging Face license id, license_name for `other`) from a free-text licence such as 'CC-BY-SA 4.0'.

    A model inherits the terms of the data it was trained on, so the dataset's licence is the default;
    anything that is not a known identifier becomes `other` with the original text kept as its name.
    """
    if not text:
        return "other", "unspecified (see the training dataset's terms)"
    slug = re.sub(r"[\s_]+", "-", text.strip().lower()).replace("--", "-")
    slug = re.sub(r"-?(\d)\.?(\d)?$", lambda m: f"-{m.group(1)}.{m.group(2) or 0}", slug)
    if slug in _HF_LICENSES:
        return slug, None
    return "other", text.strip()


def _triton_dims(shape: list[int | str]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def triton_config(meta: Mapping[str, Any], name: str, max_batch_size: int = DEFAULT_MAX_BATCH) -> str:
    """config.pbtxt text for Triton's onnxruntime backend.

    A dynamic batch axis becomes Triton batching (max_batch_size > 0, dims without the batch axis, and dynamic
    batching so concurrent sliding-window requests are merged); a static batch becomes max_batch_size 0 with
    the full shape. Dynamic spatial axes are -1.
    """
    io = meta["io"]
    in_shape, out_shape = list(io["input_shape"]), list(io["output_shape"])
    batched = bool(io.get("dynamic_batch"))
    if batched:
        if max_batch_size < 1:
            raise PackageError(
                f"--max-batch-size must be >= 1 for a dynamic-batch model, got {max_batch_size}"
            )
        in_shape, out_shape = in_shape[1:], out_shape[1:]
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [",
        "  {",
        f'    name: "{io["input_name"]}"',
        "    data_type: TYPE_FP32",
        f"    dims: {_triton_dims(in_shape)}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{io["output_name"]}"',
        "    data_type: TYPE_FP32",
        f"    dims: {_triton_dims(out_shape)}",
        "  }",
        "]",
    ]
    if batched:
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {max_batch_size} ]", "}"]
    lines += ["version_policy: { specific: { versions: [ 1 ] } }"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(meta: Mapping[str, Any], name: str, license_text: str | None = None) -> str:
    """README.md: a Hugging Face model card (YAML header + body) generated from the metadata alone."""
    dataset = meta["student"]["dataset"]
    license_id, license_name = hf_license(
        license_text
        or meta["nnunet"]["dataset_json"].get("licence")
        or meta["nnunet"]["dataset_json"].get("license")
    )
    d = meta["distillation"]
    metrics = meta.get("metrics") or {}
    ndim = len(meta["patch_size"])
    header: dict[str, Any] = {"license": license_id}
    if license_name:
        header["license_name"] = license_name
    header.update(
        {
            "library_name": "onnx",
            "pipeline_tag": "image-segmentation",
            "tags": [
                "medical-imaging",
                "image-segmentation",
                f"{ndim}d",
                "nnunet",
                "knowledge-distillation",
                "onnx",
                "triton",
                f"nnunet-{meta['configuration']}",
            ],
        }
    )
    results = []
    if metrics.get("student_dice") is not None:
        results.append(
            {
                "type": "dice",
                "value": round(metrics["student_dice"], 4),
                "verified": False,
                "name": f"Student mean Dice ({metrics.get('evaluation')}, {metrics.get('num_cases')} cases)",
            }
        )
    if metrics.get("teacher_ensemble_dice") is not None:
        results.append(
            {
                "type": "dice",
                "value": round(metrics["teacher_ensemble_dice"], 4),
                "verified": False,
                "name": f"Teacher ensemble mean Dice ({metrics.get('evaluation')}, "
                f"{metrics.get('num_cases')} cases)",
            }
        )
    if results:
        header["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "image-segmentation", "name": f"{ndim}D medical image segmentation"},
                        "dataset": {"type": dataset, "name": dataset},
                        "metrics": results,
                    }
                ],
            }
        ]
    yaml_text = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)

    io = meta["io"]
    labels = meta["labels"]
    label_rows = "\n".join(f"| {k} | {v} |" for k, v in labels.items())
    channel_rows = "\n".join(
        f"| {c} | {n} | {meta['normalization_schemes'][i] if i < len(meta['normalization_schemes']) else ''} | "
        f"{_intensity(meta['intensity_properties'].get(str(c)))} |"
        for i, (c, n) in enumerate(meta["channel_names"].items())
    )
    v = meta.get("verification") or {}
    if metrics:
        per_label = metrics.get("per_label") or {}
        rows = [
            f"| {name} | {_fmt(v.get('student_dice'))} | {_fmt(v.get('teacher_ensemble_dice'))} | "
            f"{_fmt(v.get('retention'), 3)} |"
            for name, v in per_label.items()
        ]
        rows.append(
            f"| **mean** | {_fmt(metrics.get('student_dice'))} | {_fmt(metrics.get('teacher_ensemble_dice'))} "
            f"| {_fmt(metrics.get('retention'), 3)} |"
        )
        folds = metrics.get("teacher_folds")
        metric_text = "\n".join(rows) + (
            f"\n\nCases: {metrics.get('num_cases')} ({metrics.get('case_source')}; evaluation "
            f"`{metrics.get('evaluation')}`); teacher ensemble: folds {', '.join(map(str, folds)) if folds else 'none'}"
            f"; source: {metrics.get('source')}." + (f" {metrics['note']}." if metrics.get("note") else "")
        )
    else:
        metric_text = (
            "| student | n/a | n/a | n/a |\n\nNo validation summary was found beside the student checkpoint."
        )
    teacher_folds = d.get("teacher_folds")
    return f"""---
{yaml_text}---

# {name}

A small nnU-Net student distilled from a teacher ensemble with nnunet-distill, exported to ONNX and verified
against the PyTorch model. Dataset `{dataset}`, configuration `{meta["configuration"]}`, fold {meta["student"]["fold"]}.

## Model

| | |
|---|---|
| architecture | `{meta["student"]["architecture"]}` |
| parameters | {meta["student"]["parameters"]:,} |
| student plans | `{meta["student"]["plans_identifier"]}` |
| reduction factor r | {d.get("reduction_factor")} |
| KD weight α / temperature T | {d.get("alpha")} / {d.get("temperature")} |
| teacher plans / folds | `{d.get("teacher_plans")}` / {", ".join(map(str, teacher_folds)) if teacher_folds else "n/a"} |
| DA5 augmentation | {d.get("da5")} |

## Held-out Dice

Retention is the student's Dice over the teacher ensemble's on cases that none of them trained on; it is left
out (n/a) when no such comparison exists.

| label | student | teacher ensemble | retention |
|---|---|---|---|
{metric_text}

## Input and output

- input `{io["input_name"]}`: float32 {io["input_shape"]}, an nnU-Net-preprocessed patch (see below)
- output `{io["output_name"]}`: float32 {io["output_shape"]}, logits ({"sigmoid per region" if meta["has_regions"] else "softmax over labels"})
- patch size {meta["patch_size"]}, spacing {meta["spacing"]}, transpose forward {meta["transpose_forward"]}
- sliding window: tile step {meta["tile_step_size"]}, Gaussian weighting, mirroring axes {meta["mirror_axes"]}
- ONNX opset {io["opset"]}, TensorRT-ready graph: {io["tensorrt_ready"]}

| channel | name | normalization | foreground intensity statistics |
|---|---|---|---|
{channel_rows}

| label | value |
|---|---|
{label_rows}

## Use

```
nnUNetv2_distillation_predict -i images/ -o segmentations/ -m <this directory>
tritonserver --model-repository <this directory>
```

The predictor runs nnU-Net's own preprocessing, sliding window and resampling with ONNX Runtime in place of
PyTorch; `nnunet_inference.json` holds everything it needs. Check the files with `sha256sum -c SHA256SUMS`.

## Verification

ONNX Runtime vs PyTorch on {len(v.get("inputs", []))} inputs (random and a real preprocessed patch
`{v.get("real_patch_case")}`): max |Δlogit| = {v.get("max_abs_diff")}, segmentation agreement = {v.get("min_agreement")}.

Versions: {", ".join(f"{k} {val}" for k, val in sorted(meta["versions"].items()) if val)}.
Dataset fingerprint sha256: `{meta.get("dataset_fingerprint_sha256")}`.
"""


def _intensity(props: Mapping[str, Any] | None) -> str:
    if not props:
        return "n/a"
    keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
    return ", ".join(f"{k} {props[k]:.4g}" for k in keys if isinstance(props.get(k), (int, float)))


def sha256sums(root: Path) -> str:
    """`sha256sum` output for every file under root (sorted, relative paths), SHA256SUMS itself excluded."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != SUMS_NAME)
    return "".join(f"{md.sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)


def read_model_metadata(onnx_file: Path) -> dict:
    import onnx

    if not onnx_file.is_file():
        raise PackageError(
            f"--onnx {onnx_file} does not exist; export the student first (nnUNetv2_distillation_export_onnx)"
        )
    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise PackageError(f"--onnx {onnx_file} is not a readable ONNX file ({type(exc).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "format" not in props:
        raise PackageError(
            f"--onnx {onnx_file} carries no nnunet-distill metadata; export it with "
            "nnUNetv2_distillation_export_onnx"
        )
    return md.from_metadata_props(props)


def build_package(
    onnx_file: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    license_text: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
) -> Path:
    """Write the package to out_dir (replacing an earlier package there) and return out_dir."""
    onnx_file, out_dir = Path(onnx_file), Path(out_dir)
    meta = read_model_metadata(onnx_file)
    name = check_model_name(name or meta["model_name"])
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMS_NAME).is_file():
        raise PackageError(
            f"-o {out_dir} exists, is not empty and is not an earlier package; choose another directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / name / "1").mkdir(parents=True)
        shutil.copyfile(onnx_file, staging / name / "1" / "model.onnx")
        (staging / name / "config.pbtxt").write_text(triton_config(meta, name, max_batch_size))
        sidecar = dict(meta)
        sidecar["package"] = {
            "name": name,
            "model_file": f"{name}/1/model.onnx",
            "model_sha256": md.sha256_file(onnx_file),
        }
        (staging / md.SIDECAR_NAME).write_text(md.dumps(sidecar))
        (staging / CARD_NAME).write_text(model_card(meta, name, license_text))
        (staging / SUMS_NAME).write_text(sha256sums(staging))
        for path in staging.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(staging, 0o755)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by the staged package so readers never see half a package."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
