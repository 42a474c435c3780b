"""The real kubectl against the test API server with the operator running: apply, get (printer columns),
patch the status subresource, delete."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.operator.harness import OperatorRunner, dj_key, exists, get, job_key, wait_for

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"  # part of the test environment (see README)


@pytest.fixture()
def kubectl(kubeconfig: Path, tmp_path: Path):
    async def run(*args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            KUBECTL,
            f"--kubeconfig={kubeconfig}",
            f"--cache-dir={tmp_path / 'cache'}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()}")
        return out.decode()

    return run


def _table(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


async def test_kubectl_apply_get_patch_delete(kmock: Any, kubectl: Any, operator: OperatorRunner) -> None:
    out = await kubectl(
        "apply", "--validate=false", "-f", str(ROOT / "examples" / "distillationjob-minimal.yaml")
    )
    assert "distillationjob.distillation.nnunet.io/liver-r2 created" in out
    out = await kubectl(
        "apply", "--validate=false", "-f", str(ROOT / "examples" / "distillationjob-full.yaml")
    )
    assert "kits-resenc-r4 created" in out

    await wait_for(
        lambda: exists(kmock, job_key(kmock, "liver-r2-preprocess")), what="Job from the minimal example"
    )
    await wait_for(
        lambda: exists(kmock, job_key(kmock, "kits-resenc-r4-preprocess", "ml")), what="full example"
    )
    await wait_for(
        lambda: get(kmock, dj_key(kmock, "liver-r2")).get("status", {}).get("phase"), what="status"
    )

    rows = _table(await kubectl("get", "dj"))
    assert rows[0] == ["NAME", "PHASE", "STAGE", "EPOCH", "DICE", "AGE"]
    assert rows[1][:3] == ["liver-r2", "Pending", "preprocess"]

    await kubectl(
        "patch",
        "distillationjob",
        "liver-r2",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"progress":{"stage":"distill","epoch":7,"pseudoDice":0.81}}}',
    )
    rows = _table(await kubectl("get", "distill", "liver-r2"))
    assert rows[1][:5] == ["liver-r2", "Pending", "preprocess", "7", "0.81"]

    wide = _table(await kubectl("get", "dj", "-n", "ml", "-o", "wide"))
    assert wide[0] == ["NAME", "PHASE", "STAGE", "EPOCH", "DICE", "REASON", "AGE"]
    assert wide[1][0] == "kits-resenc-r4"

    assert (await kubectl("get", "dj", "liver-r2", "-o", "jsonpath={.status.conditions[0].type}")) == "Ready"
    yaml_out = await kubectl("get", "dj", "liver-r2", "-o", "yaml")
    assert "observedGeneration: 1" in yaml_out and "acceptedSpec:" in yaml_out

    await kubectl("delete", "dj", "liver-r2")
    await wait_for(lambda: not exists(kmock, job_key(kmock, "liver-r2-preprocess")), what="Jobs collected")
    rows = _table(await kubectl("get", "dj", "-A"))
    assert [r[1] for r in rows[1:]] == ["kits-resenc-r4"]
