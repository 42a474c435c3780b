"""Make an exported student graph one that TensorRT's ONNX parser accepts, and prove it.

TensorRT builds engines from static shapes, knows a fixed list of ONNX ops, rejects data-dependent control
flow, and wants InstanceNormalization's scale and bias as constant weights (initializers), not tensors
computed by other nodes. The original `-fix` looked such biases up by name and, when the lookup failed,
inserted zeros with only a warning, silently changing the model. Here constants are folded from what the graph
itself computes (Constant nodes, Identity chains over initializers); anything that cannot be folded is an
error, and the folded values are then compared with the checkpoint's own tensors
(:func:`instance_norm_weight_check`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

# Ops the TensorRT ONNX parser (onnx-tensorrt, TensorRT 8.6 and 10) implements for the default domain.
# Control flow (If/Loop/Scan) and data-dependent-shape ops (NonZero, Unique, NonMaxSuppression) are left out
# on purpose: a U-Net never needs them and they defeat static engine building.
TENSORRT_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DepthToSpace",
        "Div",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GroupNormalization",
        "HardSigmoid",
        "Identity",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "LRN",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pad",
        "Pow",
        "PRelu",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "Round",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
TENSORRT_MAX_OPSET = 17  # the newest opset TensorRT 8.6 parses; TensorRT 10 parses it too


class TensorRTGraphError(ValueError):
    """The graph cannot be made TensorRT-parsable without changing what it computes."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _constant_value(
    name: str, inits: Mapping[str, onnx.TensorProto], producers: Mapping[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The value of tensor `name` if the graph fixes it: an initializer, a Constant node, or Identity of
    those."""
    seen = set()
    while name not in inits:
        node = producers.get(name)
        if node is None or name in seen:
            return None
        seen.add(name)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
            return None
        if node.op_type != "Identity":
            return None
        name = node.input[0]
    return numpy_helper.to_array(inits[name])


def fold_instance_norm_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewire every InstanceNormalization scale/bias that is a graph-computed constant to an initializer.

    Returns the (copied) model and how many inputs were folded. Raises when a scale or bias depends on the
    input data: such a graph has no constant weights to give TensorRT, and inventing them would change the
    model.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = _producers(graph)
    folded = 0
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        for slot in (1, 2):
            name = node.input[slot]
            if name in inits:
                continue
            value = _constant_value(name, inits, producers)
            if value is None:
                what = "scale" if slot == 1 else "bias"
                raise TensorRTGraphError(
                    f"InstanceNormalization {node.name or node.output[0]!r}: {what} {name!r} is computed "
                    "from "
                    "the input, not a constant; refusing to substitute values (the original tool zero-filled "
                    "here)"
                )
            new_name = f"{name}__folded"
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), new_name)
            graph.initializer.append(tensor)
            inits[new_name] = tensor
            node.input[slot] = new_name
            folded += 1
    if folded:
        model = _drop_dead_nodes(model)
    return model, folded


def _drop_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove nodes whose outputs no longer feed anything (the Constant nodes just folded away)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    return model


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Everything that would stop TensorRT from parsing `model` into a static engine; empty when none.

    Pure inspection: opset, op types and domains, control flow, static input/output/intermediate shapes, and
    InstanceNormalization weights as initializers.
    """
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > TENSORRT_MAX_OPSET:
        problems.append(f"default-domain opset {opset} is newer than {TENSORRT_MAX_OPSET}")
    return (
        problems + _op_problems(model.graph) + _shape_problems(model) + _instance_norm_problems(model.graph)
    )


def _op_problems(graph: onnx.GraphProto) -> list[str]:
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name!r} uses custom domain {node.domain!r} ({node.op_type})")
        elif node.op_type in CONTROL_FLOW_OPS:
            problems.append(f"node {node.name!r} is control flow ({node.op_type})")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"node {node.name!r}: op {node.op_type} is not supported by TensorRT")
    return problems


def _shape_problems(model: onnx.ModelProto) -> list[str]:
    problems = []
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            dims = _dims(v)
            if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
                problems.append(f"graph {kind} {v.name!r} has a non-static shape {dims}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError subclasses and plain RuntimeErrors
        problems.append(f"ONNX shape inference failed: {exc}")
    else:
        for v in inferred.graph.value_info:
            dims = _dims(v)
            if any(not isinstance(d, int) or d <= 0 for d in dims):
                problems.append(f"intermediate tensor {v.name!r} has a non-static shape {dims}")
    return problems


def _instance_norm_problems(graph: onnx.GraphProto) -> list[str]:
    problems = []
    inits = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "InstanceNormalization":
            for slot, what in ((1, "scale"), (2, "bias")):
                if node.input[slot] not in inits:
                    problems.append(f"InstanceNormalization {node.name!r}: {what} is not an initializer")
    return problems


def instance_norm_weight_check(
    model: onnx.ModelProto, state_dict: Mapping[str, object], expected_affine_norms: int
) -> dict[str, int]:
    """Compare every InstanceNormalization scale/bias initializer with the checkpoint tensor of the same name.

    The exporter keeps parameter names, so each affine norm's weight and bias must be found in the checkpoint
    and be equal to it. Returns counts for the report; raises when a value differs from the checkpoint or when
    fewer norms are backed by checkpoint tensors than the network has affine norm layers (which is what a
    zero-filled or invented bias would look like).
    """
    inits = {t.name: t for t in model.graph.initializer}
    matched = nodes = 0
    for node in model.graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        nodes += 1
        names = [node.input[1], node.input[2]]
        found = 0
        for name in names:
            key = name.removesuffix("__folded")
            if key not in state_dict or name not in inits:
                continue
            ref = np.asarray(
                state_dict[key].detach().cpu().numpy()
                if hasattr(state_dict[key], "detach")
                else state_dict[key],
                dtype=np.float32,
            ).reshape(-1)
            got = numpy_helper.to_array(inits[name]).astype(np.float32).reshape(-1)
            if ref.shape != got.shape or not np.array_equal(ref, got):
                raise TensorRTGraphError(
                    f"InstanceNormalization {node.name!r}: {name!r} differs from the "
                    f"checkpoint tensor {key!r}"
                )
            found += 1
        if found == 2:
            matched += 1
    if matched < expected_affine_norms:
        raise TensorRTGraphError(
            f"only {matched} of {expected_affine_norms} affine InstanceNorm layers have "
            "scale and bias initializers equal to the checkpoint's weights"
        )
    return {"instance_norm_nodes": nodes, "instance_norm_matched_to_checkpoint": matched}
