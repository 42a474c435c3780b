"""The built trainer image, run with buildah (chroot isolation): every command a Stage runs and every trainer
console script answers --help inside it, tini is its entrypoint, it runs as UID 1000, and it holds the torch
the project pins and onnxruntime-gpu.

Needs the image: `make test-trainer-image` builds it (`make image-trainer`) and runs this file with
TRAINER_IMAGE set. `make test` leaves this file out for that reason; without TRAINER_IMAGE it is skipped on a
developer machine and fails where CI is set. The buildah storage comes from the environment (STORAGE_DRIVER,
default vfs as in the Makefile; CONTAINERS_STORAGE_CONF for another store).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from collections.abc import Iterator

import pytest
from nnunet_distill_operator import api, cli, plan

from tests.external import require
from tests.ship.conftest import REPO

IMAGE = os.environ.get("TRAINER_IMAGE", "")
ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs"), "BUILDAH_ISOLATION": "chroot"}
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
TORCH = "2.14.1"


def stage_commands() -> list[tuple[str, ...]]:
    """The distinct programs (with the subcommand of the umbrella CLI) in the plans of two jobs that between
    them use every stage and both student architectures: what the operator will run in this image."""
    paths = plan.DataPaths("/r", "/p", "/res", "/res/nnunet-distill/j")
    base = {"dataset": {"id": 27}, "storage": {"claimName": "d"}}
    specs = [
        {
            **base,
            "teachers": {"train": True, "folds": [0, 1]},
            "output": {"uri": "s3://models/liver", "secretRef": {"name": "s3"}},
        },
        {**base, "student": {"architecture": "resenc", "plans": "nnUNetResEncUNetMPlans"}},
    ]
    found: set[tuple[str, ...]] = set()
    for spec in specs:
        for stage in plan.plan(api.parse_spec(spec), name="j", paths=paths):
            for command in stage.commands:
                argv = command.argv
                found.add(argv[:2] if argv[0] == cli.PROG else argv[:1])
    return sorted(found)


def trainer_commands() -> list[tuple[str, ...]]:
    """Every stage command, every console script but the operator's, every trainer subcommand."""
    scripts = {(s,) for s in SCRIPTS if s != "nnunet-distill-operator"}
    subcommands = {(cli.PROG, sub) for sub in cli.TRAINER_COMMANDS}
    return sorted(set(stage_commands()) | scripts | subcommands)


def test_the_command_list_covers_every_stage_and_architecture() -> None:
    """Guards the parametrisation below (runs without the image): a planner change that drops a stage or
    an architecture from these plans would otherwise shrink what the image is checked for."""
    programs = {c[0] for c in stage_commands()}
    assert {
        "nnUNetv2_plan_and_preprocess",
        "nnUNetv2_plan_experiment",
        "nnUNetv2_distillation_train",
        "nnUNetv2_resenc_distillation_train",
        "nnUNetv2_distillation_export_onnx",
        "nnUNetv2_resenc_distillation_export_onnx",
    } <= programs
    assert {("nnunet-distill", s) for s in ("train-teacher", "package", "gate", "publish")} <= set(
        stage_commands()
    )


def _run(ctr: str, *argv: str) -> list[str]:
    return ["buildah", "run", "--isolation", "chroot", "--network", "host", ctr, "--", *argv]


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    if not IMAGE:
        message = (
            "TRAINER_IMAGE not set: `make test-trainer-image` builds the trainer image and runs this file"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI runs it through that target, never without the image)")
        pytest.skip(message)
    buildah = require("buildah", "apt-get install buildah")
    ctr = subprocess.run(
        [buildah, "from", "--pull-never", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.strip()
    yield ctr
    subprocess.run([buildah, "rm", ctr], env=ENV, capture_output=True, check=False, timeout=300)


@pytest.mark.parametrize("command", trainer_commands(), ids=" ".join)
def test_every_trainer_command_answers_help_inside_the_image(
    container: str, command: tuple[str, ...]
) -> None:
    proc = subprocess.run(
        _run(container, *command, "--help"), env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "usage" in proc.stdout.lower(), proc.stdout[-1500:]


def test_image_config_tini_uid_and_the_pinned_gpu_stack(container: str) -> None:
    inspect = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    config = json.loads(inspect)["OCIv1"]["config"]
    assert config["User"] == "1000:1000" and config["Entrypoint"] == ["tini", "--"]
    probe = (
        "import json, torch, onnxruntime, importlib.metadata as m;"
        "print(json.dumps({'torch': torch.__version__, 'ort': m.version('onnxruntime-gpu'),"
        "'providers': onnxruntime.get_available_providers()}))"
    )
    proc = subprocess.run(
        _run(container, "python", "-c", probe),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["torch"].startswith(TORCH), found
    assert "CUDAExecutionProvider" in found["providers"], found
    uid = subprocess.run(
        _run(container, "id", "-u"), env=ENV, capture_output=True, text=True, timeout=60, check=True
    )
    assert uid.stdout.strip() == "1000"
