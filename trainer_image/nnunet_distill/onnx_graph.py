"""The ONNX graph of a student: the shapes it is traced at and torch's (dynamo) exporter, nothing else.

Shapes mean what the export CLIs' docs say: static by default, `-da` dynamic batch and spatial axes (spatial
sizes are multiples of the encoder's total stride, which the graph and the metadata state), `-nn`/ResEnc
`-b 0` dynamic batch only. Pure shape logic and the exporter call live here; finding the student, verifying
and writing the files are export.py's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nnunet_distill import metadata as md
from nnunet_distill.trained_student import ExportError

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
def quiet(enabled: bool):
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
    network, spec: ShapeSpec, divisor: Sequence[int], opset: int = DEFAULT_OPSET, silent: bool = True
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
    with quiet(silent):
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
