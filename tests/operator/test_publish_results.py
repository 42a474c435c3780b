"""The operator's side of verified publishing: a job is Succeeded only with the published model's URI and
SHA-256 from the publish pod's termination message, and a failed publish shows the publisher's reason in the
conditions."""

from __future__ import annotations

import json
from typing import Any

from nnunet_distill_operator import k8s
from nnunet_distill_operator.reconcile import decide

from tests.operator.harness import terminated_status
from tests.operator.test_reconcile import NOW, applied, cond, cr, done, failed, job

SPEC = {"dataset": {"id": 27}, "storage": {"claimName": "data"}, "output": {"uri": "s3://models/liver"}}
RESULT = {
    "stage": "publish",
    "ok": True,
    "artifacts": {
        "uri": "s3://models/liver/20260301T120000Z-abcdef012345",
        "sha256": "ab" * 32,
        "sizeBytes": 4242,
    },
}


def _pod(phase: str, code: int, message: str, created: str = "2026-03-01T11:50:00Z") -> dict[str, Any]:
    return {
        "metadata": {"name": f"liver-publish-{code}", "creationTimestamp": created},
        "status": terminated_status(code, message, phase=phase),
    }


def _at_publish() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    body = cr(spec=SPEC)
    jobs: dict[str, Any] = {}
    d = decide(body, jobs, {}, NOW)
    while True:
        body = applied(body, d)
        manifest = d.create[0]
        stage = manifest["metadata"]["labels"][k8s.LABEL_STAGE]
        if stage == "publish":
            return body, jobs, manifest
        jobs[stage] = done(manifest)
        d = decide(body, jobs, {}, NOW)


def test_succeeded_only_once_the_verified_result_is_known() -> None:
    body, jobs, manifest = _at_publish()
    jobs["publish"] = done(manifest)
    # The Job's success arrived before its pod's termination message: not Succeeded yet.
    d = decide(body, jobs, {}, NOW)
    body = applied(body, d)
    assert body["status"]["phase"] == "Running" and not d.create
    assert body["status"]["stages"]["publish"]["reason"] == "AwaitingPublishResult"
    assert cond(body["status"], "PublishComplete")["status"] == "False"
    assert "artifacts" not in body["status"]

    d = decide(body, jobs, {"publish": [_pod("Succeeded", 0, json.dumps(RESULT))]}, NOW)
    body = applied(body, d)
    assert body["status"]["phase"] == "Succeeded"
    assert body["status"]["artifacts"] == RESULT["artifacts"]
    assert cond(body["status"], "PublishComplete")["status"] == "True"
    # Later passes without the pod (deleted) keep the result and the phase.
    body = applied(body, decide(body, jobs, {}, NOW))
    assert body["status"]["phase"] == "Succeeded" and body["status"]["artifacts"]["sha256"] == "ab" * 32


def test_a_succeeded_pod_without_a_verified_uri_never_completes_the_job() -> None:
    body, jobs, manifest = _at_publish()
    jobs["publish"] = done(manifest)
    crash_text = "Traceback ...\nsomething printed instead of JSON"
    body = applied(body, decide(body, jobs, {"publish": [_pod("Succeeded", 0, crash_text)]}, NOW))
    assert body["status"]["phase"] == "Running"


def test_publish_failure_reason_is_the_condition_reason() -> None:
    body, jobs, manifest = _at_publish()
    message = json.dumps(
        {
            "stage": "publish",
            "ok": False,
            "error": {
                "reason": "InvalidCredentials",
                "message": "the storage rejected the credentials (AWS_ACCESS_KEY_ID)",
            },
        }
    )
    jobs["publish"] = failed(manifest)
    d = decide(body, jobs, {"publish": [_pod("Failed", 1, message)]}, NOW)
    body = applied(body, d)
    status = body["status"]
    assert status["phase"] == "Failed" and "artifacts" not in status
    publish = cond(status, "PublishComplete")
    assert publish["status"] == "False" and publish["reason"] == "InvalidCredentials"
    assert "AWS_ACCESS_KEY_ID" in publish["message"]
    assert "InvalidCredentials" in status["message"]
    assert cond(status, "Ready")["status"] == "False"


def test_a_non_camelcase_reason_falls_back_to_error() -> None:
    body, jobs, manifest = _at_publish()
    jobs["publish"] = failed(manifest)
    message = json.dumps({"ok": False, "error": {"reason": "bad reason!", "message": "x"}})
    status = applied(body, decide(body, jobs, {"publish": [_pod("Failed", 1, message)]}, NOW))["status"]
    assert cond(status, "PublishComplete")["reason"] == "Error"


def test_a_retried_publish_succeeds_after_a_failed_attempt() -> None:
    """Exit 1 of one pod is retried by the Job (backoffLimit); the next pod publishes the same package."""
    body, jobs, manifest = _at_publish()
    jobs["publish"] = job(manifest, active=1, failed=1, startTime="2026-03-01T11:00:00Z")
    first = _pod(
        "Failed", 1, json.dumps({"ok": False, "error": {"reason": "EndpointUnreachable", "message": "x"}})
    )
    body = applied(body, decide(body, jobs, {"publish": [first]}, NOW))
    assert body["status"]["phase"] == "Running"
    jobs["publish"] = done(manifest)
    second = _pod("Succeeded", 0, json.dumps(RESULT), created="2026-03-01T11:55:00Z")
    body = applied(body, decide(body, jobs, {"publish": [first, second]}, NOW))
    assert (
        body["status"]["phase"] == "Succeeded"
        and body["status"]["artifacts"]["uri"] == RESULT["artifacts"]["uri"]
    )
