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
import string
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nnunet_distill import contract
from nnunet_distill import metadata as md
from nnunet_distill.checksums import SUMS_FILE, sha256_file, sha256sums

SUMS_NAME = SUMS_FILE
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


MODEL_CARD_TEMPLATE = "model_card.md"  # package data under nnunet_distill/templates/


def _card_header(meta: Mapping[str, Any], name: str, license_text: str | None) -> str:
    """The model card's YAML header: license, Hugging Face tags and the held-out Dice as model-index."""
    dataset = meta["student"]["dataset"]
    license_id, license_name = hf_license(
        license_text
        or meta["nnunet"]["dataset_json"].get("licence")
        or meta["nnunet"]["dataset_json"].get("license")
    )
    metrics = meta.get("metrics") or {}
    ndim = len(meta["patch_size"])
    header: dict[str, Any] = {"license": license_id}
    if license_name:
        header["license_name"] = license_name
    header["library_name"] = "onnx"
    header["pipeline_tag"] = "image-segmentation"
    header["tags"] = [
        *("medical-imaging", "image-segmentation", f"{ndim}d", "nnunet", "knowledge-distillation"),
        *("onnx", "triton", f"nnunet-{meta['configuration']}"),
    ]
    cases = f"({metrics.get('evaluation')}, {metrics.get('num_cases')} cases)"
    results = [
        {
            "type": "dice",
            "value": round(metrics[key], 4),
            "verified": False,
            "name": f"{what} mean Dice {cases}",
        }
        for key, what in (("student_dice", "Student"), ("teacher_ensemble_dice", "Teacher ensemble"))
        if metrics.get(key) is not None
    ]
    if results:
        task = {"type": "image-segmentation", "name": f"{ndim}D medical image segmentation"}
        dataset_ref = {"type": dataset, "name": dataset}
        header["model-index"] = [
            {"name": name, "results": [{"task": task, "dataset": dataset_ref, "metrics": results}]}
        ]
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)


def _metric_table(metrics: Mapping[str, Any]) -> str:
    """Rows of the held-out Dice table (per label, then the mean) and the line that says where they come
    from."""
    if not metrics:
        return (
            "| student | n/a | n/a | n/a |\n\nNo validation summary was found beside the student checkpoint."
        )
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
    return "\n".join(rows) + (
        f"\n\nCases: {metrics.get('num_cases')} ({metrics.get('case_source')}; evaluation "
        f"`{metrics.get('evaluation')}`); teacher ensemble: folds "
        f"{', '.join(map(str, folds)) if folds else 'none'}"
        f"; source: {metrics.get('source')}." + (f" {metrics['note']}." if metrics.get("note") else "")
    )


def _channel_rows(meta: Mapping[str, Any]) -> str:
    schemes = meta["normalization_schemes"]
    return "\n".join(
        f"| {c} | {n} | {schemes[i] if i < len(schemes) else ''} | "
        f"{_intensity(meta['intensity_properties'].get(str(c)))} |"
        for i, (c, n) in enumerate(meta["channel_names"].items())
    )


def model_card(meta: Mapping[str, Any], name: str, license_text: str | None = None) -> str:
    """README.md: a Hugging Face model card (YAML header + body) generated from the metadata alone.

    The body is `templates/model_card.md` (`string.Template`: prose stays readable and editable as Markdown);
    this function only computes the values it shows.
    """
    d, io, v = meta["distillation"], meta["io"], meta.get("verification") or {}
    teacher_folds = d.get("teacher_folds")
    fields = {
        "yaml_header": _card_header(meta, name, license_text),
        "name": name,
        "dataset": meta["student"]["dataset"],
        "configuration": meta["configuration"],
        "fold": meta["student"]["fold"],
        "architecture": meta["student"]["architecture"],
        "parameters": f"{meta['student']['parameters']:,}",
        "plans_identifier": meta["student"]["plans_identifier"],
        "reduction_factor": d.get("reduction_factor"),
        "alpha": d.get("alpha"),
        "temperature": d.get("temperature"),
        "teacher_plans": d.get("teacher_plans"),
        "teacher_folds": ", ".join(map(str, teacher_folds)) if teacher_folds else "n/a",
        "da5": d.get("da5"),
        "metric_table": _metric_table(meta.get("metrics") or {}),
        "input_name": io["input_name"],
        "input_shape": io["input_shape"],
        "output_name": io["output_name"],
        "output_shape": io["output_shape"],
        "output_activation": "sigmoid per region" if meta["has_regions"] else "softmax over labels",
        "patch_size": meta["patch_size"],
        "spacing": meta["spacing"],
        "transpose_forward": meta["transpose_forward"],
        "tile_step_size": meta["tile_step_size"],
        "mirror_axes": meta["mirror_axes"],
        "opset": io["opset"],
        "tensorrt_ready": io["tensorrt_ready"],
        "channel_rows": _channel_rows(meta),
        "label_rows": "\n".join(f"| {k} | {val} |" for k, val in meta["labels"].items()),
        "verified_inputs": len(v.get("inputs", [])),
        "real_patch_case": v.get("real_patch_case"),
        "max_abs_diff": v.get("max_abs_diff"),
        "min_agreement": v.get("min_agreement"),
        "versions": ", ".join(f"{k} {val}" for k, val in sorted(meta["versions"].items()) if val),
        "fingerprint": meta.get("dataset_fingerprint_sha256"),
    }
    template = resources.files("nnunet_distill").joinpath("templates", MODEL_CARD_TEMPLATE).read_text("utf-8")
    return string.Template(template).substitute(fields)


def _intensity(props: Mapping[str, Any] | None) -> str:
    if not props:
        return "n/a"
    keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
    return ", ".join(f"{k} {props[k]:.4g}" for k in keys if isinstance(props.get(k), (int, float)))


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
            "model_sha256": sha256_file(onnx_file),
        }
        (staging / contract.PACKAGE_SIDECAR_NAME).write_text(md.dumps(sidecar))
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
