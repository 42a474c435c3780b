"""Session fixtures with real nnU-Net artifacts, built once per test session in a temporary folder.

Nothing here is faked: a synthetic raw dataset is planned and preprocessed by `nnUNetv2_plan_and_preprocess`,
teachers are trained by stock nnU-Net through `nnunet-distill train-teacher`, ResEnc plans come from nnU-Net's
own planners. Every fixture is lazy (built only when a test asks for it) and shared by every test of the
session.

- `nnunet_dataset`  -> NnUNetDataset: Dataset901_Synth (16 training cases of 48^3 plus 4 labelled test cases),
                       planned and preprocessed for 3d_fullres (~20 s).
- `nnunet_teachers` -> Teachers: two tiny nnUNetTrainer/nnUNetPlans teacher folds (0, 1) on it, 2 epochs x 4
                       iterations, 2 validation iterations, with nnU-Net's final validation (~35 s per fold).
- `resenc_plans`    -> dict plans identifier -> plans: nnUNetResEncUNet{M,L,XL}Plans made by nnU-Net's
                       nnUNetPlannerResEnc{M,L,XL} for the same dataset (a few seconds); their 3d_fullres
                       batch size (16+, sized for 8-40 GB GPUs) is set to 2 so they train on a CPU.
- `resenc_teachers` -> Teachers: one tiny nnUNetResEncUNetMPlans teacher fold (0), same budget.
- `realistic_plans` -> RealisticPlans: plans for Dataset902_Large (2 cases of 192^3), fingerprinted and
                       planned (no preprocessing, no training) by the default and the ResEnc M planners: 6
                       stages of up to 320 channels and 128^3 patches, the size class of real CT/MR data
                       (~40 s).

Subprocess output goes to `<tmp>/nnunet/fixtures.log`; a failing step raises with the tail of that log.
Tests pass `dataset.env` to their own subprocesses (nnUNet_* folders plus nnUNet_n_proc_DA=0,
nnUNet_def_n_proc=1, nnUNet_compile=false).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nnunet_distill import contract

DATASET_ID = 901
DATASET_NAME = "Synth"
CONFIGURATION = "3d_fullres"
TEACHER_TRAINER = "nnUNetTrainer"
TEACHER_PLANS = "nnUNetPlans"
TEACHER_FOLDS = (0, 1)
TEACHER_BUDGET = ("-e", "2", "--iterations_per_epoch", "4", "--val_iterations", "2")
RESENC_PLANS = ("nnUNetResEncUNetMPlans", "nnUNetResEncUNetLPlans", "nnUNetResEncUNetXLPlans")
RESENC_PLANNERS = contract.RESENC_PLANNERS
RESENC_CPU_BATCH = 2
LARGE_ID = 902
LARGE_NAME = "Large"
LARGE_SIZE = ("192", "192", "192")


@dataclass(frozen=True)
class NnUNetDataset:
    """A planned and preprocessed nnU-Net dataset in its own workspace (raw/preprocessed/results)."""

    root: Path
    dataset_id: int
    dataset_name: str
    configuration: str
    log: Path

    @property
    def workspace(self):
        from nnunet_distill.nnunet_env import Workspace

        return Workspace(self.root)

    @property
    def raw(self) -> Path:
        return self.workspace.raw

    @property
    def preprocessed(self) -> Path:
        return self.workspace.preprocessed

    @property
    def results(self) -> Path:
        return self.workspace.results

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset_name

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.dataset_name

    @property
    def results_dataset(self) -> Path:
        return self.results / self.dataset_name

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses: the nnUNet_* folders and CPU-friendly nnU-Net process settings."""
        return self.workspace.env()

    @property
    def planning_env(self) -> dict[str, str]:
        """As `env`, but with nnUNet_n_proc_DA=1: nnU-Net's planners call torch.set_num_threads(n_proc_DA)."""
        return {**self.env, "nnUNet_n_proc_DA": "1"}

    def plans(self, identifier: str = TEACHER_PLANS) -> dict:
        return json.loads((self.preprocessed_dataset / f"{identifier}.json").read_text())

    def dataset_json(self) -> dict:
        return json.loads((self.preprocessed_dataset / "dataset.json").read_text())

    def run(self, argv: list[str], planning: bool = False, timeout: float = 900) -> None:
        """Run a command in this workspace, output to the fixture log; fail the test with the log's tail."""
        from nnunet_distill.nnunet_env import run_logged

        try:
            run_logged(argv, self.planning_env if planning else self.env, self.log, timeout=timeout)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)


@dataclass(frozen=True)
class Teachers:
    """Trained teacher folds: `folder` is nnU-Net's `<trainer>__<plans>__<cfg>` results folder."""

    dataset: NnUNetDataset
    trainer: str
    plans: str
    folds: tuple[int, ...]
    configuration: str = CONFIGURATION

    @property
    def folder(self) -> Path:
        from nnunet_distill.contract import model_folder_name

        return self.dataset.results_dataset / model_folder_name(self.trainer, self.plans, self.configuration)

    def checkpoint(self, fold: int, name: str = "checkpoint_final.pth") -> Path:
        return self.folder / f"fold_{fold}" / name


@dataclass(frozen=True)
class RealisticPlans:
    """Plans of a realistically sized dataset: identifier -> plans dict, and its dataset.json."""

    dataset: NnUNetDataset
    plans: dict[str, dict] = field(default_factory=dict)

    def dataset_json(self) -> dict:
        return json.loads((self.dataset.raw_dataset / "dataset.json").read_text())


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def nnunet(command: str, *args: str) -> list[str]:
    from nnunet_distill.nnunet_env import nnunet_executable

    return [nnunet_executable(command), *args]


def train_teacher_argv(
    dataset: NnUNetDataset, fold: int, plans: str = TEACHER_PLANS, trainer: str = TEACHER_TRAINER
) -> list[str]:
    return python_module(
        "nnunet_distill.cli.train_teacher",
        "-d",
        str(dataset.dataset_id),
        "-c",
        dataset.configuration,
        "-f",
        str(fold),
        "-tr",
        trainer,
        "-p",
        plans,
        *TEACHER_BUDGET,
        "-device",
        "cpu",
    )


def _new_dataset(tmp_path_factory, dataset_id: int, name: str, *synthetic_args: str) -> NnUNetDataset:
    from nnunet_distill.nnunet_env import Workspace

    root = tmp_path_factory.mktemp(f"nnunet{dataset_id}")
    Workspace(root).create()
    dataset = NnUNetDataset(
        root=root,
        dataset_id=dataset_id,
        dataset_name=f"Dataset{dataset_id:03d}_{name}",
        configuration=CONFIGURATION,
        log=root / "fixtures.log",
    )
    dataset.run(
        python_module("nnunet_distill.cli.synthetic", "-d", str(dataset_id), "--name", name, *synthetic_args)
    )
    return dataset


@pytest.fixture(scope="session")
def nnunet_dataset(tmp_path_factory) -> NnUNetDataset:
    """Dataset901_Synth: 16 training + 4 test cases of 48^3, planned and preprocessed for 3d_fullres."""
    dataset = _new_dataset(tmp_path_factory, DATASET_ID, DATASET_NAME)
    dataset.run(
        nnunet(
            "nnUNetv2_plan_and_preprocess",
            "-d",
            str(DATASET_ID),
            "-c",
            CONFIGURATION,
            "--verify_dataset_integrity",
            "-npfp",
            "2",
            "-np",
            "2",
        ),
        planning=True,
    )
    return dataset


@pytest.fixture(scope="session")
def nnunet_teachers(nnunet_dataset) -> Teachers:
    """Two tiny stock nnU-Net teacher folds (0, 1): nnUNetTrainer__nnUNetPlans__3d_fullres/fold_{0,1}."""
    for fold in TEACHER_FOLDS:
        nnunet_dataset.run(train_teacher_argv(nnunet_dataset, fold))
    return Teachers(nnunet_dataset, TEACHER_TRAINER, TEACHER_PLANS, TEACHER_FOLDS)


@pytest.fixture(scope="session")
def resenc_plans(nnunet_dataset) -> dict[str, dict]:
    """nnUNetResEncUNet{M,L,XL}Plans of Dataset901 from nnU-Net's ResEnc planners, batch size set to 2.

    The planners size the batch for an 8/24/40 GB GPU (16 and more for 48^3 patches); the 3d_fullres batch
    size is set to 2 in each plans file right after planning (the only change, made before any test reads
    them) so that teachers and students train on a CPU. They share nnUNetPlans_3d_fullres preprocessed data.
    """
    for identifier in RESENC_PLANS:
        path = nnunet_dataset.preprocessed_dataset / f"{identifier}.json"
        if not path.exists():
            nnunet_dataset.run(
                nnunet("nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-pl", RESENC_PLANNERS[identifier]),
                planning=True,
            )
            plans = json.loads(path.read_text())
            plans["configurations"][CONFIGURATION]["batch_size"] = RESENC_CPU_BATCH
            path.write_text(json.dumps(plans, indent=4))
    return {identifier: nnunet_dataset.plans(identifier) for identifier in RESENC_PLANS}


@pytest.fixture(scope="session")
def resenc_teachers(nnunet_dataset, resenc_plans) -> Teachers:
    """One tiny ResEnc M teacher fold (0): nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres/fold_0."""
    identifier = "nnUNetResEncUNetMPlans"
    nnunet_dataset.run(train_teacher_argv(nnunet_dataset, 0, plans=identifier))
    return Teachers(nnunet_dataset, TEACHER_TRAINER, identifier, (0,))


@pytest.fixture(scope="session")
def realistic_plans(tmp_path_factory) -> RealisticPlans:
    """Dataset902_Large (2 cases of 192^3): fingerprint, then nnUNetPlans and ResEnc M plans (no training)."""
    dataset = _new_dataset(
        tmp_path_factory, LARGE_ID, LARGE_NAME, "--cases", "2", "--test-cases", "0", "--size", *LARGE_SIZE
    )
    dataset.run(nnunet("nnUNetv2_extract_fingerprint", "-d", str(LARGE_ID), "-np", "2"), planning=True)
    dataset.run(nnunet("nnUNetv2_plan_experiment", "-d", str(LARGE_ID)), planning=True)
    dataset.run(
        nnunet("nnUNetv2_plan_experiment", "-d", str(LARGE_ID), "-pl", "nnUNetPlannerResEncM"), planning=True
    )
    return RealisticPlans(
        dataset,
        {identifier: dataset.plans(identifier) for identifier in (TEACHER_PLANS, "nnUNetResEncUNetMPlans")},
    )
