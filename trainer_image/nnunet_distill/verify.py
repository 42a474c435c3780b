"""Prove that an exported graph computes what the torch student computes, or fail the export.

The original exporter compared onnxruntime with torch on one random tensor and only printed "good" or a
warning, whatever the difference. A wrong graph then reached production silently. Here the comparison is a
gate: logits must agree within a tolerance and the resulting segmentation (argmax, or thresholded regions for
region-based models) must agree voxel-wise, on random inputs of every shape the graph promises to accept and
on a real preprocessed patch of the dataset when one is on disk (random noise exercises no learned features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


class VerificationError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerance: the graph must not be shipped."""


@dataclass(frozen=True)
class Tolerance:
    """max|Δlogit| must be <= atol + rtol·max|torch logit|; segmentations must agree on >= min_agreement
    voxels."""

    atol: float = 1e-3
    rtol: float = 1e-3
    min_agreement: float = 0.999


@dataclass(frozen=True)
class Comparison:
    input_name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float
    agreement: float
    passed: bool

    def line(self, tol: Tolerance) -> str:
        limit = tol.atol + tol.rtol * self.max_abs_reference
        status = "ok" if self.passed else "FAILED"
        return (
            f"verify {self.input_name} {'x'.join(map(str, self.shape))}: max|Δlogit|={self.max_abs_diff:.3e} "
            f"(limit {limit:.3e}), segmentation agreement={100 * self.agreement:.4f}% "
            f"(min {100 * tol.min_agreement:.2f}%) {status}"
        )


def segmentation_agreement(reference: np.ndarray, candidate: np.ndarray, has_regions: bool) -> float:
    """Fraction of voxels (times region channels) whose predicted class is the same in both logit arrays.

    Softmax models segment by argmax over channels; region models threshold each sigmoid channel at 0.5,
    i.e. the logit at 0, so that is what must agree for them.
    """
    if has_regions:
        return float(np.mean((reference > 0) == (candidate > 0)))
    return float(np.mean(reference.argmax(1) == candidate.argmax(1)))


def compare(
    input_name: str, reference: np.ndarray, candidate: np.ndarray, has_regions: bool, tol: Tolerance
) -> Comparison:
    if reference.shape != candidate.shape:
        raise VerificationError(
            f"{input_name}: ONNX output shape {candidate.shape} != torch output shape {reference.shape}"
        )
    if not np.all(np.isfinite(candidate)):
        raise VerificationError(f"{input_name}: ONNX output contains NaN or inf")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    ref_max = float(np.max(np.abs(reference)))
    agreement = segmentation_agreement(reference, candidate, has_regions)
    passed = diff <= tol.atol + tol.rtol * ref_max and agreement >= tol.min_agreement
    return Comparison(input_name, tuple(reference.shape), diff, ref_max, agreement, passed)


def random_inputs(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal tensors (nnU-Net normalises intensities to roughly that range) of each shape."""
    rng = np.random.default_rng(seed)
    return {f"random#{i}": rng.standard_normal(shape, dtype=np.float32) for i, shape in enumerate(shapes)}


def crop_or_pad(image: np.ndarray, patch_size: Sequence[int], center: Sequence[int]) -> np.ndarray:
    """A (C, *patch_size) window of a (C, *spatial) image around `center`, zero-padded where the image is
    smaller.

    Zero padding matches what nnU-Net's sliding window does with images smaller than the patch.
    """
    spatial = image.shape[1:]
    out = np.zeros((image.shape[0], *patch_size), dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for size, p, c in zip(spatial, patch_size, center, strict=False):
        if size >= p:
            start = int(min(max(c - p // 2, 0), size - p))
            src.append(slice(start, start + p))
            dst.append(slice(0, p))
        else:
            offset = (p - size) // 2
            src.append(slice(0, size))
            dst.append(slice(offset, offset + size))
    out[tuple(dst)] = image[tuple(src)]
    return out


def load_preprocessed_patch(folder: str | Path, patch_size: Sequence[int]) -> tuple[np.ndarray, str] | None:
    """A patch of the first (sorted) preprocessed case in an nnU-Net data folder, centred on its foreground.

    Returns (patch (C, *patch_size) float32, case identifier), or None when the folder holds no cases: the
    export still verifies on random inputs, and the report says the real patch was unavailable.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.pkl")):
        return None
    dataset_class = infer_dataset_class(str(folder))
    identifiers = sorted(dataset_class.get_identifiers(str(folder)))
    if not identifiers:
        return None
    case = identifiers[0]
    data, seg, _, _ = dataset_class(str(folder), identifiers=[case]).load_case(case)
    data = np.asarray(data[:], dtype=np.float32)
    seg = np.asarray(seg[:])
    foreground = np.argwhere(seg[0] > 0)
    if len(foreground):
        center = ((foreground.min(0) + foreground.max(0)) // 2).tolist()
    else:
        center = [s // 2 for s in data.shape[1:]]
    return crop_or_pad(data, patch_size, center), case


def run_onnxruntime(
    model_bytes: bytes, inputs: dict[str, np.ndarray], input_name: str, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Run a serialized graph on CPU for each named input (CPU: the reference runtime, deterministic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return {name: session.run(None, {input_name: x})[0] for name, x in inputs.items()}


def run_torch(network, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    outputs = {}
    with torch.inference_mode():
        for name, x in inputs.items():
            y = network(torch.from_numpy(x))
            if isinstance(y, (list, tuple)):
                y = y[0]
            outputs[name] = y.float().cpu().numpy()
    return outputs


def verify(
    model_bytes: bytes,
    network,
    inputs: dict[str, np.ndarray],
    *,
    input_name: str,
    has_regions: bool,
    tol: Tolerance,
    reference: dict[str, np.ndarray] | None = None,
) -> list[Comparison]:
    """Compare ONNX Runtime with torch on every input; raise VerificationError listing each failing one.

    `reference` lets a second verification (after simplification) reuse the torch outputs of the first.
    """
    reference = reference if reference is not None else run_torch(network, inputs)
    candidate = run_onnxruntime(model_bytes, inputs, input_name)
    results = [compare(name, reference[name], candidate[name], has_regions, tol) for name in inputs]
    failed = [r for r in results if not r.passed]
    if failed:
        raise VerificationError(
            "ONNX Runtime output differs from the torch student: " + "; ".join(r.line(tol) for r in failed)
        )
    return results


def report(results: Sequence[Comparison], tol: Tolerance, real_patch: str | None) -> dict:
    """The verification record stored in the model metadata."""
    return {
        "runtime": "onnxruntime CPUExecutionProvider vs torch (fp32, CPU)",
        "tolerance": asdict(tol),
        "real_patch_case": real_patch,
        "max_abs_diff": _rounded(max(r.max_abs_diff for r in results)),
        "min_agreement": _rounded(min(r.agreement for r in results)),
        "inputs": [
            {
                "name": r.input_name,
                "shape": list(r.shape),
                "max_abs_diff": _rounded(r.max_abs_diff),
                "agreement": _rounded(r.agreement),
            }
            for r in results
        ],
    }


def _rounded(x: float) -> float:
    """Three significant digits: enough to judge, and stable across thread-count noise in the last bits."""
    return float(f"{x:.3g}")
