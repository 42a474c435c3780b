"""One exporter behind both export CLIs: find the student, rebuild it with stock nnU-Net, export, verify.

Why it differs from the original tool:
- The student is found from the arguments it was trained with and rebuilt from its own `plans.json` by the
  trainer class its checkpoint names (stock nnU-Net's path), never re-derived from CLI flags, so an export
  cannot silently build a different architecture than was trained. Weights load strictly.
- Export is not done until ONNX Runtime reproduces the torch logits within a tolerance (verify.py): a failure
  exits non-zero and writes no file.
- Shapes mean what the docs say: static by default, `-da` dynamic batch and spatial axes (spatial sizes are
  multiples of the encoder's total stride, which the graph and the metadata state), `-nn`/ResEnc `-b 0`
  dynamic batch only.
- The file carries its inference metadata (metadata.py) and gets an `nnunet_inference.json` beside it.

Export and verification run on the CPU on purpose: the graph does not depend on the device it was traced on,
and fp32 CPU is the reference the ONNX graph is held against.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
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
from nnunet_distill.verify import Comparison, Tolerance

DEFAULT_OPSET = 17


# ------------------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class ShapeSpec:
    """The traced example shape and which axes stay symbolic in the graph."""

    example: tuple[int, ...]
    dynamic_batch: bool
    dynamic_spatial: bool

    @property
    def static(self) -> bool:
        return not (self.dynamic_batch or self.dynamic_spatial)


def resolve_shape(
    num_channels: int,
    patch_size: Sequence[int],
    divisor: Sequence[int],
    *,
    dynamic: bool = False,
    dynamic_batch: bool = False,
    input_shape: Sequence[int] | None = None,
    batch: int = 1,
) -> ShapeSpec:
    """Pure: turn the CLI's shape options into a ShapeSpec, rejecting shapes the network cannot take."""
    ndim = len(patch_size)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2 + ndim:
            raise ExportError(
                f"-is needs {2 + ndim} numbers (b c {' '.join('xyz'[:ndim])}) for this "
                f"{ndim}D model, got {len(shape)}"
            )
        if shape[1] != num_channels:
            raise ExportError(
                f"-is channel count {shape[1]} does not match the model's {num_channels} input channel(s)"
            )
        if any(s < 1 for s in shape):
            raise ExportError(f"-is sizes must be positive, got {list(shape)}")
        bad = [(s, d) for s, d in zip(shape[2:], divisor, strict=False) if s % d]
        if bad:
            raise ExportError(
                f"-is spatial sizes {list(shape[2:])} must be multiples of {list(divisor)} (the "
                "network's total stride per axis)"
            )
    else:
        if batch < 1:
            raise ExportError(f"batch size must be >= 1, got {batch}")
        shape = (batch, num_channels, *[int(p) for p in patch_size])
    return ShapeSpec(example=shape, dynamic_batch=dynamic or dynamic_batch, dynamic_spatial=dynamic)


def verification_shapes(spec: ShapeSpec, divisor: Sequence[int]) -> list[tuple[int, ...]]:
    """Random-input shapes that exercise every axis the graph leaves dynamic, besides the example itself."""
    shapes = [spec.example]
    b, c, *spatial = spec.example
    if spec.dynamic_batch:
        shapes.append((2 if b == 1 else 1, c, *spatial))
    if spec.dynamic_spatial:
        shapes.append((b, c, *[s + d for s, d in zip(spatial, divisor, strict=False)]))
    return shapes


# ------------------------------------------------------------------------------------------------------------
# graph export


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence the exporter's chatter (opset conversion notes, deprecation warnings) unless -v."""
    if not enabled:
        yield
        return
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._dynamo",
            "onnxscript",
            "onnx_ir",
            "torch.fx.experimental.symbolic_shapes",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=False):
            lg.setLevel(level)


def _single_output(network):
    """The network itself when it returns one tensor; else a wrapper returning the full-resolution output."""
    import torch

    class FullResolution(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    return FullResolution(network)


def export_graph(
    network, spec: ShapeSpec, divisor: Sequence[int], opset: int = DEFAULT_OPSET, quiet: bool = True
) -> onnx.ModelProto:  # noqa: F821
    """Trace with torch's (dynamo) ONNX exporter; dynamic spatial dims are declared as multiples of `divisor`.

    Input and output are named `input` and `output` (raw logits, no softmax in the graph), as the original
    tool did, so existing serving code keeps working.
    """
    import onnx
    import torch
    from torch.export import Dim

    example = torch.zeros(spec.example, dtype=torch.float32)
    with torch.inference_mode():
        probe = network(example)
    module = _single_output(network) if isinstance(probe, (list, tuple)) else network
    axes: dict[int, Any] = {}
    if spec.dynamic_batch:
        axes[0] = Dim("batch", min=1, max=1024)
    if spec.dynamic_spatial:
        for i, d in enumerate(divisor):
            blocks = Dim(f"{'xyz'[i]}_blocks", min=1, max=max(2, 4096 // d))
            axes[2 + i] = blocks * d if d > 1 else blocks
    kwargs = {"dynamic_shapes": (axes,)} if axes else {}
    with _quiet(quiet):
        program = torch.onnx.export(
            module,
            (torch.randn(spec.example),),
            dynamo=True,
            opset_version=opset,
            input_names=[md.INPUT_NAME],
            output_names=[md.OUTPUT_NAME],
            external_data=False,
            verbose=False,
            **kwargs,
        )
    model = program.model_proto
    _name_dynamic_dims(model, spec)
    onnx.checker.check_model(model, full_check=True)
    return model


def _name_dynamic_dims(model, spec: ShapeSpec) -> None:
    """Give graph input/output dims readable names: `batch`, `x`, `y`, `z` (instead of `8*x_blocks`)."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                continue
            dim.dim_param = "batch" if i == 0 else "xyz"[i - 2]


def io_description(
    model, spec: ShapeSpec, divisor: Sequence[int], opset: int, *, tensorrt: bool, simplified: bool
) -> dict:
    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    return {
        "input_name": md.INPUT_NAME,
        "output_name": md.OUTPUT_NAME,
        "input_shape": dims(model.graph.input[0]),
        "output_shape": dims(model.graph.output[0]),
        "dtype": "float32",
        "output_kind": "logits",
        "dynamic_batch": spec.dynamic_batch,
        "dynamic_spatial": spec.dynamic_spatial,
        "spatial_multiple_of": list(divisor) if spec.dynamic_spatial else None,
        "opset": opset,
        "tensorrt_ready": tensorrt,
        "simplified": simplified,
        "exporter": "torch.onnx.export(dynamo=True)",
    }


# ------------------------------------------------------------------------------------------------------------
# the whole export


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
    teacher_plans: str | None = None
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
    import onnx

    from nnunet_distill import trt_graph
    from nnunet_distill.verify import random_inputs, report, run_torch, verify

    vlog = log if req.verbose else (lambda _msg: None)
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
    plans_cfg = md.plans_for_inference(student.plans, req.configuration)["configurations"][req.configuration]
    divisor = md.spatial_divisor(plans_cfg)
    has_regions = _has_regions(student)
    num_channels = _num_input_channels(student)
    spec = resolve_shape(
        num_channels,
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

    model = export_graph(student.network, spec, divisor, req.opset, quiet=not req.verbose)
    if req.tensorrt:
        model, folded = trt_graph.fold_instance_norm_constants(model)
        vlog(f"tensorrt: folded {folded} InstanceNormalization scale/bias input(s) into initializers")

    inputs = random_inputs(verification_shapes(spec, divisor))
    try:
        real = _real_patch(student, spec.example[2:])
    except Exception as exc:  # noqa: BLE001 - an unreadable preprocessed case must not hide the random checks
        log(
            f"warning: could not read a preprocessed case for verification ({type(exc).__name__}: {exc}); "
            "verifying on random inputs only"
        )
        real = None
    if real is not None:
        patch, case = real
        inputs[f"preprocessed:{case}"] = np.repeat(patch[None], spec.example[0], axis=0)
    else:
        vlog("verify: no preprocessed case found under $nnUNet_preprocessed; verifying on random inputs only")
    reference = run_torch(student.network, inputs)
    comparisons = verify(
        model.SerializeToString(),
        student.network,
        inputs,
        input_name=md.INPUT_NAME,
        has_regions=has_regions,
        tol=req.tolerance,
        reference=reference,
    )
    for c in comparisons:
        vlog(c.line(req.tolerance))

    if req.simplify:
        model = _simplify(model, quiet=not req.verbose)
        comparisons = verify(
            model.SerializeToString(),
            student.network,
            inputs,
            input_name=md.INPUT_NAME,
            has_regions=has_regions,
            tol=req.tolerance,
            reference=reference,
        )
        for c in comparisons:
            vlog("after -sim: " + c.line(req.tolerance))

    trt_report = None
    if req.tensorrt:
        problems = trt_graph.tensorrt_problems(model)
        if problems:
            raise trt_graph.TensorRTGraphError("graph is not TensorRT-parsable: " + "; ".join(problems))
        trt_report = trt_graph.instance_norm_weight_check(model, student.state_dict, student.affine_norms)
        vlog(
            f"tensorrt: static shapes, {len({n.op_type for n in model.graph.node})} op types all supported, "
            f"{trt_report['instance_norm_matched_to_checkpoint']}/{trt_report['instance_norm_nodes']} "
            "InstanceNorm scale/bias initializers equal to the checkpoint"
        )

    verification = report(comparisons, req.tolerance, real[1] if real else None)
    if trt_report:
        verification["tensorrt"] = trt_report
    model_dir = fold_dir.parent
    meta = md.build_inference_metadata(
        plans=student.plans,
        dataset_json=student.dataset_json,
        configuration=req.configuration,
        fold=req.fold,
        student_folder=f"{model_dir.parent.name}/{model_dir.name}",
        checkpoint_name=req.checkpoint_name,
        checkpoint_trainer=student.trainer_name,
        mirror_axes=student.mirror_axes,
        distillation=_distillation_info(student, req),
        io=io_description(model, spec, divisor, req.opset, tensorrt=req.tensorrt, simplified=req.simplify),
        versions=md.package_versions(),
        fingerprint_sha256=_fingerprint_sha256(model_dir, student.plans["dataset_name"]),
        parameters=student.parameters,
        metrics=_metrics(fold_dir),
        verification=verification,
    )
    onnx.helper.set_model_props(model, md.to_metadata_props(meta))
    model.doc_string = (
        f"nnU-Net distilled student {meta['model_name']}: input {meta['io']['input_shape']} "
        f"float32 (nnU-Net-preprocessed patch), output logits {meta['io']['output_shape']}"
    )

    out = Path(req.output) if req.output else default_output(fold_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model.SerializeToString(), out, mode=0o644)  # shared volumes: others read it
    sidecar = out.parent / md.SIDECAR_NAME
    atomic_write_bytes(md.dumps(meta).encode(), sidecar, mode=0o644)
    return ExportResult(out, sidecar, meta, comparisons)


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


def _simplify(model, quiet: bool):
    import onnxslim

    with _quiet(quiet):
        try:
            return onnxslim.slim(model)
        except Exception as exc:  # noqa: BLE001 - onnxslim surfaces onnx/onnxruntime errors of any type
            raise ExportError(
                f"-sim: onnxslim failed ({type(exc).__name__}: {exc}); export without -sim"
            ) from None
