"""Find, load and run the teacher folds: a frozen ensemble that returns the mean full-resolution logits.

The original went through ``nnUNetPredictor.initialize_from_trained_model_folder`` once per fold, which looks
the teacher's trainer class up by name (teachers from custom trainers could not load) and, on nnunetv2 <
2.5.2, silently left the weights random. Here each fold's network is built from the teacher folder's *own*
``plans.json``/``dataset.json`` with nnU-Net's builder and its checkpoint is loaded with ``strict=True``, so a
teacher either really is the trained network or loading fails with a message that says why.

Cost: every KD step runs K teacher forwards on the student's batch. What helps, measured by
``bench/bench_kd_step.py``: ``torch.inference_mode`` (no autograd bookkeeping), no deep-supervision heads, and
bf16 autocast where the hardware computes bf16 natively: CUDA (with channels-last 3D for tensor cores) and
CPUs with AVX512-BF16 or AMX, where oneDNN's bf16 3D convolutions ran 2x faster than fp32 on this project's
machine (teacher logits then differ from fp32 by ~0.1, far below what a T-softened KD target resolves). On
CPUs without native bf16 it is emulated and slower, so fp32 stays. Channels-last was slower on CPU, and
batching the folds with ``torch.func.stack_module_state`` + ``vmap`` was slower than a plain loop (it turns
into grouped 3D convolutions), so the ensemble loops over folds.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nnunet_distill import contract, nnunet_env

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


class TeacherError(RuntimeError):
    """A teacher cannot be found or loaded; the message is one line naming what is missing and what exists."""


@dataclass(frozen=True)
class TeacherFold:
    fold: int
    checkpoint: Path


# ---------------------------------------------------------------------------------------------
# Locating folds (pure file-system queries)
# ---------------------------------------------------------------------------------------------


def default_teacher_folder(
    results_dir: str | Path,
    dataset_name: str,
    trainer: str = contract.DEFAULT_TEACHER_TRAINER,
    plans: str = contract.DEFAULT_PLANS,
    configuration: str = contract.DEFAULT_CONFIGURATION,
) -> Path:
    """``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>``: where ``nnUNetv2_train`` puts
    folds."""
    return Path(results_dir) / dataset_name / contract.model_folder_name(trainer, plans, configuration)


def available_folds(teacher_folder: str | Path, checkpoint_name: str = DEFAULT_CHECKPOINT) -> list[int]:
    """Integer folds ``fold_N`` that hold ``checkpoint_name``, ascending (``fold_all`` is not a CV
    teacher)."""
    folder = Path(teacher_folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _FOLD_DIR.match(child.name)
        if m and (child / checkpoint_name).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def _describe_folder(folder: Path, checkpoint_name: str) -> str:
    if not folder.exists():
        parent = folder.parent
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        where = (
            f"; {parent} holds: {', '.join(siblings)}" if siblings else f"; {parent} does not exist either"
        )
        return f"teacher folder {folder} does not exist{where}"
    folds = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("fold_"))
    if not folds:
        return f"teacher folder {folder} has no fold_N sub-folders"
    detail = []
    for name in folds:
        ckpts = sorted(p.name for p in (folder / name).glob("checkpoint_*.pth"))
        detail.append(f"{name} [{', '.join(ckpts) or 'no checkpoints'}]")
    return f"teacher folder {folder} has {'; '.join(detail)} (looking for {checkpoint_name})"


def select_folds(
    teacher_folder: str | Path,
    requested: Sequence[int] | None = None,
    checkpoint_name: str = DEFAULT_CHECKPOINT,
) -> list[TeacherFold]:
    """The folds to distil from: all complete ones when ``requested`` is None (``-tf`` omitted), else exactly
    ``requested``. Never falls back silently: a missing fold is an error naming the folds that exist."""
    folder = Path(teacher_folder)
    present = available_folds(folder, checkpoint_name)
    if requested is None:
        if not present:
            raise TeacherError(
                f"no teacher folds found: {_describe_folder(folder, checkpoint_name)}; train them "
                "with nnUNetv2_train (or pass -t with the right folder)"
            )
        folds = present
    else:
        if len(set(requested)) != len(requested):
            raise TeacherError(f"teacher folds (-tf) list a fold twice: {list(requested)}")
        missing = [f for f in requested if f not in present]
        if missing:
            raise TeacherError(
                f"teacher fold(s) {', '.join(map(str, missing))} (-tf) not found: "
                f"{_describe_folder(folder, checkpoint_name)}"
            )
        folds = list(requested)
    return [TeacherFold(f, folder / f"fold_{f}" / checkpoint_name) for f in folds]


def read_teacher_json(teacher_folder: str | Path) -> tuple[dict, dict]:
    """The teacher folder's own ``plans.json`` and ``dataset.json`` (copied there by nnU-Net at train
    start)."""
    folder = Path(teacher_folder)
    out = []
    for name in ("plans.json", "dataset.json"):
        path = folder / name
        if not path.is_file():
            raise TeacherError(
                f"{path} is missing: the teacher folder must be an nnU-Net model folder "
                "(nnUNetv2_train writes plans.json and dataset.json there)"
            )
        out.append(json.loads(path.read_text()))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Loading (torch edges)
# ---------------------------------------------------------------------------------------------


def build_teacher_network(plans: dict, configuration: str, dataset_json: dict) -> nn.Module:
    """The architecture nnU-Net builds from the teacher's plans; deep supervision off (only the full-res head
    is distilled, and skipping the other heads saves work)."""
    if configuration not in plans.get("configurations", {}):
        raise TeacherError(
            f"configuration {configuration!r} is not in the teacher plans {plans.get('plans_name')!r} "
            f"(available: {', '.join(plans.get('configurations', {}))})"
        )
    return nnunet_env.network_from_plans(plans, configuration, dataset_json, deep_supervision=False)


def _clean_state_dict(state: dict) -> dict:
    # DDP ('module.') and torch.compile ('_orig_mod.') wrappers prefix the keys of a saved state dict.
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_checkpoint_file(path: str | Path) -> dict:
    # weights_only=False: nnU-Net checkpoints hold numpy scalars and the logger's dict (trusted: our own
    # folds).
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as exc:
        raise TeacherError(f"teacher checkpoint {path} does not exist") from exc
    except Exception as exc:
        raise TeacherError(
            f"teacher checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); is the file complete?"
        ) from exc


def load_teacher(
    fold: TeacherFold, plans: dict, configuration: str, dataset_json: dict, device: torch.device
) -> nn.Module:
    """One frozen teacher: built from plans, weights loaded strictly, eval mode, no grad, on ``device``."""
    ckpt = load_checkpoint_file(fold.checkpoint)
    if "network_weights" not in ckpt:
        raise TeacherError(
            f"{fold.checkpoint} is not an nnU-Net training checkpoint (no 'network_weights'; "
            f"keys: {', '.join(sorted(ckpt))})"
        )
    trained_cfg = (ckpt.get("init_args") or {}).get("configuration")
    if trained_cfg is not None and trained_cfg != configuration:
        raise TeacherError(
            f"teacher fold {fold.fold} was trained on configuration {trained_cfg!r}, not "
            f"{configuration!r}: pass -c {trained_cfg} or the matching teacher folder"
        )
    net = build_teacher_network(plans, configuration, dataset_json)
    try:
        net.load_state_dict(_clean_state_dict(ckpt["network_weights"]), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise TeacherError(
            f"teacher fold {fold.fold} ({fold.checkpoint}, trainer {ckpt.get('trainer_name')}) does not "
            f"match the architecture in the teacher folder's plans.json: "
            f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}"
        ) from exc
    net.to(device)
    net.eval()
    net.requires_grad_(False)
    return net


# ---------------------------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN runs bf16 convolutions natively (elsewhere it emulates them, slowly)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001, S112 - a private probe that may change: just assume no
            continue
    return False


def default_precision(device: torch.device) -> torch.dtype | None:
    """Teacher autocast dtype: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16; else
    fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> autocast dtype (None = plain fp32)."""
    if name == "auto":
        return default_precision(device)
    if name not in PRECISIONS:
        raise TeacherError(f"teacher precision must be auto, {', '.join(PRECISIONS)}; got {name!r}")
    return PRECISIONS[name]


class TeacherEnsemble(nn.Module):
    """Frozen teachers; ``forward(x)`` returns the mean of their full-resolution logits in float32.

    The teachers are held in an ``nn.ModuleList`` so ``.to()`` moves them with the ensemble, but they are
    never registered with the student's optimizer and have ``requires_grad=False``; ``forward`` runs under
    ``torch.inference_mode`` so no graph is kept. ``train()`` is overridden: the teachers stay in eval mode
    even when a trainer flips every module to train mode.
    """

    def __init__(
        self,
        teachers: Iterable[nn.Module],
        folds: Sequence[int] = (),
        *,
        precision: torch.dtype | None | str = "auto",
        channels_last: bool | str = "auto",
    ):
        super().__init__()
        self.teachers = nn.ModuleList(list(teachers))
        if len(self.teachers) == 0:
            raise TeacherError("the teacher ensemble needs at least one teacher")
        self.folds = tuple(folds)
        self._precision = precision
        self._channels_last = channels_last
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        self._apply_memory_format()

    @property
    def device(self) -> torch.device:
        return next(self.teachers.parameters()).device

    def precision(self) -> torch.dtype | None:
        return default_precision(self.device) if self._precision == "auto" else self._precision

    def uses_channels_last(self) -> bool:
        return self.device.type == "cuda" if self._channels_last == "auto" else bool(self._channels_last)

    def _apply_memory_format(self) -> None:
        if self.uses_channels_last():
            for t in self.teachers:
                t.to(memory_format=torch.channels_last_3d)

    def _apply(
        self, fn, *args, **kwargs
    ):  # called by .to()/.cuda(): re-pick the memory format for the device
        out = super()._apply(fn, *args, **kwargs)
        self._apply_memory_format()
        return out

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.precision()
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        if self.uses_channels_last() and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), autocast:
            total = None
            for teacher in self.teachers:
                out = teacher(x)
                if isinstance(
                    out, (list, tuple)
                ):  # a teacher built with deep supervision: full-res head only
                    out = out[0]
                out = out.float()
                total = out if total is None else total.add_(out)
            mean = total.div_(len(self.teachers))
        # Leave inference mode: the result is used in the student's autograd graph (as a constant).
        return mean.clone().contiguous()


def load_ensemble(
    teacher_folder: str | Path,
    configuration: str,
    device: torch.device,
    folds: Sequence[int] | None = None,
    checkpoint_name: str = DEFAULT_CHECKPOINT,
    **ensemble_kwargs,
) -> tuple[TeacherEnsemble, dict, dict]:
    """Select folds, load each with the folder's own plans/dataset.json; returns (ensemble, plans,
    dataset_json)."""
    plans, dataset_json = read_teacher_json(teacher_folder)
    selected = select_folds(teacher_folder, folds, checkpoint_name)
    nets = [load_teacher(f, plans, configuration, dataset_json, device) for f in selected]
    return TeacherEnsemble(nets, [f.fold for f in selected], **ensemble_kwargs), plans, dataset_json
