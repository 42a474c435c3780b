"""One exporter behind both export CLIs: find the student, rebuild it with stock nnU-Net, export, verify.

Why it differs from the original tool:
- The student is found from the arguments it was trained with and rebuilt from its own `plans.json` by the
  trainer class its checkpoint names (stock nnU-Net's path), never re-derived from CLI flags, so an export
  cannot silently build a different architecture than was trained. Weights load strictly.
- Export is not done until ONNX Runtime reproduces the torch logits within a tolerance (verify.py): a failure
  exits non-zero and writes no file.
- Shapes mean what the docs say (onnx_graph.py: the traced shapes and torch's exporter).
- The file carries its inference metadata (metadata.py) and gets its own sidecar beside it,
  `<stem>.nnunet_inference.json` (contract.sidecar_path), so exports sharing a folder never share metadata.

Export and verification run on the CPU on purpose: the graph does not depend on the device it was traced on,
and fp32 CPU is the reference the ONNX graph is held against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_distill import metadata as md
from nnunet_distill import checksums, contract
from nnunet_distill.atomic import atomic_write_bytes
from nnunet_distill.trained_student import (  # the first half: find and rebuild the student
    CHECKPOINT_NAMES as CHECKPOINT_NAMES,
    CheckpointError as CheckpointError,
    ExportError,
    LoadedStudent,
    StudentNotFoundError as StudentNotFoundError,
    find_student_fold_dir,
    load_student,
    results_root,
)
from nnunet_distill.onnx_graph import (  # the graph itself: shapes and torch's exporter
    DEFAULT_OPSET,
    ShapeSpec,
    export_graph,
    io_description,
    quiet,
    resolve_shape as resolve_shape,
    verification_shapes,
)
from nnunet_distill.verify import Comparison, Tolerance
from nnunet_distill.verify import report as verification_report


@dataclass(frozen=True)
class ExportRequest:
    """What both CLIs resolve their flags to. `plans_identifier` is the student's own plans (e.g.
    nnUNetPlans_r2)."""

    dataset: str
    plans_identifier: str
    configuration: str = contract.DEFAULT_CONFIGURATION
    fold: str = "0"
    use_da5: bool = False
    checkpoint_name: str = "checkpoint_final.pth"
    output: Path | None = None
    dynamic: bool = False
    dynamic_batch: bool = False
    input_shape: tuple[int, ...] | None = None
    batch: int = 1
    tensorrt: bool = False
    simplify: bool = False
    opset: int = DEFAULT_OPSET
    tolerance: Tolerance = field(default_factory=Tolerance)
    #: Recorded in the metadata when the checkpoint does not say which teacher plans it was distilled from.
    teacher_plans: str | None = None
    #: The student must have been distilled from these teacher plans (ResEnc `-p`/`-tpl`); None: any.
    expected_teacher_plans: str | None = None
    verbose: bool = False


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    metadata: dict
    comparisons: list[Comparison]


def _fingerprint_sha256(model_dir: Path, dataset_name: str) -> str | None:
    candidates = [model_dir / "dataset_fingerprint.json"]
    preprocessed = os.environ.get(contract.ENV_NNUNET_PREPROCESSED)
    if preprocessed:
        candidates.append(Path(preprocessed) / dataset_name / "dataset_fingerprint.json")
    for path in candidates:
        if path.is_file():
            return checksums.sha256_file(path)
    return None


def _metrics(fold_dir: Path) -> dict | None:
    def load(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None

    validation = fold_dir / "validation"
    return md.metrics_from_summaries(
        load(validation / "distillation_summary.json"), load(validation / "summary.json")
    )


def _real_patch(student: LoadedStudent, spatial: Sequence[int]) -> tuple[np.ndarray, str] | None:
    from nnunet_distill.verify import load_preprocessed_patch

    root = os.environ.get(contract.ENV_NNUNET_PREPROCESSED)
    if not root:
        return None
    data_identifier = student.plans["configurations"].get(student.configuration, {}).get("data_identifier")
    if data_identifier is None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        data_identifier = PlansManager(student.plans).get_configuration(student.configuration).data_identifier
    folder = Path(root) / student.plans["dataset_name"] / data_identifier
    return load_preprocessed_patch(folder, spatial)


def export_student(
    req: ExportRequest, default_output: Callable[[Path], Path], log: Callable[[str], None] = print
) -> ExportResult:
    """Find, rebuild, export, (fix for TensorRT), (simplify), verify, annotate and write one student."""
    vlog = log if req.verbose else (lambda _msg: None)
    student = _find_student(req, vlog)
    spec, divisor = _export_shape(student, req, vlog)
    inputs, real_case = _verification_inputs(student, spec, divisor, log, vlog)
    model, comparisons, trt_report = _verified_graph(student, req, spec, divisor, inputs, vlog)
    verification = verification_report(comparisons, req.tolerance, real_case)
    if trt_report:
        verification["tensorrt"] = trt_report
    io = io_description(model, spec, divisor, req.opset, tensorrt=req.tensorrt, simplified=req.simplify)
    meta = _inference_metadata(student, req, io, verification)
    annotate_graph(model, meta)
    out = Path(req.output) if req.output else default_output(student.fold_dir)
    sidecar = write_export(model, meta, out)
    return ExportResult(out, sidecar, meta, comparisons)


def _find_student(req: ExportRequest, vlog: Callable[[str], None]) -> LoadedStudent:
    """The student trained with the request's arguments, rebuilt by stock nnU-Net, of the teachers asked
    for."""
    fold_dir = find_student_fold_dir(
        results_root(),
        req.dataset,
        req.plans_identifier,
        req.configuration,
        req.fold,
        req.use_da5,
        req.checkpoint_name,
    )
    vlog(f"student: {fold_dir / req.checkpoint_name}")
    student = load_student(fold_dir, req.checkpoint_name, req.configuration)
    check_teacher_plans(student, req.expected_teacher_plans)
    return student


def check_teacher_plans(student: LoadedStudent, expected: str | None) -> None:
    """Refuse a student distilled from other teachers than the export asked for (ResEnc `-p`/`-tpl`).

    The student's folder name does not say which teacher plans it came from, so the checkpoint's own record
    decides; a checkpoint without one (not trained by this tool) cannot be checked and is accepted.
    """
    recorded = (student.distillation or {}).get("teacher_plans")
    if expected is None or recorded is None or recorded == expected:
        return
    raise ExportError(
        f"the student at {student.fold_dir} was distilled from {recorded} teachers, not {expected} "
        f"(-p/-tpl); pass -tpl {recorded}, or the -spl/-bs/-r of the student distilled from {expected}"
    )


def _export_shape(
    student: LoadedStudent, req: ExportRequest, vlog: Callable[[str], None]
) -> tuple[ShapeSpec, list[int]]:
    """The traced shape and the per-axis stride its dynamic spatial sizes must be multiples of."""
    plans_cfg = md.plans_for_inference(student.plans, req.configuration)["configurations"][req.configuration]
    divisor = md.spatial_divisor(plans_cfg)
    spec = resolve_shape(
        _num_input_channels(student),
        plans_cfg["patch_size"],
        divisor,
        dynamic=req.dynamic,
        dynamic_batch=req.dynamic_batch,
        input_shape=req.input_shape,
        batch=req.batch,
    )
    if req.tensorrt and not spec.static:
        raise ExportError(
            "--trt/-fix needs static shapes (TensorRT engines here are built per shape); drop "
            "-da/-nn or pass a fixed batch size"
        )
    vlog(
        f"student: {student.trainer_name} {plans_cfg.get('architecture', {}).get('network_class_name')}, "
        f"{student.parameters:,} parameters; export shape {list(spec.example)} (dynamic batch "
        f"{spec.dynamic_batch}, dynamic spatial {spec.dynamic_spatial}, multiples of {divisor})"
    )
    return spec, divisor


def _verification_inputs(
    student: LoadedStudent,
    spec: ShapeSpec,
    divisor: Sequence[int],
    log: Callable[[str], None],
    vlog: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], str | None]:
    """Random inputs for every dynamic axis, plus one real preprocessed patch when the dataset is at hand."""
    from nnunet_distill.verify import random_inputs

    inputs = random_inputs(verification_shapes(spec, divisor))
    try:
        real = _real_patch(student, spec.example[2:])
    except Exception as exc:  # noqa: BLE001 - an unreadable preprocessed case must not hide the random checks
        log(
            f"warning: could not read a preprocessed case for verification ({type(exc).__name__}: {exc}); "
            "verifying on random inputs only"
        )
        real = None
    if real is None:
        vlog("verify: no preprocessed case found under $nnUNet_preprocessed; verifying on random inputs only")
        return inputs, None
    patch, case = real
    missing = spec.example[1] - patch.shape[0]
    if missing > 0:  # a cascade also takes the previous stage's one-hot channels: here all background
        patch = np.concatenate([patch, np.zeros((missing, *patch.shape[1:]), dtype=patch.dtype)])
    inputs[f"preprocessed:{case}"] = np.repeat(patch[None], spec.example[0], axis=0)
    return inputs, case


def _verified_graph(
    student: LoadedStudent,
    req: ExportRequest,
    spec: ShapeSpec,
    divisor: Sequence[int],
    inputs: dict[str, np.ndarray],
    vlog: Callable[[str], None],
) -> tuple[Any, list[Comparison], dict | None]:
    """(graph, comparisons, TensorRT report): the graph as written, checked against torch after each
    rewrite."""
    from nnunet_distill import trt_graph
    from nnunet_distill.verify import run_torch

    model = export_graph(student.network, spec, divisor, req.opset, silent=not req.verbose)
    if req.tensorrt:
        model, folded = trt_graph.fold_instance_norm_constants(model)
        vlog(f"tensorrt: folded {folded} InstanceNormalization scale/bias input(s) into initializers")
    reference = run_torch(student.network, inputs)
    comparisons = _compare(model, student, inputs, reference, req.tolerance, vlog, "")
    if req.simplify:
        model = _simplify(model, silent=not req.verbose)
        comparisons = _compare(model, student, inputs, reference, req.tolerance, vlog, "after -sim: ")
    trt_report = _tensorrt_report(model, student, vlog) if req.tensorrt else None
    return model, comparisons, trt_report


def _compare(model, student, inputs, reference, tol: Tolerance, vlog, prefix: str) -> list[Comparison]:
    """ONNX Runtime on the graph against the torch reference; raises VerificationError beyond `tol`."""
    from nnunet_distill.verify import verify

    comparisons = verify(
        model.SerializeToString(),
        student.network,
        inputs,
        input_name=md.INPUT_NAME,
        has_regions=_has_regions(student),
        tol=tol,
        reference=reference,
    )
    for c in comparisons:
        vlog(prefix + c.line(tol))
    return comparisons


def _tensorrt_report(model, student: LoadedStudent, vlog: Callable[[str], None]) -> dict:
    """Refuse a graph TensorRT cannot parse; report the InstanceNorm weights matched to the checkpoint."""
    from nnunet_distill import trt_graph

    problems = trt_graph.tensorrt_problems(model)
    if problems:
        raise trt_graph.TensorRTGraphError("graph is not TensorRT-parsable: " + "; ".join(problems))
    trt_report = trt_graph.instance_norm_weight_check(model, student.state_dict, student.affine_norms)
    vlog(
        f"tensorrt: static shapes, {len({n.op_type for n in model.graph.node})} op types all supported, "
        f"{trt_report['instance_norm_matched_to_checkpoint']}/{trt_report['instance_norm_nodes']} "
        "InstanceNorm scale/bias initializers equal to the checkpoint"
    )
    return trt_report


def _inference_metadata(student: LoadedStudent, req: ExportRequest, io: dict, verification: dict) -> dict:
    """metadata.build_inference_metadata fed from the student, its folder and the request."""
    model_dir = student.fold_dir.parent
    return md.build_inference_metadata(
        plans=student.plans,
        dataset_json=student.dataset_json,
        configuration=req.configuration,
        fold=req.fold,
        student_folder=f"{model_dir.parent.name}/{model_dir.name}",
        checkpoint_name=req.checkpoint_name,
        checkpoint_trainer=student.trainer_name,
        mirror_axes=student.mirror_axes,
        distillation=_distillation_info(student, req),
        io=io,
        versions=md.package_versions(),
        fingerprint_sha256=_fingerprint_sha256(model_dir, student.plans["dataset_name"]),
        parameters=student.parameters,
        metrics=_metrics(student.fold_dir),
        verification=verification,
    )


def annotate_graph(model, meta: dict) -> None:
    """Embed the metadata in the graph, so the file alone is enough to serve it."""
    import onnx

    onnx.helper.set_model_props(model, md.to_metadata_props(meta))
    model.doc_string = (
        f"nnU-Net distilled student {meta['model_name']}: input {meta['io']['input_shape']} "
        f"float32 (nnU-Net-preprocessed patch), output logits {meta['io']['output_shape']}"
    )


def write_export(model, meta: dict, out: Path) -> Path:
    """Write the graph to `out` and its own sidecar beside it (contract.sidecar_path); returns the sidecar.

    The sidecar is named after the graph, not after the folder, so several exports in one folder each keep
    their own metadata. Both files are world-readable: serving pods on shared volumes read them.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model.SerializeToString(), out, mode=0o644)
    sidecar = contract.sidecar_path(out)
    atomic_write_bytes(md.dumps(meta).encode(), sidecar, mode=0o644)
    return sidecar


def _has_regions(student: LoadedStudent) -> bool:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(student.plans).get_label_manager(student.dataset_json).has_regions


def _num_input_channels(student: LoadedStudent) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(student.plans)
    return int(
        determine_num_input_channels(pm, pm.get_configuration(student.configuration), student.dataset_json)
    )


def _distillation_info(student: LoadedStudent, req: ExportRequest) -> dict:
    """The checkpoint's own record wins; export flags only fill what an older checkpoint did not store."""
    info = dict(student.distillation or {})
    info.setdefault("student_plans", req.plans_identifier)
    info.setdefault("da5", req.use_da5)
    if req.teacher_plans:
        info.setdefault("teacher_plans", req.teacher_plans)
    return info


def _simplify(model, silent: bool):
    import onnxslim

    with quiet(silent):
        try:
            return onnxslim.slim(model)
        except Exception as exc:  # noqa: BLE001 - onnxslim surfaces onnx/onnxruntime errors of any type
            raise ExportError(
                f"-sim: onnxslim failed ({type(exc).__name__}: {exc}); export without -sim"
            ) from None
