"""nnU-Net's predictor with the network call served by ONNX Runtime.

Everything that makes an nnU-Net prediction correct stays nnU-Net's own code: reading the image with the
plans' reader, cropping, resampling to the target spacing, per-channel normalisation, padding, the sliding
window with Gaussian weighting, mirroring test-time augmentation, resampling back and export. Only the forward
pass changes: `nnUNetPredictor.network` becomes :class:`OnnxNetwork`, a torch module whose forward runs an
ONNX Runtime session. Nothing here is a second sliding window.

The predictor needs only what `nnunet-distill package` ships (the ONNX file and its metadata): plans,
configuration and dataset.json are rebuilt from `nnunet.plans` / `nnunet.dataset_json` in the metadata.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_distill import checksums, contract
from nnunet_distill import metadata as md


class PredictorError(RuntimeError):
    """The model package or the requested runtime cannot serve this prediction; the message says why."""


def locate_model(path: str | Path) -> tuple[Path, dict]:
    """(ONNX file, metadata) for a package directory, an export directory or an .onnx file.

    A package holds one model, `<name>/1/model.onnx` (Triton layout), and `nnunet_inference.json` at its root;
    an exported graph has its own sidecar beside it, named after it (`contract.sidecar_path`), so exports of
    several models in one folder never read each other's metadata. Without a sidecar the metadata embedded in
    the ONNX file is used, so a bare exported file is enough (and a folder-wide `nnunet_inference.json` left
    by older exports, which may describe another graph, is never taken for an exported file's own).
    """
    path = Path(path)
    if path.is_file():
        onnx_file, sidecar = path, contract.sidecar_path(path)
    elif path.is_dir():
        onnx_file = _the_one_model(path)
        in_package = onnx_file.parent != path
        sidecar = path / contract.PACKAGE_SIDECAR_NAME if in_package else contract.sidecar_path(onnx_file)
    else:
        raise PredictorError(f"-m {path} does not exist; pass a package directory or an .onnx file")
    meta = _read_sidecar(sidecar) if sidecar.is_file() else _embedded_metadata(onnx_file)
    expected = (meta.get("package") or {}).get("model_sha256")
    if expected and checksums.sha256_file(onnx_file) != expected:
        raise PredictorError(
            f"{onnx_file} does not match the sha256 recorded in {sidecar.name}; the package is "
            "corrupted or mixes models (check it with sha256sum -c SHA256SUMS)"
        )
    return onnx_file, meta


def _the_one_model(directory: Path) -> Path:
    """The model of an export or package directory; several models there are ambiguous, so refused."""
    candidates = sorted({*directory.glob("*.onnx"), *directory.glob("*/1/model.onnx")})
    if len(candidates) != 1:
        raise PredictorError(
            f"-m {directory}: expected exactly one model (*.onnx or <name>/1/model.onnx), found "
            f"{[str(c.relative_to(directory)) for c in candidates] or 'none'}; pass the .onnx file"
        )
    return candidates[0]


def _read_sidecar(sidecar: Path) -> dict:
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as exc:
        raise PredictorError(f"{sidecar} is not valid JSON ({exc})") from None
    md.check_metadata(meta)
    return meta


def _embedded_metadata(onnx_file: Path) -> dict:
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    return md.from_metadata_props({p.key: p.value for p in model.metadata_props})


def managers_from_metadata(meta: dict[str, Any]):
    """(PlansManager, ConfigurationManager, dataset_json) exactly as the training folders would give them."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(json.dumps(meta["nnunet"]["plans"]))
    dataset_json = json.loads(json.dumps(meta["nnunet"]["dataset_json"]))
    plans_manager = PlansManager(plans)
    return plans_manager, plans_manager.get_configuration(meta["configuration"]), dataset_json


def onnxruntime_providers(device: torch.device) -> list[str]:
    """CUDA provider for cuda devices (with CPU fallback for unsupported nodes), CPU provider otherwise."""
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PredictorError(
                "-device cuda needs onnxruntime with the CUDA execution provider (install "
                "onnxruntime-gpu), available here: " + ", ".join(ort.get_available_providers())
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxNetwork(torch.nn.Module):
    """A torch module whose forward is an ONNX Runtime session, so nnU-Net's predictor can call it as its
    network.

    It has no parameters; `.to()`/`.eval()` (which the predictor calls) are harmless. The session runs on the
    provider chosen for the predictor's device; inputs are handed over as host arrays and outputs moved back
    to the device of the input tensor.
    """

    def __init__(self, onnx_file: Path, device: torch.device, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = onnxruntime_providers(device)
        if device.type == "cuda" and device.index is not None:
            providers = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_file), options, providers=providers)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_shape = list(graph_input.shape)
        batch = self.input_shape[0]
        self.static_batch = batch if isinstance(batch, int) else None

    def check_compatible(self, num_input_channels: int, patch_size: Sequence[int]) -> None:
        channels, spatial = self.input_shape[1], self.input_shape[2:]
        if isinstance(channels, int) and channels != num_input_channels:
            raise PredictorError(
                f"the ONNX graph takes {channels} channels but its metadata says "
                f"{num_input_channels}; the package mixes files of different models"
            )
        fixed = [s for s in spatial if isinstance(s, int)]
        if len(fixed) == len(spatial) and list(spatial) != list(patch_size):
            raise PredictorError(
                f"the ONNX graph has a fixed spatial size {spatial} but the patch size is "
                f"{list(patch_size)}; re-export with -nn or -da"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.static_batch or array.shape[0]
        outputs = []
        for start in range(0, array.shape[0], step):
            chunk = array[start : start + step]
            n = chunk.shape[0]
            if (
                n < step
            ):  # a static-batch graph takes exactly `step` patches: pad with copies, drop them after
                chunk = torch.from_numpy(chunk).repeat(-(-step // n), *[1] * (chunk.ndim - 1))[:step].numpy()
            out = self.session.run([self.output_name], {self.input_name: chunk})[0][:n]
            outputs.append(torch.from_numpy(out))
        result = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return result.to(x.device)


class OnnxRuntimePredictor(nnUNetPredictor):
    """nnUNetPredictor whose network is an ONNX Runtime session built from an exported student package."""

    def __init__(
        self,
        tile_step_size: float | None = None,
        use_gaussian: bool = True,
        use_mirroring: bool = True,
        device: torch.device | None = None,
        verbose: bool = False,
        allow_tqdm: bool = True,
        mirror_batch: int = 8,
    ):
        device = torch.device("cpu") if device is None else device
        super().__init__(
            tile_step_size=0.5 if tile_step_size is None else tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=verbose,
            verbose_preprocessing=verbose,
            allow_tqdm=allow_tqdm,
        )
        self._explicit_step = tile_step_size is not None
        self.mirror_batch = max(1, mirror_batch)
        self.metadata: dict | None = None
        self.onnx_file: Path | None = None

    def initialize_from_package(self, model: str | Path, threads: int | None = None) -> None:
        onnx_file, meta = locate_model(model)
        plans_manager, configuration_manager, dataset_json = managers_from_metadata(meta)
        network = OnnxNetwork(onnx_file, self.device, threads)
        network.check_compatible(meta["num_input_channels"], configuration_manager.patch_size)
        if not self._explicit_step:
            self.tile_step_size = float(meta.get("tile_step_size", 0.5))
        mirror = meta.get("mirror_axes")
        self.manual_initialization(
            network,
            plans_manager,
            configuration_manager,
            None,
            dataset_json,
            meta.get("student", {}).get("checkpoint_trainer", "onnx"),
            None if mirror is None else tuple(mirror),
        )
        self.metadata, self.onnx_file = meta, onnx_file

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One model, so no per-fold state-dict swapping: run nnU-Net's sliding window once."""
        return self.predict_sliding_window_return_logits(data).to("cpu")

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's mirroring TTA, with the mirrored copies sent to ONNX Runtime as one batch.

        Same arithmetic as the parent (sum of the un-flipped predictions over all axis combinations, divided
        by their count), but one session call instead of eight keeps a GPU busy. Graphs with a static batch
        fall back to the parent's one-call-per-flip loop.
        """
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if not mirror_axes or self.network.static_batch is not None:
            return super()._internal_maybe_mirror_and_predict(x)
        assert max(mirror_axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
        axes = [m + 2 for m in mirror_axes]
        flips: list[tuple[int, ...]] = [()] + [
            c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)
        ]
        n = x.shape[0]
        prediction = None
        for start in range(0, len(flips), self.mirror_batch):
            group = flips[start : start + self.mirror_batch]
            batch = torch.cat([torch.flip(x, f) if f else x for f in group])
            out = self.network(batch)
            for i, f in enumerate(group):
                part = out[i * n : (i + 1) * n]
                part = torch.flip(part, f) if f else part
                prediction = part if prediction is None else prediction + part
        return prediction / len(flips)
