"""What each image installs is enough for the commands it runs.

The operator image installs only the `operator` extra and the trainer image only the `trainer` extra (see the
Dockerfiles). Without a container engine, the next best check runs each image's console scripts here with
every module the image would *not* have made unimportable: the sets are derived from the installed
distributions' own requirement metadata, not listed by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tests.ship.conftest import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def closure(extra: str) -> frozenset[str]:
    """Distributions `pip install nnunet-distill[extra]` pulls in (as installed here, markers evaluated)."""
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [("nnunet-distill", (extra,))]
    while todo:
        name, extras = todo.pop()
        key = _norm(name) + "[" + ",".join(extras) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or ():
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return frozenset(k.split("[")[0] for k in seen)


def top_level_modules(dists: set[str]) -> set[str]:
    modules = set()
    for module, owners in metadata.packages_distributions().items():
        if module.startswith("_") or module in {"nnunet_distill", "nnunet_distill_operator"}:
            continue
        if module in sys.stdlib_module_names:  # e.g. the obsolete `argparse` backport some package requires
            continue
        if {_norm(o) for o in owners} & dists:
            modules.add(module)
    return modules


def run_blocked(blocked: set[str], script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run a console script's entry point in a fresh interpreter where `blocked` modules cannot be
    imported."""
    module, _, func = SCRIPTS[script].partition(":")
    code = f"""
import importlib.abc, sys
BLOCKED = set({json.dumps(sorted(blocked))})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed in this image)", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = [{script!r}] + {args!r}
from {module} import {func} as entry
sys.exit(entry())
"""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def test_extras_really_differ() -> None:
    """Guards the two tests below: if both extras pulled in everything, they would prove nothing."""
    operator_only = top_level_modules(set(closure("operator") - closure("trainer")))
    trainer_only = top_level_modules(set(closure("trainer") - closure("operator")))
    assert {"kopf", "prometheus_client"} <= operator_only
    assert {"torch", "nnunetv2"} <= trainer_only


@pytest.mark.parametrize("args", [["--help"]], ids=["help"])
def test_operator_image_runs_the_operator_without_torch(args) -> None:
    blocked = top_level_modules(set(closure("trainer") - closure("operator")))
    proc = run_blocked(blocked, "nnunet-distill-operator", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--metrics-port" in proc.stdout


@pytest.mark.parametrize("command", [["--help"], ["crds", "--help"]], ids=" ".join)
def test_operator_image_runs_the_operator_side_cli_without_torch(command) -> None:
    blocked = top_level_modules(set(closure("trainer") - closure("operator")))
    proc = run_blocked(blocked, "nnunet-distill", command)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "command",
    [["publish", "--help"], ["package", "--help"], ["synthetic", "--help"], ["train-teacher", "--help"]],
    ids=" ".join,
)
def test_trainer_image_runs_the_trainer_subcommands_without_operator_dependencies(command) -> None:
    """The trainer image installs the `trainer` extra only: no kopf, no prometheus-client. The umbrella CLI
    lives in the operator package, so it must dispatch trainer subcommands without importing those."""
    blocked = top_level_modules(set(closure("operator") - closure("trainer")))
    proc = run_blocked(blocked, "nnunet-distill", command)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
