"""A trained student, found and rebuilt as stock nnU-Net would: the first half of the exporter.

The student is found from the arguments it was trained with (dataset, plans, configuration, fold, DA5) and
rebuilt from its own `plans.json` by the trainer class its checkpoint names, never re-derived from CLI flags,
so an export cannot silently build a different architecture than was trained. Weights load strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import contract, nnunet_env

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the cause and the fix."""


class StudentNotFoundError(ExportError):
    pass


class CheckpointError(ExportError):
    pass


# ------------------------------------------------------------------------------------------------------------
# finding the student


def results_root() -> Path:
    try:
        return nnunet_env.env_dir("nnUNet_results")
    except nnunet_env.NnUNetSetupError as exc:
        raise ExportError(
            f"{exc} - the folder that holds DatasetXXX_Name/ with the distilled student"
        ) from None


def resolve_dataset_dir(root: Path, dataset: str) -> Path:
    """`-d` as nnU-Net accepts it: a numeric id (`901`) or a full name (`Dataset901_Synthetic`).

    Looked up in nnUNet_results only, so exporting never needs the raw or preprocessed data on disk.
    """
    try:
        name = nnunet_env.resolve_dataset_name(dataset, {"nnUNet_results": str(root)}, ("nnUNet_results",))
    except nnunet_env.NnUNetSetupError as exc:
        present = sorted(p.name for p in root.glob("Dataset*") if p.is_dir()) if root.is_dir() else []
        raise StudentNotFoundError(f"{exc} (present: {', '.join(present) or 'none'})") from None
    return root / name


def describe_students(dataset_dir: Path) -> str:
    """One line listing every student model folder, its folds and their checkpoints (for not-found errors)."""
    entries = []
    for folder in sorted(dataset_dir.iterdir()) if dataset_dir.is_dir() else []:
        if not folder.is_dir() or not folder.name.startswith(contract.DISTILL_TRAINER):
            continue
        folds = []
        for fold in sorted(folder.glob("fold_*")):
            checkpoints = [c for c in CHECKPOINT_NAMES if (fold / c).is_file()]
            folds.append(f"{fold.name}: {', '.join(checkpoints) or 'no checkpoint'}")
        entries.append(f"{folder.name} ({'; '.join(folds) or 'no folds'})")
    return " | ".join(entries) if entries else "none"


def find_student_fold_dir(
    root: Path,
    dataset: str,
    plans_identifier: str,
    configuration: str,
    fold: str,
    use_da5: bool,
    checkpoint_name: str,
) -> Path:
    """The fold folder of the student trained with these arguments, or an error listing what does exist."""
    dataset_dir = resolve_dataset_dir(root, dataset)
    model_dir = contract.student_model_folder(dataset_dir, plans_identifier, configuration, use_da5)
    fold_dir = model_dir / f"fold_{fold}"
    if (fold_dir / checkpoint_name).is_file():
        return fold_dir
    raise StudentNotFoundError(
        f"no student at {fold_dir / checkpoint_name} (trainer {contract.distill_trainer_name(use_da5)}, "
        "plans "
        f"{plans_identifier}, configuration {configuration}, fold {fold}); students in {dataset_dir.name}: "
        f"{describe_students(dataset_dir)}; pass the -r/-c/-f/-da5 (and -p/-spl/-bs) used for training"
    )


# ------------------------------------------------------------------------------------------------------------
# loading it with stock nnU-Net


@dataclass
class LoadedStudent:
    network: Any  # torch.nn.Module, eval mode, deep supervision off, on CPU
    state_dict: dict
    plans: dict
    dataset_json: dict
    configuration: str
    fold_dir: Path
    checkpoint_name: str
    trainer_name: str
    mirror_axes: list[int] | None
    distillation: dict | None
    parameters: int
    affine_norms: int


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{what} missing: {path} (a student model folder holds plans.json and dataset.json "
            "beside its fold_X folders; re-run the distillation or copy them back)"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{what} is not valid JSON: {path} ({exc})") from None


def read_checkpoint(path: Path) -> dict:
    """torch.load with the failure modes of real clusters (truncated upload, wrong file) made readable."""
    import torch

    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise CheckpointError(
            f"checkpoint missing: {path} (folder holds: {', '.join(siblings) or 'nothing'})"
        )
    try:
        # nnU-Net checkpoints pickle numpy scalars and logging state, so weights_only loading cannot read
        # them.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(
            f"checkpoint unreadable (corrupted or truncated?): {path}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint"
        )
    missing = [k for k in ("network_weights", "trainer_name") if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not an nnU-Net training checkpoint")
    return checkpoint


def load_student(fold_dir: Path, checkpoint_name: str, configuration: str) -> LoadedStudent:
    """Rebuild the student exactly as `nnUNetv2_predict` would: plans.json + the checkpoint's trainer
    class."""
    model_dir = fold_dir.parent
    plans = _read_json(model_dir / "plans.json", "plans.json")
    dataset_json = _read_json(model_dir / "dataset.json", "dataset.json")
    checkpoint = read_checkpoint(fold_dir / checkpoint_name)
    check_configuration(checkpoint, plans, configuration, model_dir.name)
    trainer_name = checkpoint["trainer_name"]
    network = nnunet_env.network_from_plans(
        plans, configuration, dataset_json, deep_supervision=False, trainer_class=_trainer_class(trainer_name)
    )
    _load_weights(network, checkpoint["network_weights"], fold_dir / checkpoint_name)
    network.eval()
    mirror = checkpoint.get("inference_allowed_mirroring_axes")
    return LoadedStudent(
        network=network,
        state_dict=checkpoint["network_weights"],
        plans=plans,
        dataset_json=dataset_json,
        configuration=configuration,
        fold_dir=fold_dir,
        checkpoint_name=checkpoint_name,
        trainer_name=trainer_name,
        mirror_axes=None if mirror is None else [int(a) for a in mirror],
        distillation=checkpoint.get("distillation"),
        parameters=sum(p.numel() for p in network.parameters()),
        affine_norms=_affine_instance_norms(network),
    )


def check_configuration(checkpoint: dict, plans: dict, configuration: str, model_folder: str) -> None:
    """The checkpoint was trained with `configuration` (-c), and the model's plans.json defines it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trained_cfg = checkpoint.get("init_args", {}).get("configuration", configuration)
    if trained_cfg != configuration:
        raise ExportError(
            f"checkpoint was trained with configuration {trained_cfg!r}, not {configuration!r}; "
            "pass -c " + trained_cfg
        )
    try:
        PlansManager(plans).get_configuration(configuration)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(
            f"plans.json of {model_folder} has no usable configuration {configuration!r}: {exc}"
        ) from None


def _trainer_class(trainer_name: str):
    """The trainer class the checkpoint names, found the way nnU-Net finds it (nnUNet_extTrainer too)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise ExportError(
            f"checkpoint names trainer class {trainer_name!r}, which nnU-Net cannot find; set "
            "nnUNet_extTrainer to the folder that defines it"
        ) from None


def _load_weights(network, weights: dict, checkpoint_path: Path) -> None:
    """Strict loading: weights of another architecture are an error, never a partial load."""
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise CheckpointError(
            f"checkpoint {checkpoint_path} does not fit the network its plans.json "
            f"describes ({' '.join(first[:2])[:300]}); the folder mixes files of different "
            "models"
        ) from None


def _affine_instance_norms(network) -> int:
    """InstanceNorm layers with learned scale/bias (what a TensorRT graph must carry as initializers)."""
    import torch

    return sum(
        1
        for m in network.modules()
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.affine
    )
