"""The two training CLIs: every command line of the product description parses into the one
DistillationConfig, defaults differ only where the variants say so, and bad input exits non-zero with one line
and no traceback."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from nnunet_distill import distill
from nnunet_distill.cli import train as cli
from nnunet_distill.config import ConfigError, DistillationConfig

SEED = Path("/work/shared/seed/000_a0213ea4cfdc8993.txt")
SEED_COMMANDS = Path(__file__).parent / "data" / "seed_train_commands.txt"
PROGS = {"nnUNetv2_distillation_train": cli.STANDARD, "nnUNetv2_resenc_distillation_train": cli.RESENC}


def extract_seed_commands(text: str) -> list[str]:
    """Training command lines of the seed text; its sections are glued together, so cut at '#' comments and
    where a capitalised prose sentence starts right after a token (e.g. '-r 2Choose different ...')."""
    out = []
    for m in re.finditer(r"(nnUNetv2_(?:resenc_)?distillation_train)\b([^\n#]*)", text):
        line = re.split(r"(?<=[0-9a-z_])(?=[A-Z][A-Za-z0-9]* [a-z])", m.group(1) + m.group(2))[0]
        out.append(line.strip().rstrip("-").strip())
    return out


def seed_commands() -> list[str]:
    return [ln for ln in SEED_COMMANDS.read_text().splitlines() if ln and not ln.startswith("#")]


@pytest.mark.skipif(
    not SEED.is_file(),
    reason=f"product description {SEED} not on this machine; the checked-in copy is still tested below",
)
def test_checked_in_examples_are_exactly_the_seeds():
    assert extract_seed_commands(SEED.read_text()) == seed_commands()


def _parse(line: str) -> tuple[cli.Variant, DistillationConfig]:
    prog, *argv = shlex.split(line.replace("DATASET_ID", "901"))
    variant = PROGS[prog]
    args = cli.build_parser(variant).parse_args(argv)
    return variant, cli.config_from_args(args, variant)


@pytest.mark.parametrize("line", seed_commands())
def test_every_seed_example_parses(line):
    variant, cfg = _parse(line)
    tokens = shlex.split(line)
    assert cfg.dataset == "901" and cfg.fold == 0 and cfg.configuration == "3d_fullres"
    assert cfg.variant == variant.name
    assert cfg.alpha == float(tokens[tokens.index("-a") + 1]) if "-a" in tokens else cfg.alpha == 0.3
    assert cfg.temperature == float(tokens[tokens.index("-temp") + 1])
    assert cfg.reduction_factor == int(tokens[tokens.index("-r") + 1])
    assert cfg.continue_training == ("-c_continue" in tokens)
    assert cfg.use_da5 == ("--use_da5" in tokens)
    assert cfg.disable_mirroring == ("-disable_mirroring" in tokens)
    assert cfg.rotate_folds == ("-rotate_folds" in tokens)
    if "-tf" in tokens:
        assert cfg.teacher_folds == (0, 1, 2, 3, 4)
    else:
        assert cfg.teacher_folds is None
    if "-t" in tokens:
        assert cfg.teacher_folder == tokens[tokens.index("-t") + 1]
    if "-d_device" in tokens:
        assert cfg.device == tokens[tokens.index("-d_device") + 1]
    if "-tpl" in tokens:
        assert cfg.teacher_plans == tokens[tokens.index("-tpl") + 1]
    if "-spl" in tokens:
        assert cfg.student_base_plans == tokens[tokens.index("-spl") + 1]
    if "-bs" in tokens:
        assert cfg.block_strategy == tokens[tokens.index("-bs") + 1]


def test_variant_defaults():
    _, std = _parse("nnUNetv2_distillation_train -d 901 -f 0")
    _, res = _parse("nnUNetv2_resenc_distillation_train -d 901 -f 0")
    assert (
        (std.alpha, std.temperature, std.reduction_factor)
        == (res.alpha, res.temperature, res.reduction_factor)
        == (0.3, 3.0, 2)
    )
    assert std.rotate_freq == 400 and res.rotate_freq == 5
    assert std.teacher_plans == "nnUNetPlans" and std.student_base_plans == "nnUNetPlans"
    assert std.block_strategy is None and std.student_plans_identifier == "nnUNetPlans_r2"
    assert res.teacher_plans == "nnUNetResEncUNetLPlans" and res.student_base_plans == "nnUNetPlans"
    # the student's plans name says its teachers: a ResEnc L teachers' student never shares nnUNetPlans_r2
    assert res.block_strategy == "keep" and res.student_plans_identifier == "nnUNetResEncUNetLPlans_r2"
    assert std.epochs is None and std.iterations_per_epoch is None and std.val_iterations is None  # nnU-Net's
    assert std.teacher_trainer == "nnUNetTrainer" and std.teacher_checkpoint == "checkpoint_final.pth"
    assert std.teacher_precision == res.teacher_precision == "auto"
    _, exact = _parse("nnUNetv2_distillation_train -d 901 -f 0 --teacher_precision fp32")
    assert exact.teacher_precision == "fp32"
    # -p names the teacher plans in both commands (an alias of -tpl in the ResEnc one)
    _, res_p = _parse("nnUNetv2_resenc_distillation_train -d 901 -f 0 -p nnUNetResEncUNetMPlans")
    assert res_p.teacher_plans == "nnUNetResEncUNetMPlans"
    _, budget = _parse(
        "nnUNetv2_distillation_train -d 901 -f 1 -e 3 --iterations_per_epoch 4 --val_iterations 2 "
        "-c 3d_lowres -tr nnUNetTrainerDA5 -p nnUNetResEncUNetMPlans -tcp checkpoint_best.pth"
    )
    assert (budget.epochs, budget.iterations_per_epoch, budget.val_iterations, budget.fold) == (3, 4, 2, 1)
    assert budget.configuration == "3d_lowres" and budget.teacher_trainer == "nnUNetTrainerDA5"
    assert (
        budget.student_base_plans == "nnUNetResEncUNetMPlans"
        and budget.teacher_checkpoint == "checkpoint_best.pth"
    )


def test_help_documents_every_flag_and_the_block_strategies():
    text = cli.build_parser_resenc().format_help()
    for flag in (
        "-d",
        "-f",
        "-c",
        "-tf",
        "-a",
        "-temp",
        "-r",
        "-c_continue",
        "-disable_mirroring",
        "-e",
        "-t",
        "-tr",
        "-tpl",
        "-spl",
        "-bs",
        "-rotate_folds",
        "-rotate_freq",
        "-d_device",
        "--use_da5",
        "--iterations_per_epoch",
        "--val_iterations",
    ):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}[\s,]", text, re.MULTILINE), flag
    for strategy in ("reduce:", "keep:", "increase:", "adaptive:"):
        assert strategy in " ".join(text.split())
    for action in cli.build_parser_standard()._actions + cli.build_parser_resenc()._actions:
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-d", "901", "-f", "0", "-a", "1.5"], "-a/--alpha: must be in [0, 1]"),
        (["-d", "901", "-f", "0", "-a", "-0.1"], "-a/--alpha: must be in [0, 1]"),
        (["-d", "901", "-f", "0", "-temp", "0"], "-temp/--temperature: must be > 0"),
        (["-d", "901", "-f", "0", "-temp", "nan"], "-temp/--temperature"),
        (["-d", "901", "-f", "0", "-r", "0"], "-r/--reduction_factor: must be an integer >= 1"),
        (["-d", "901", "-f", "0", "-r", "1.5"], "-r/--reduction_factor: not an integer"),
        (["-d", "901", "-f", "-1"], "-f/--fold"),
        (["-d", "901", "-f", "0", "-tf", "0", "x"], "-tf/--teacher_folds"),
        (["-d", "901", "-f", "0", "-d_device", "gpu0"], "-d_device: must be cpu, cuda, cuda:N or mps"),
        (["-d", "901", "-f", "0", "-e", "0"], "-e/--epochs"),
        (["-d", "901"], "-f/--fold"),
        (["-d", "901", "-f", "0", "--use_da"], "unrecognized arguments: --use_da"),
    ],
)
def test_bad_values_exit_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main_standard(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_resenc_rejects_unknown_block_strategy(capsys):
    with pytest.raises(SystemExit):
        cli.main_resenc(["-d", "901", "-f", "0", "-bs", "shrink"])
    err = capsys.readouterr().err
    assert "-bs/--block_strategy: invalid choice: 'shrink'" in err and err.count("\n") == 1


def test_config_validates_on_its_own():
    with pytest.raises(ConfigError, match="-a/--alpha"):
        DistillationConfig(dataset="1", fold=0, alpha=2.0)
    with pytest.raises(ConfigError, match="-tf/--teacher_folds lists a fold twice"):
        DistillationConfig(dataset="1", fold=0, teacher_folds=(1, 1))
    with pytest.raises(ConfigError, match="-bs/--block_strategy"):
        DistillationConfig(dataset="1", fold=0, block_strategy="shrink")
    with pytest.raises(ConfigError, match="-d_device"):
        DistillationConfig(dataset="1", fold=0, device="cuda:x")


def test_both_commands_share_one_code_path(monkeypatch, capsys):
    """Each main only maps flags to a DistillationConfig and hands it to distill.run."""
    seen = []

    def capture(config, log=print):
        seen.append(config)
        return distill.RunResult(Path("/out"), Path("/out/checkpoint_final.pth"), None, None)

    monkeypatch.setattr(distill, "run", capture)
    assert (
        cli.main_standard(["-d", "901", "-f", "0", "-p", "nnUNetResEncUNetMPlans", "-rotate_freq", "5"]) == 0
    )
    assert (
        cli.main_resenc(
            ["-d", "901", "-f", "0", "-tpl", "nnUNetResEncUNetMPlans", "-spl", "nnUNetResEncUNetMPlans"]
        )
        == 0
    )
    std, res = seen
    assert type(std) is type(res) is DistillationConfig
    differing = {k for k, v in std.as_dict().items() if res.as_dict()[k] != v}
    assert differing == {"variant", "block_strategy"}  # None (no -bs) vs 'keep': same student plans
    assert (
        std.student_plans_identifier
        == res.student_plans_identifier
        == "nnUNetResEncUNetMPlans_r2_nnUNetResEncUNetMPlans"
    )
    assert "student saved in /out" in capsys.readouterr().out


def test_parsing_needs_no_torch():
    """The operator's contract test parses rendered commands with these parsers; they must stay light."""
    code = (
        "import sys; import nnunet_distill.cli.train as t; "
        "a = t.build_parser_resenc().parse_args(['-d', '1', '-f', '0', '-bs', 'adaptive']); "
        "t.config_from_args(a, t.RESENC); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def _workspace_env(root: Path) -> dict:
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    return env


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-d", "977", "-f", "0", "-d_device", "cpu"], "dataset 977 not found in nnUNet_raw="),
        (["-d", "901", "-f", "0", "-a", "2"], "-a/--alpha: must be in [0, 1], got 2"),
    ],
)
def test_console_script_errors_are_one_line_without_traceback(tmp_path, argv, needle):
    exe = Path(sys.executable).parent / "nnUNetv2_distillation_train"
    proc = subprocess.run(
        [str(exe), *argv],
        check=False,
        env=_workspace_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_runtime_errors_name_the_problem(nnunet_teachers, monkeypatch, capsys):
    """Against the real fixture workspace: a missing teacher fold, a missing plans file, an impossible
    device."""
    for key, value in nnunet_teachers.dataset.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    cases = [
        (["-d", "901", "-f", "0", "-tf", "0", "4", "-d_device", "cpu"], "teacher fold(s) 4 (-tf) not found"),
        (["-d", "901", "-f", "0", "-p", "nnUNetResEncUNetXXLPlans", "-d_device", "cpu"], "teacher folder"),
        (
            [
                "-d",
                "901",
                "-f",
                "0",
                "-t",
                str(nnunet_teachers.folder),
                "-p",
                "NoSuchPlans",
                "-d_device",
                "cpu",
            ],
            "student base plans",
        ),
        (["-d", "901", "-f", "0", "-d_device", "cuda:7"], "-d_device cuda:7"),
    ]
    before = set(nnunet_teachers.dataset.results_dataset.iterdir())
    for argv, needle in cases:
        assert cli.main_standard(argv) == 1, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
    assert set(nnunet_teachers.dataset.results_dataset.iterdir()) == before, "a refused run must not write"
