"""One frozen description of a distillation run, shared by the standard and the ResEnc command lines.

The original tool had two copies of its training script that drifted apart. Here both CLIs only map their
flags onto a :class:`DistillationConfig`; everything downstream (student plans, teachers, trainer, checkpoint
metadata, validation summary) reads this one object, so the two entry points cannot behave differently except
through the values they put in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nnunet_distill import contract

TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KD_MODES = ("pixel", "channel", "both")  # = loss.KD_MODES (kept torch-free here)
STUDENT_INITS = ("teacher", "random")  # = inherit.INIT_CHOICES
TEACHER_VIEWS = ("augmented", "clean")  # = augmentation.TEACHER_VIEWS
DEFAULT_CHECKPOINT = (
    "checkpoint_final.pth"  # = teachers.DEFAULT_CHECKPOINT; not imported, to keep torch out of parsing
)


class ConfigError(ValueError):
    """A value of the run configuration is invalid; the message names the flag and the valid range."""


def alpha_problem(alpha: float, shown: str | None = None) -> str | None:
    """What is wrong with a KD weight α (None when it is valid): the one α check of the CLI, config and
    loss."""
    if 0.0 <= alpha <= 1.0:
        return None
    return f"must be in [0, 1], got {alpha if shown is None else shown}"


def temperature_problem(temperature: float, shown: str | None = None) -> str | None:
    """What is wrong with a KD temperature T (None when it is valid): the one T check of CLI, config and
    loss."""
    if temperature > 0.0:
        return None
    return f"must be > 0, got {temperature if shown is None else shown}"


@dataclass(frozen=True)
class DistillationConfig:
    dataset: str  # -d: ID ("901") or full name ("Dataset901_Synth")
    fold: int  # -f: the student's fold (its validation cases)
    configuration: str = contract.DEFAULT_CONFIGURATION
    alpha: float = 0.3  # -a: weight of the KD term
    temperature: float = 3.0  # -temp
    reduction_factor: int = 2  # -r
    teacher_folds: tuple[int, ...] | None = None  # -tf; None = every complete fold found
    teacher_trainer: str = contract.DEFAULT_TEACHER_TRAINER  # -tr
    teacher_plans: str = contract.DEFAULT_PLANS  # -p (standard) / -tpl (ResEnc)
    teacher_folder: str | None = None  # -t; None = $nnUNet_results/<Dataset>/<tr>__<plans>__<cfg>
    teacher_checkpoint: str = DEFAULT_CHECKPOINT  # -tcp
    teacher_precision: str = "auto"  # --teacher_precision: auto | fp32 | bf16 | fp16
    student_base_plans: str = (
        contract.DEFAULT_PLANS
    )  # the plans the student is derived from (-spl for ResEnc)
    block_strategy: str | None = None  # -bs (ResEnc students); None for the standard CLI
    epochs: int | None = None  # -e; None = nnU-Net's default (1000)
    iterations_per_epoch: int | None = None  # None = nnU-Net's default (250)
    val_iterations: int | None = None  # None = nnU-Net's default (50)
    use_da5: bool = False
    rotate_folds: bool = False
    rotate_freq: int = 400
    disable_mirroring: bool = False
    device: str | None = None  # -d_device; None = cuda if available else cpu
    continue_training: bool = False  # -c_continue
    overwrite: bool = False  # --overwrite: a fresh run may replace an existing student's checkpoints
    variant: str = "standard"  # which CLI built it (for logs and metadata only)
    kd_mode: str = "pixel"  # --kd_mode: pixel | channel (channel-wise KD) | both
    student_init: str = "teacher"  # --student_init: teacher (inherit sliced weights) | random
    teacher_view: str = "augmented"  # --teacher_view: augmented | clean (before intensity augs)
    test_cases: tuple[str, ...] | None = None  # --test_cases: held-out case ids (default: all of imagesTs)
    unlabelled_cases: tuple[str, ...] = ()  # --unlabelled_cases: training cases learnt by KD alone
    labelled_share: float | None = None  # --labelled_share: None = nnU-Net's uniform draw over all cases

    def __post_init__(self) -> None:
        validate(self)

    @property
    def student_plans_identifier(self) -> str:
        """The student's plans name (and folder): says its teacher plans, r, and base and block strategy
        where they are not the default (contract.student_plans_identifier)."""
        return contract.student_plans_identifier(
            self.teacher_plans,
            self.reduction_factor,
            self.block_strategy,
            student_base_plans=self.student_base_plans,
        )

    @property
    def trainer_name(self) -> str:
        return contract.distill_trainer_name(self.use_da5)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["teacher_folds"] = list(self.teacher_folds) if self.teacher_folds is not None else None
        d["test_cases"] = list(self.test_cases) if self.test_cases is not None else None
        d["unlabelled_cases"] = list(self.unlabelled_cases)
        return d


def _validate_teacher_folds(folds: Sequence[int]) -> None:
    if len(folds) == 0:
        raise ConfigError("-tf/--teacher_folds needs at least one fold (omit it to use every fold found)")
    if any(f < 0 for f in folds):
        raise ConfigError(f"-tf/--teacher_folds must be fold indices >= 0, got {list(folds)}")
    if len(set(folds)) != len(folds):
        raise ConfigError(f"-tf/--teacher_folds lists a fold twice: {list(folds)}")


def validate(cfg: DistillationConfig) -> None:
    """Range checks with messages that name the flag: the CLIs and the Python API share them."""
    if problem := alpha_problem(cfg.alpha):
        raise ConfigError(f"-a/--alpha {problem}")
    if problem := temperature_problem(cfg.temperature):
        raise ConfigError(f"-temp/--temperature {problem}")
    if cfg.reduction_factor < 1:
        raise ConfigError(f"-r/--reduction_factor must be an integer >= 1, got {cfg.reduction_factor}")
    if cfg.fold < 0:
        raise ConfigError(f"-f/--fold must be a fold index >= 0, got {cfg.fold}")
    if cfg.teacher_folds is not None:
        _validate_teacher_folds(cfg.teacher_folds)
    for flag, value in (
        ("-e/--epochs", cfg.epochs),
        ("--iterations_per_epoch", cfg.iterations_per_epoch),
        ("--val_iterations", cfg.val_iterations),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if cfg.rotate_freq < 1:
        raise ConfigError(f"-rotate_freq must be >= 1 epoch, got {cfg.rotate_freq}")
    if cfg.block_strategy is not None and cfg.block_strategy not in contract.BLOCK_STRATEGIES:
        raise ConfigError(
            f"-bs/--block_strategy must be one of {', '.join(contract.BLOCK_STRATEGIES)}, "
            f"got {cfg.block_strategy!r}"
        )
    if cfg.device is not None:
        parse_device_string(cfg.device)
    for flag, value, choices in (
        ("--kd_mode", cfg.kd_mode, KD_MODES),
        ("--student_init", cfg.student_init, STUDENT_INITS),
        ("--teacher_view", cfg.teacher_view, TEACHER_VIEWS),
    ):
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    if cfg.test_cases is not None and (not cfg.test_cases or len(set(cfg.test_cases)) != len(cfg.test_cases)):
        raise ConfigError(f"--test_cases needs distinct case identifiers, got {list(cfg.test_cases)}")
    _validate_unlabelled_cases(cfg)
    if cfg.teacher_precision not in TEACHER_PRECISIONS:
        raise ConfigError(
            f"--teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}, "
            f"got {cfg.teacher_precision!r}"
        )


def _validate_unlabelled_cases(cfg: DistillationConfig) -> None:
    cases = cfg.unlabelled_cases
    if twice := contract.repeated(cases):
        raise ConfigError(f"--unlabelled_cases lists a case twice: {', '.join(twice)}")
    if contract.needs_kd(cases, cfg.alpha):
        raise ConfigError(
            "--unlabelled_cases needs KD: with -a 0 the student learns nothing from a case without labels "
            "(give -a > 0, or drop --unlabelled_cases)"
        )
    if both := contract.held_out(cases, cfg.test_cases):
        raise ConfigError(f"--unlabelled_cases and --test_cases both name {', '.join(both)}")
    if problem := contract.labelled_share_problem(cfg.labelled_share, cases):
        raise ConfigError(f"--labelled_share {problem}")


def parse_device_string(text: str) -> tuple[str, int | None]:
    """'cpu' | 'cuda' | 'cuda:N' | 'mps' -> (type, index) by the contract's one rule
    (:func:`nnunet_distill.contract.parse_device`), as a ConfigError naming -d_device. Pure, so the CLI can
    reject typos before torch loads."""
    try:
        return contract.parse_device(text)
    except ValueError:
        raise ConfigError(f"-d_device must be {contract.DEVICE_SPELLINGS}, got {text!r}") from None
