"""The termination message: a summary cut to the kubelet's 4096 bytes without losing what the operator reads,
written where the pod spec (or $TERMINATION_MESSAGE_PATH) says, never raising."""

from __future__ import annotations

import json

from nnunet_distill import termination


def test_fit_json_keeps_small_summaries_verbatim():
    summary = {
        "stage": "export",
        "ok": True,
        "metrics": {"finalDice": 0.91, "retention": 0.98},
        "artifacts": {"onnxPath": "/results/student.onnx", "studentParameters": 1234567},
    }
    assert json.loads(termination.fit_json(summary)) == summary


def test_fit_json_truncates_safely_to_the_limit():
    summary = {
        "stage": "publish",
        "ok": False,
        "error": {"reason": "VerificationFailed", "message": "x" * 10_000},
        "artifacts": {
            "uri": "s3://models/liver/20261125T131834Z-abcdef012345",
            "sha256": "a" * 64,
            "sizeBytes": 123456789,
            "files": [{"path": f"f{i}" * 20, "sha256": "b" * 64} for i in range(500)],
        },
        "metrics": {"finalDice": float("nan"), "retention": 0.97, "perClass": list(range(2000))},
        "log": "y" * 5000,
    }
    text = termination.fit_json(summary, 4096)
    assert len(text.encode()) <= 4096
    doc = json.loads(text)
    assert doc["truncated"] is True
    assert doc["error"]["reason"] == "VerificationFailed" and doc["error"]["message"].startswith("xxx")
    assert doc["artifacts"]["uri"] == summary["artifacts"]["uri"] and doc["artifacts"]["sha256"] == "a" * 64
    assert doc["artifacts"]["sizeBytes"] == 123456789
    assert doc["metrics"]["retention"] == 0.97 and doc["metrics"]["finalDice"] is None
    # a tiny limit still yields valid JSON
    assert len(termination.fit_json(summary, 300).encode()) <= 300
    json.loads(termination.fit_json(summary, 300))


def test_termination_message_paths(tmp_path, monkeypatch):
    summary = {"stage": "publish", "ok": True, "artifacts": {"uri": "s3://b/p/v", "sha256": "c" * 64}}
    explicit = tmp_path / "explicit"
    assert termination.write_termination_message(summary, explicit, env={}) == explicit
    assert json.loads(explicit.read_text()) == summary

    by_env = tmp_path / "by-env"
    assert (
        termination.write_termination_message(summary, env={"TERMINATION_MESSAGE_PATH": str(by_env)})
        == by_env
    )
    assert json.loads(by_env.read_text())["artifacts"]["sha256"] == "c" * 64

    # outside a pod the default path does not exist: nothing is created there
    absent_default = tmp_path / "dev" / "termination-log"
    monkeypatch.setattr(termination, "DEFAULT_TERMINATION_PATH", str(absent_default))
    assert termination.write_termination_message(summary, env={}) is None and not absent_default.exists()
    absent_default.parent.mkdir()
    absent_default.touch()  # the kubelet's file
    assert termination.write_termination_message(summary, env={}) == absent_default
    # an unwritable target is logged, not raised
    assert termination.write_termination_message(summary, tmp_path / "no" / "such" / "dir", env={}) is None
