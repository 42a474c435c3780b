"""nnU-Net's folders, dataset names, plans and devices, with errors that say what to run.

nnU-Net itself answers a missing `nnUNet_preprocessed` or an unknown dataset id with a multi-line
RuntimeError (or by scanning the current directory); in a pod that surfaces as a traceback in the
termination message. These helpers check the same things up front and raise `NnUNetSetupError` with
one line naming the variable, flag or command that fixes it. They also describe an nnU-Net workspace
(the three folders plus the CPU-friendly process settings) for the demo, the tests and the benchmarks,
and run nnU-Net's own commands in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_distill.contract import CPU_FRIENDLY_ENV as CPU_FRIENDLY_ENV
from nnunet_distill.contract import NNUNET_FOLDER_VARS as ENV_VARS
from nnunet_distill.contract import RESENC_PLANNERS


class NnUNetSetupError(RuntimeError):
    """Environment, dataset or plans are not ready; the message is one line with the fix."""


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


def resolve_dataset_name(dataset: str | int, environ: Mapping[str, str] | None = None) -> str:
    """The `DatasetXXX_Name` folder name for an id, looked up in nnU-Net's three folders."""
    text = str(dataset)
    dataset_id = dataset_id_of(text)
    environ = os.environ if environ is None else environ
    searched = []
    found: set[str] = set()
    for var in ENV_VARS:
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
            "none of nnUNet_raw, nnUNet_preprocessed, nnUNet_results is set: export them "
            "so dataset ids can be resolved"
        )
    raise NnUNetSetupError(
        f"dataset {text} not found in {', '.join(searched)}: check -d, or create it "
        f"(nnunet-distill synthetic -d {dataset_id} --name NAME) and preprocess it"
    )


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


def select_device(spec: str | None):
    """`None` -> cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` or `mps` as given, checked.

    Code never assumes CUDA: CPU runs the tests and the demo, the image's GPU runs real jobs.
    """
    import torch

    if spec is None or spec == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise NnUNetSetupError(f"device {spec!r} is not valid: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NnUNetSetupError(f"device {spec} requested but CUDA is not available here: use -device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NnUNetSetupError(
                f"device {spec} does not exist ({torch.cuda.device_count()} CUDA devices "
                "visible): use a smaller index or check CUDA_VISIBLE_DEVICES"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise NnUNetSetupError("device mps requested but not available here: use -device cpu")
    elif device.type != "cpu":
        raise NnUNetSetupError(f"device {spec!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device


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
