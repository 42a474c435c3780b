"""The one nnU-Net helper layer: folders, dataset names, plans, devices, with errors that say what to run.

nnU-Net itself answers a missing `nnUNet_preprocessed` or an unknown dataset id with a multi-line
RuntimeError (or by scanning the current directory); in a pod that surfaces as a traceback in the
termination message. These helpers check the same things up front and raise `NnUNetSetupError` with
one line naming the variable, flag or command that fixes it. They also describe an nnU-Net workspace
(the three folders plus the CPU-friendly process settings) for the demo, the tests and the benchmarks,
and run nnU-Net's own commands in it. Distill, export, student, teachers, metadata and the CLIs use these
helpers (wrapping `NnUNetSetupError` / `PlansError` in their own error types where their callers expect one),
so each idea - dataset lookup, device choice, `inherits_from`, total stride - has one implementation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_distill import contract
from nnunet_distill.contract import CPU_FRIENDLY_ENV as CPU_FRIENDLY_ENV
from nnunet_distill.contract import NNUNET_FOLDER_VARS as ENV_VARS
from nnunet_distill.contract import RESENC_PLANNERS


class NnUNetSetupError(RuntimeError):
    """Environment, dataset or plans are not ready; the message is one line with the fix."""


class PlansError(ValueError):
    """A plans' configurations cannot be resolved (missing or circular `inherits_from`)."""


def env_dir(var: str, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    value = environ.get(var)
    if not value:
        raise NnUNetSetupError(f"{var} is not set: export {var}=/path/to/folder (nnU-Net's {var} folder)")
    return Path(value)


def dataset_id_of(dataset: str | int) -> int:
    """`901`, `"901"` or `"Dataset901_Name"` -> 901."""
    text = str(dataset)
    if text.startswith("Dataset"):
        digits = text[7:10]
        if len(text) < 11 or not digits.isdigit() or text[10] != "_":
            raise NnUNetSetupError(f"dataset (-d) {text!r} is not of the form DatasetXXX_Name")
        return int(digits)
    try:
        value = int(text)
    except ValueError:
        raise NnUNetSetupError(
            f"dataset (-d) must be an id (e.g. 901) or DatasetXXX_Name, got {text!r}"
        ) from None
    if not 1 <= value <= 999:
        raise NnUNetSetupError(f"dataset id (-d) must be in 1..999, got {value}")
    return value


def resolve_dataset_name(
    dataset: str | int,
    environ: Mapping[str, str] | None = None,
    folders: Sequence[str] = ENV_VARS,
) -> str:
    """The `DatasetXXX_Name` folder name for an id, looked up in nnU-Net's folders (`folders`: which of the
    three; the exporter looks only in nnUNet_results so it never needs the raw or preprocessed data)."""
    text = str(dataset).strip()
    dataset_id = dataset_id_of(text)
    environ = os.environ if environ is None else environ
    searched = []
    found: set[str] = set()
    for var in folders:
        value = environ.get(var)
        if not value:
            continue
        searched.append(f"{var}={value}")
        base = Path(value)
        if base.is_dir():
            found.update(p.name for p in base.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if text.startswith("Dataset"):
        if text in found:
            return text
        found = set()
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise NnUNetSetupError(
            f"dataset id {dataset_id} is ambiguous: {', '.join(sorted(found))}; pass -d "
            "with the full DatasetXXX_Name or remove the stray folder"
        )
    if not searched:
        raise NnUNetSetupError(
            f"none of {', '.join(folders)} is set: export them so dataset ids can be resolved"
        )
    fix = "check -d"
    if "nnUNet_raw" in folders:
        fix += f", or create it (nnunet-distill synthetic -d {dataset_id} --name NAME) and preprocess it"
    raise NnUNetSetupError(f"dataset {text} not found in {', '.join(searched)}: {fix}")


def planner_for(plans_identifier: str) -> str | None:
    """The experiment planner that makes a given stock plans identifier (None for the default planner)."""
    return RESENC_PLANNERS.get(plans_identifier)


def plan_command(dataset_id: int, plans_identifier: str, configuration: str) -> str:
    planner = planner_for(plans_identifier)
    if planner is not None:
        return f"nnUNetv2_plan_experiment -d {dataset_id} -pl {planner}"
    return f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c {configuration} --verify_dataset_integrity" + (
        "" if plans_identifier == "nnUNetPlans" else f" (then create {plans_identifier}.json)"
    )


def preprocessed_dataset_dir(dataset_name: str, environ: Mapping[str, str] | None = None) -> Path:
    return env_dir("nnUNet_preprocessed", environ) / dataset_name


def plans_path(dataset_name: str, plans_identifier: str, environ: Mapping[str, str] | None = None) -> Path:
    return preprocessed_dataset_dir(dataset_name, environ) / f"{plans_identifier}.json"


def load_plans(
    dataset_name: str,
    plans_identifier: str,
    configuration: str | None = None,
    environ: Mapping[str, str] | None = None,
    require_data: bool = False,
) -> dict:
    """Plans JSON from nnUNet_preprocessed, checked for the configuration (and its preprocessed data)."""
    import json

    dataset_id = dataset_id_of(dataset_name)
    path = plans_path(dataset_name, plans_identifier, environ)
    cfg = configuration or "3d_fullres"
    if not path.is_file():
        raise NnUNetSetupError(
            f"plans {plans_identifier} not found at {path}: run "
            f"{plan_command(dataset_id, plans_identifier, cfg)}"
        )
    try:
        plans = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NnUNetSetupError(
            f"plans file {path} cannot be read ({exc}): re-create it with "
            f"{plan_command(dataset_id, plans_identifier, cfg)}"
        ) from None
    configurations = plans.get("configurations", {})
    if configuration is not None and configuration not in configurations:
        raise NnUNetSetupError(
            f"configuration (-c) {configuration!r} is not in {path.name} (available: "
            f"{', '.join(configurations) or 'none'}): choose one of those"
        )
    if configuration is not None and require_data:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        identifier = PlansManager(plans).get_configuration(configuration).data_identifier
        data_dir = path.parent / identifier
        if not data_dir.is_dir() or not any(data_dir.iterdir()):
            raise NnUNetSetupError(
                f"preprocessed data {data_dir} for {plans_identifier}/{configuration} is missing: "
                f"run nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_identifier} "
                f"-c {configuration}"
            )
    return plans


def load_dataset_json(dataset_name: str, environ: Mapping[str, str] | None = None) -> dict:
    import json

    path = preprocessed_dataset_dir(dataset_name, environ) / "dataset.json"
    if not path.is_file():
        raise NnUNetSetupError(
            f"{path} not found: run nnUNetv2_plan_and_preprocess -d {dataset_id_of(dataset_name)} first"
        )
    return json.loads(path.read_text())


def select_device(spec: str | None, flag: str = "-device"):
    """`None` -> cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` or `mps` as given, checked.

    Code never assumes CUDA: CPU runs the tests and the demo, the image's GPU runs real jobs. `flag` is the
    command-line flag the user set, named in every error.
    """
    import torch

    if spec is None or spec == "":
        return torch.device(contract.choose_device(spec, torch.cuda.is_available))
    try:
        kind, index = contract.parse_device(spec)
    except ValueError:
        raise NnUNetSetupError(
            f"device {spec!r} is not valid ({flag}): use cpu, cuda, cuda:N or mps"
        ) from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise NnUNetSetupError(f"{flag} {spec}: CUDA is not available here: use {flag} cpu")
        if index is not None and index >= torch.cuda.device_count():
            raise NnUNetSetupError(
                f"{flag} {spec}: device does not exist ({torch.cuda.device_count()} CUDA devices "
                "visible): use a smaller index or check CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise NnUNetSetupError(f"{flag} mps: MPS is not available here: use {flag} cpu")
    return torch.device(kind)


def network_from_plans(
    plans: dict,
    configuration: str,
    dataset_json: dict,
    deep_supervision: bool,
    trainer_class: type | None = None,
):
    """The network stock nnU-Net builds from these plans: the trainer class's `build_network_architecture`
    (nnUNetTrainer's unless a checkpoint names another), with nnU-Net's own input-channel and head counts, so
    teachers, students and exported graphs are exactly what `nnUNetv2_predict` would rebuild."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return trainer_class.build_network_architecture(
        plans_manager,
        configuration_manager,
        num_inputs,
        num_outputs,
        enable_deep_supervision=deep_supervision,
    )


# ---- plans: nnU-Net's configuration inheritance and the network's total stride


def configuration_chain(configurations: Mapping[str, Any], configuration: str) -> list[str]:
    """`configuration`, its parent, its grandparent...: nnU-Net's `inherits_from` chain, checked."""
    chain: list[str] = []
    name: str | None = configuration
    while name is not None:
        if name not in configurations:
            raise PlansError(
                f"configuration {name!r} is not in the plans (available: "
                f"{', '.join(configurations) or 'none'})"
            )
        if name in chain:
            raise PlansError(f"circular inherits_from in plans configurations: {' -> '.join([*chain, name])}")
        chain.append(name)
        name = configurations[name].get("inherits_from")
    return chain


def resolved_configuration(configurations: Mapping[str, Any], configuration: str) -> dict:
    """One configuration with its `inherits_from` chain merged (a child's keys win, as in nnU-Net's
    PlansManager), as a deep copy without the `inherits_from` key."""
    import copy

    resolved: dict = {}
    for name in reversed(configuration_chain(configurations, configuration)):
        resolved.update(copy.deepcopy(configurations[name]))
    resolved.pop("inherits_from", None)
    return resolved


def total_stride(strides: Sequence[int | Sequence[int]] | None, dim: int) -> list[int]:
    """Per-axis product of the encoder strides: every spatial size must be a multiple of it, or a U-Net's
    skip connections do not line up (an int stride applies to every axis)."""
    total = [1] * dim
    for stride in strides or []:
        per_axis = [stride] * dim if isinstance(stride, int) else list(stride)
        total = [t * int(s) for t, s in zip(total, per_axis, strict=False)]
    return total


@dataclass(frozen=True)
class Workspace:
    """An nnU-Net workspace: its three folders and the environment a subprocess needs to use them."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def create(self) -> Workspace:
        for folder in (self.raw, self.preprocessed, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def env(self, base: Mapping[str, str] | None = None, cpu_friendly: bool = True) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(
            {
                "nnUNet_raw": str(self.raw),
                "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results),
            }
        )
        if cpu_friendly:
            env.update(CPU_FRIENDLY_ENV)
        return env


def nnunet_executable(name: str) -> str:
    """A console script installed beside this interpreter (the venv), else whatever PATH finds."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_logged(
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    timeout: float | None = None,
    tail_chars: int = 4000,
) -> None:
    """Run a command with its output appended to `log_path`; on failure raise with the log's tail.

    nnU-Net prints a lot; tests and benchmarks keep it out of their own output but must show why a
    step failed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.run(
                list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            code = "timeout"
        else:
            code = proc.returncode
    if code != 0:
        tail = log_path.read_text()[-tail_chars:]
        raise RuntimeError(f"{' '.join(argv)} failed ({code}); log {log_path}, last lines:\n{tail}")
