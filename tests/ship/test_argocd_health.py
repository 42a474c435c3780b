"""The Argo CD health check, run by a real Lua 5.1 interpreter (Argo CD embeds gopher-lua, a Lua 5.1).

Cases live in Argo CD's own resource_customizations format (gitops/argocd/health_test.yaml + testdata/), so
the check can be contributed upstream unchanged; on top, every phase the operator's API can report is mapped.
"""

from __future__ import annotations

import typing
from datetime import UTC
from pathlib import Path

import pytest

from tests.ship.conftest import REPO, load_strict

ARGOCD = REPO / "gitops" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()
CASES = load_strict(ARGOCD / "health_test.yaml")["tests"]
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


@pytest.fixture(scope="module")
def health():
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    # Like Argo CD: the object is the global `obj`, the script is a chunk that returns the `hs` table.
    run = lua.eval("function(src, o) obj = o; local f = assert(loadstring(src)); return f() end")

    def evaluate(obj: dict) -> dict:
        hs = run(SCRIPT, lua.table_from(obj, recursive=True))
        return {"status": hs["status"], "message": hs["message"]}

    return evaluate


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_argocd_health_cases(health, case) -> None:
    obj = load_strict(ARGOCD / case["inputPath"])
    assert health(obj) == case["healthStatus"]


def test_every_case_file_is_used_and_is_a_valid_distillationjob() -> None:
    from nnunet_distill_operator import api

    used = {Path(c["inputPath"]).name for c in CASES}
    assert used == {p.name for p in (ARGOCD / "testdata").glob("*.yaml")}
    for name in used:
        obj = load_strict(ARGOCD / "testdata" / name)
        assert obj["apiVersion"] == api.API_VERSION and obj["kind"] == api.KIND
        if "status" in obj:
            api.parse_status(obj["status"])  # the fixtures only use status fields the operator really writes


def _phases() -> list[str]:
    from nnunet_distill_operator import api

    annotation = api.DistillationJobStatus.model_fields["phase"].annotation
    phases: list[str] = []
    for arg in typing.get_args(annotation) or (annotation,):
        phases.extend(a for a in typing.get_args(arg) if isinstance(a, str))
    return phases


EXPECTED = {
    "Pending": "Progressing",
    "Running": "Progressing",
    "Suspended": "Suspended",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
}


def test_every_operator_phase_has_the_intended_health(health) -> None:
    phases = _phases()
    assert phases, "could not read the phases from nnunet_distill_operator.api.DistillationJobStatus"
    assert set(phases) == set(EXPECTED), (
        f"phases changed ({phases}): decide their Argo CD health and update both"
    )
    from datetime import datetime

    from nnunet_distill_operator import status

    now = datetime(2026, 1, 1, tzinfo=UTC)
    for phase in phases:
        # Conditions exactly as the operator's status module computes them for this phase.
        conds = status.kstatus_conditions(
            phase, "SomeReason", f"job is {phase.lower()}", None, phase == "Suspended"
        )
        obj = {
            "apiVersion": "x/v1",
            "kind": "DistillationJob",
            "metadata": {"name": "j", "generation": 1},
            "spec": {"suspend": phase == "Suspended"},
            "status": {
                "phase": phase,
                "observedGeneration": 1,
                "conditions": status.merge_conditions([], conds, now, 1),
            },
        }
        got = health(obj)
        assert got["status"] == EXPECTED[phase], (phase, got)
        assert got["status"] in ARGO_STATUSES and got["message"]
        # Without conditions (an operator that has only set the phase so far) the verdict is the same.
        del obj["status"]["conditions"]
        assert health(obj)["status"] == EXPECTED[phase], phase


def test_stalled_condition_wins_over_a_running_phase(health) -> None:
    obj = {
        "metadata": {"generation": 2},
        "spec": {},
        "status": {
            "phase": "Running",
            "observedGeneration": 2,
            "conditions": [{"type": "Stalled", "status": "True", "reason": "BackoffLimitExceeded"}],
        },
    }
    assert health(obj) == {"status": "Degraded", "message": "BackoffLimitExceeded"}


def test_argocd_cm_patch_embeds_the_same_script_under_the_crd_group() -> None:
    from nnunet_distill_operator import api

    patch = load_strict(ARGOCD / "argocd-cm-patch.yaml")
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    key = f"resource.customizations.health.{api.GROUP}_{api.KIND}"
    assert patch["data"] == {key: SCRIPT}, f"argocd-cm-patch.yaml must hold health.lua verbatim under {key}"
