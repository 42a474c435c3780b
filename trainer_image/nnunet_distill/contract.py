"""The names the operator and the trainer must agree on, in one place (standard library only).

The operator renders command lines, pod env and globs; the trainer parses, reads and writes them. Both
packages import this module, so a name changed here changes on both sides at once. It must stay importable
without torch, nnU-Net, pydantic or kopf: the operator image installs none of the trainer's dependencies
(a test imports it in a fresh interpreter and checks that only the standard library was loaded).

Why the student gets a plans identifier of its own: the original tool wrote every reduction factor into the
same results folder and left the teacher's plans.json beside the student, so artifacts were not
self-describing. Here the identifier encodes the teacher plans, r (and the student base plans and ResEnc block
strategy where they are not the default), so the folder name alone says which student it holds, two
students of different teachers never share a folder, and stock nnU-Net tools rebuild the right network from
its plans.json.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

# ---- the DistillationJob API

GROUP = "distillation.nnunet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DistillationJob"
PLURAL = "distillationjobs"

#: Kueue admits a Job to the LocalQueue named by this label.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# ---- pod environment (set by the operator through the downward API, read by the trainer's reporter)

ENV_JOB_NAME = "DISTILLATIONJOB_NAME"
ENV_JOB_NAMESPACE = "DISTILLATIONJOB_NAMESPACE"
ENV_JOB_UID = "DISTILLATIONJOB_UID"
ENV_JOB_STAGE = "DISTILLATIONJOB_STAGE"  # optional: the stage name the operator gave this Job
ENV_PROGRESS_INTERVAL = "NNUNET_DISTILL_PROGRESS_INTERVAL_S"
ENV_PROGRESS_HEARTBEAT = "NNUNET_DISTILL_PROGRESS_HEARTBEAT_S"
ENV_TERMINATION_PATH = "TERMINATION_MESSAGE_PATH"
#: Where the kubelet reads a container's termination message (the pod spec's terminationMessagePath).
DEFAULT_TERMINATION_PATH = "/dev/termination-log"

# ---- nnU-Net's environment

ENV_NNUNET_RAW = "nnUNet_raw"
ENV_NNUNET_PREPROCESSED = "nnUNet_preprocessed"
ENV_NNUNET_RESULTS = "nnUNet_results"
NNUNET_FOLDER_VARS = (ENV_NNUNET_RAW, ENV_NNUNET_PREPROCESSED, ENV_NNUNET_RESULTS)
ENV_NNUNET_N_PROC_DA = "nnUNet_n_proc_DA"
ENV_NNUNET_DEF_N_PROC = "nnUNet_def_n_proc"
ENV_NNUNET_COMPILE = "nnUNet_compile"
# One process per pool and no augmentation workers: on small CPUs spawning nnU-Net's default 8 workers
# costs more than the work (see README "Performance knobs"); on GPUs the image overrides these.
CPU_FRIENDLY_ENV = {ENV_NNUNET_N_PROC_DA: "0", ENV_NNUNET_DEF_N_PROC: "1", ENV_NNUNET_COMPILE: "false"}

# ---- files one stage writes and another (or the operator) reads

#: The distill stage's held-out evaluation, beside nnU-Net's summary.json in the student's validation folder.
SUMMARY_NAME = "distillation_summary.json"
SUMMARY_SCHEMA_VERSION = 2
#: Summary `evaluation` values: which cases the student and teachers were scored on.
SUMMARY_TEST_SET = "test_set"
SUMMARY_VALIDATION_UNSEEN = "validation_unseen_teachers"
SUMMARY_NO_HONEST_BASELINE = "none"
ONNX_FILENAME = "model.onnx"
#: Live training progress, beside the checkpoints of every trained fold (teachers and student), rewritten
#: atomically at each epoch end: epoch, totalEpochs, trainLoss, kdLoss, hardLoss, valLoss, pseudoDice,
#: emaPseudoDice, dicePerClass, epochSeconds, lastEpochSeconds, etaSeconds, updatedAt.
PROGRESS_NAME = "progress.json"

# ---- the quality gate's verdicts (condition reasons) and its exit code

GATE_PASSED = "QualityGatePassed"
GATE_FAILED = "QualityGateFailed"
GATE_NOT_ENFORCED = "QualityGateNotEnforced"
EXIT_CODE_GATE_FAILED = 3

# ---- nnU-Net names: trainers, plans, planners

DISTILL_TRAINER = "nnUNetDistillationTrainer"
DISTILL_TRAINER_DA5 = "nnUNetDistillationTrainerDA5"
DEFAULT_CONFIGURATION = "3d_fullres"
DEFAULT_TEACHER_TRAINER = "nnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_RESENC_TEACHER_PLANS = "nnUNetResEncUNetLPlans"
DEFAULT_RESENC_STUDENT_PLANS = "nnUNetPlans"
BLOCK_STRATEGIES = ("reduce", "keep", "increase", "adaptive")
#: Stock ResEnc plans identifier -> the nnU-Net experiment planner that writes it: nnU-Net 2.x's own
#: planners (`experiment_planners/residual_unets/residual_encoder_unet_planners.py`) and their default
#: `plans_name`, the base `ResEncUNetPlanner` included.
RESENC_PLANNERS = {
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
    "nnUNetResEncUNetPlans": "ResEncUNetPlanner",
}


def default_student_base_plans(teacher_plans: str) -> str:
    """The plans a student of these teachers is derived from when none is named: a stock ResEnc teacher's
    student is a plain U-Net (`nnUNetPlans`, the ResEnc CLI's `-spl` default), any other teacher's student
    shares its teachers' plans (the standard CLI has no `-spl`)."""
    return DEFAULT_RESENC_STUDENT_PLANS if teacher_plans in RESENC_PLANNERS else teacher_plans


def student_plans_identifier(
    teacher_plans: str,
    reduction_factor: int,
    block_strategy: str | None = None,
    *,
    student_base_plans: str | None = None,
) -> str:
    """The student's plans name: what makes it a different student, so no two students share a folder.

    `<teacher plans>_r<r>`, then `_<student base plans>` unless the base is the default for these teachers
    (`default_student_base_plans`), then `_bs<strategy>` for a ResEnc student's block strategy unless it is
    `keep`. `nnUNetPlans` teachers, r=2 -> `nnUNetPlans_r2`; `nnUNetResEncUNetLPlans` teachers and their
    default plain student -> `nnUNetResEncUNetLPlans_r2`; the same teachers with a ResEnc M student and
    `adaptive` blocks -> `nnUNetResEncUNetLPlans_r2_nnUNetResEncUNetMPlans_bsadaptive`. Each teacher plans
    name omits at most one base, so different (teacher plans, base, r, strategy) never share a name.
    """
    if reduction_factor < 1:
        raise ValueError(f"reduction factor must be >= 1, got {reduction_factor}")
    name = f"{teacher_plans}_r{reduction_factor}"
    base = student_base_plans or default_student_base_plans(teacher_plans)
    if base != default_student_base_plans(teacher_plans):
        name += f"_{base}"
    if block_strategy is not None and block_strategy != "keep":
        if block_strategy not in BLOCK_STRATEGIES:
            raise ValueError(f"block strategy must be one of {BLOCK_STRATEGIES}, got {block_strategy!r}")
        name += f"_bs{block_strategy}"
    return name


def distill_trainer_name(use_da5: bool) -> str:
    return DISTILL_TRAINER_DA5 if use_da5 else DISTILL_TRAINER


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's own `<trainer>__<plans>__<configuration>` convention."""
    return f"{trainer}__{plans}__{configuration}"


def student_model_folder_name(
    teacher_plans: str,
    reduction_factor: int,
    block_strategy: str | None,
    configuration: str,
    use_da5: bool,
    *,
    student_base_plans: str | None = None,
) -> str:
    """The student's model folder name under `nnUNet_results/DatasetXXX_Name`."""
    plans = student_plans_identifier(
        teacher_plans, reduction_factor, block_strategy, student_base_plans=student_base_plans
    )
    return model_folder_name(distill_trainer_name(use_da5), plans, configuration)


def student_model_folder(
    results_dataset_dir: str | Path, plans_identifier: str, configuration: str, use_da5: bool
) -> Path:
    return Path(results_dataset_dir) / model_folder_name(
        distill_trainer_name(use_da5), plans_identifier, configuration
    )


# ---- device choice: one rule for the trainer's -device/-d_device and the operator's --device auto

DEVICE_SPELLINGS = "cpu, cuda, cuda:N or mps"


def parse_device(text: str) -> tuple[str, int | None]:
    """'cpu' | 'cuda' | 'cuda:N' | 'mps' -> (type, index); ValueError naming the valid spellings otherwise.

    Pure, so a command line is checked before torch loads (and in the operator, which never loads it).
    """
    t = text.strip().lower()
    if t in ("cpu", "cuda", "mps"):
        return t, None
    if t.startswith("cuda:") and t[5:].isdigit():
        return "cuda", int(t[5:])
    raise ValueError(f"must be {DEVICE_SPELLINGS}, got {text!r}")


def choose_device(spec: str | None, cuda_available: Callable[[], bool]) -> str:
    """The device a run uses: no choice (None or '') -> cuda when ``cuda_available()`` finds a GPU, else
    cpu, never assuming CUDA; an explicit choice is checked (:func:`parse_device`) and kept as given.

    The probe is the caller's: torch in the trainer, nvidia-smi in the operator, which never imports torch.
    """
    if not spec:
        return "cuda" if cuda_available() else "cpu"
    parse_device(spec)
    return spec


# ---- atomic files: what one side writes while the other may read it

#: Ends every temp file of an atomic write; no reader's name or glob ends so.
ATOMIC_TEMP_SUFFIX = ".tmp"


def atomic_temp_path(target: str | os.PathLike) -> Path:
    """Beside the target, hidden, unique per call: `.<name>.<random>.tmp` (never a checkpoint, JSON or YAML
    name a reader looks for)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{ATOMIC_TEMP_SUFFIX}")


@contextlib.contextmanager
def replacing(filename: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write; when the block succeeds and wrote it, fsync it and `os.replace` it over
    `filename`, so a reader (or a pod restarted mid-write) sees the old file or the new one, never half.

    A block that writes nothing (e.g. a DDP rank that does not save) leaves `filename` alone; a block that
    raises leaves the old file and no temp file behind. `mode`: chmod before the rename. The temp file sits
    in the target's folder: `os.replace` must not cross file systems.
    """
    target = Path(filename)
    tmp = atomic_temp_path(target)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---- an exported model's metadata file

#: The metadata file beside an exported graph is named after it: `liver_3d.onnx` -> `liver_3d` + this suffix.
SIDECAR_SUFFIX = ".nnunet_inference.json"
#: The one metadata file at the root of a package directory (`nnunet-distill package`), which holds exactly
#: one model; its `package.model_file` names the graph it describes.
PACKAGE_SIDECAR_NAME = "nnunet_inference.json"


def sidecar_path(onnx_file: str | Path) -> Path:
    """Where the metadata of an exported graph lives: beside it, under the graph's own stem.

    One sidecar per model, never one per folder: exports of several students (2d and 3d_fullres, two r) may
    share an output folder, and a shared name let the last export's metadata describe every graph there.
    Naming it after the graph follows nnU-Net's own habit of pairing files by name (a segmentation's
    `CASE.npz`/`CASE.pkl` beside `CASE.nii.gz`), so the pair survives being copied together.
    """
    path = Path(onnx_file)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


# Unlabelled training cases (nnunet_distill.unlabelled): the rules the spec and the CLI both check.


def repeated(cases: Sequence[str]) -> list[str]:
    """The cases named more than once (a typo, or a list pasted twice)."""
    return sorted(case for case, n in Counter(cases).items() if n > 1)


def needs_kd(cases: Sequence[str], alpha: float) -> bool:
    """True when unlabelled cases are given without KD: a case without labels teaches nothing else."""
    return bool(cases) and alpha == 0


def held_out(cases: Sequence[str], test_cases: Iterable[str] | None) -> list[str]:
    """The cases also named as held-out test cases: a test case is never trained on, labelled or not."""
    return sorted(set(cases) & set(test_cases or ()))


def labelled_share_problem(share: float | None, cases: Sequence[str]) -> str | None:
    """What is wrong with a labelled share (None when it is valid or unset): a share of the training samples
    drawn from labelled cases is a probability, and only means something beside unlabelled cases."""
    if share is None:
        return None
    if not 0.0 < share < 1.0:
        return f"must be in (0, 1), got {share}"
    if not cases:
        return (
            "needs unlabelled cases to weigh against: without them every sample comes from a labelled case "
            "(give unlabelled cases, or drop the share)"
        )
    return None
