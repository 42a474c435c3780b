"""`nnunet-distill package --onnx FILE -o DIR [--name NAME]`: the servable, publishable package of a
student."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "nnunet-distill package"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a Triton model repository with nnunet_inference.json, a model card (README.md) "
        "and "
        "SHA256SUMS from an exported student (nnUNetv2_distillation_export_onnx). Deterministic: the "
        "same ONNX file gives byte-identical packages.",
    )
    parser.add_argument("--onnx", required=True, type=Path, help="exported .onnx file (carries its metadata)")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="package directory (created, or replaced if it holds an earlier package)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="model name: Triton model directory and model card title (default: "
        "<dataset>__<student plans>__<configuration>__fold<f>)",
    )
    parser.add_argument(
        "--license",
        dest="license_text",
        default=None,
        help="licence for the model card (default: the dataset.json licence, else 'other')",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="Triton max_batch_size for dynamic-batch models (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnunet_distill.metadata import MetadataError
    from nnunet_distill.package import PackageError, build_package
    from nnunet_distill.termination import write_termination_message

    try:
        out = build_package(args.onnx, args.output, args.name, args.license_text, args.max_batch_size)
    except (PackageError, MetadataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        write_termination_message(
            {"stage": "export", "ok": False, "error": {"reason": "PackageFailed", "message": str(exc)}}
        )
        return 1
    write_termination_message(termination_summary(out))
    print(f"wrote package {out}")
    return 0


def termination_summary(package_dir: Path) -> dict:
    """What the export stage reports to the DistillationJob status (the package is its last command)."""
    import json

    from nnunet_distill.contract import PACKAGE_SIDECAR_NAME

    meta = json.loads((package_dir / PACKAGE_SIDECAR_NAME).read_text())
    metrics = meta.get("metrics") or {}
    return {
        "stage": "export",
        "ok": True,
        "artifacts": {
            "modelPath": str(package_dir / meta["package"]["model_file"]),
            "modelSha256": meta["package"]["model_sha256"],
            "studentParameters": meta["student"]["parameters"],
        },
        "metrics": {
            k: v
            for k, v in (
                ("finalDice", metrics.get("student_dice")),
                ("teacherDice", metrics.get("teacher_ensemble_dice")),
                ("retention", metrics.get("retention")),
                ("worstLabelRetention", metrics.get("worst_label_retention")),
                ("worstLabel", metrics.get("worst_label")),
            )
            if v is not None
        },
    }


if __name__ == "__main__":
    sys.exit(main())
