"""The console scripts: nnunet-distill (run/plan/crds, trainer dispatch) and nnunet-distill-operator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nnunet_distill_operator import cli, crd

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(
    *args: str, env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def write_job(tmp_path: Path, spec: dict, name: str | None = "job") -> Path:
    meta = {"name": name} if name else {}
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "distillation.nnunet.io/v1alpha1",
                "kind": "DistillationJob",
                "metadata": meta,
                "spec": spec,
            }
        )
    )
    return path


def test_crds_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds"]) == 0
    assert capsys.readouterr().out == crd.crd_yaml()


def test_crds_write_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds", "--write", "--root", str(tmp_path)]) == 0
    for target in crd.CRD_TARGETS:
        assert (tmp_path / target / crd.CRD_FILENAME).read_text() == crd.crd_yaml()


def test_plan_prints_stages_and_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(ROOT / "examples" / "distillationjob-full.yaml")]) == 0
    out = capsys.readouterr().out
    assert "6 stages" in out and "$ nnUNetv2_resenc_distillation_train" in out
    assert "$ nnunet-distill gate --summary '/data/nnUNet_results/Dataset220_*/" in out
    assert cli.main(["plan", str(ROOT / "examples" / "demo.yaml"), "--manifests"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == [
        "demo-preprocess",
        "demo-teachers",
        "demo-distill",
        "demo-export",
        "demo-gate",
    ]


def test_invalid_job_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    path = write_job(
        tmp_path, {"dataset": {"id": 3}, "storage": {"claimName": "d"}, "distillation": {"temperature": 0}}
    )
    result = run("nnunet-distill", "plan", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "spec.distillation.temperature" in lines[0] and "Traceback" not in result.stderr
    )
    assert lines[0].startswith("nnunet-distill plan: error:")


@pytest.mark.parametrize(
    "content,expected",
    [
        ("kind: ConfigMap\n", "no `kind: DistillationJob`"),
        (
            "apiVersion: distillation.nnunet.io/v1\nkind: DistillationJob\nmetadata: {name: x}\nspec: {}\n",
            "apiVersion must be distillation.nnunet.io/v1alpha1",
        ),
        ("apiVersion: distillation.nnunet.io/v1alpha1\nkind: DistillationJob\nspec: {}\n", "metadata.name"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_job_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_run_needs_local(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(ROOT / "examples" / "demo.yaml")])
    assert info.value.code == 2 and "kubectl apply -f" in capsys.readouterr().err


def test_help_lists_operator_and_trainer_commands() -> None:
    result = run("nnunet-distill", "--help")
    assert result.returncode == 0
    for command in (
        "run",
        "plan",
        "crds",
        "demo",
        "synthetic",
        "train-teacher",
        "package",
        "gate",
        "publish",
        "predict",
    ):
        assert command in result.stdout


def test_trainer_subcommand_is_dispatched_to_the_trainer(tmp_path: Path) -> None:
    result = run(
        "nnunet-distill",
        "synthetic",
        "-d",
        "777",
        "--name",
        "Tiny",
        "--cases",
        "2",
        "--test-cases",
        "1",
        "--size",
        "16",
        "16",
        "16",
        env={"nnUNet_raw": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "Dataset777_Tiny" / "dataset.json").is_file()


def test_operator_package_never_imports_torch_and_cli_imports_nothing_heavy() -> None:
    code = (
        "import sys, nnunet_distill_operator.cli as c; heavy = {'torch', 'kopf', 'kubernetes', 'pydantic'}; "
        "assert not heavy & set(sys.modules), heavy & set(sys.modules); "
        "import nnunet_distill_operator.controller, nnunet_distill_operator.local, "
        "nnunet_distill_operator.demo; assert 'torch' not in sys.modules; "
        # of the trainer package only the standard-library contract (issue 13: one definition of the names)
        "trainer = {m for m in sys.modules if m == 'nnunet_distill' or m.startswith('nnunet_distill.')}; "
        "assert trainer <= {'nnunet_distill', 'nnunet_distill.contract'}, trainer"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_operator_requires_a_watch_scope_and_an_existing_kubeconfig(tmp_path: Path) -> None:
    result = run("nnunet-distill-operator")
    assert result.returncode == 2 and "--all-namespaces" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("nnunet-distill-operator", "-A", "--kubeconfig", str(tmp_path / "missing"))
    assert result.returncode == 2 and "no such file" in result.stderr
    result = run("nnunet-distill-operator", "--namespace", "ml", "--all-namespaces")
    assert result.returncode == 2  # argparse: mutually exclusive


def test_local_run_stops_at_the_first_failing_stage_with_a_clear_message(tmp_path: Path) -> None:
    """A real run: nnU-Net's own planner fails on a dataset that does not exist."""
    path = write_job(
        tmp_path, {"dataset": {"id": 778}, "storage": {"claimName": "d"}, "preprocess": {"processes": 1}}
    )
    result = run(
        "nnunet-distill",
        "run",
        str(path),
        "--local",
        "--data-dir",
        str(tmp_path / "data"),
        "--workdir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        timeout=300,
    )
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnunet-distill run: error: stage preprocess failed:")
    assert "`nnUNetv2_plan_and_preprocess`" in err[0] and "exited with code" in err[0]
    assert "[preprocess] $ nnUNetv2_plan_and_preprocess -d 778" in result.stdout
    assert "last lines:" in result.stdout
    status = yaml.safe_load((tmp_path / "run" / "status.yaml").read_text())
    assert status["phase"] == "Failed" and status["stages"]["preprocess"]["state"] == "Failed"
