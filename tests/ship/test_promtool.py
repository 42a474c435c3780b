"""The chart's alert rules and the dashboard's PromQL, evaluated by Prometheus' own `promtool test rules`.

The rules come from the real chart render (Helm SDK); the dashboard queries from the JSON the chart ships,
with Grafana's variables filled in. Input series are written the way the operator, kube-state-metrics and
dcgm-exporter export them; the Job names come from the operator's own naming code, so a long DistillationJob
name produces the hashed Job name a cluster would see.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.external import promtool
from tests.ship.conftest import CHART, one

DASHBOARD = json.loads((CHART / "files" / "dashboards" / "nnunet-distill.json").read_text())
JOB = "nnunet-distill-operator"  # the scrape job label (jobLabel app.kubernetes.io/name)


def _run(tmp_path: Path, rules: list[dict], tests: list[dict]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules}, sort_keys=False))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump(
            {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False
        )
    )
    check = subprocess.run(
        [promtool(), "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def rule_groups(render) -> list[dict]:
    rule = one(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    return rule["spec"]["groups"]


def _without_annotations(groups: list[dict]) -> list[dict]:
    """The unit tests compare labels; `promtool check rules` has already parsed the annotation templates."""
    return [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in groups
    ]


def test_full_rules_file_passes_promtool_check(rule_groups, tmp_path) -> None:
    _run(tmp_path, rule_groups, [])


def test_alerts_fire_with_the_jobs_namespace_and_only_when_due(rule_groups, tmp_path) -> None:
    tests = [
        {
            "interval": "1m",
            "input_series": [
                # per-job series keep the DistillationJob's namespace (honorLabels), not the operator's
                {
                    "series": f'nnunet_distill_jobs{{job="{JOB}", namespace="ml-a", phase="Failed"}}',
                    "values": "0 0 1x20",
                },
                {
                    "series": f'nnunet_distill_jobs{{job="{JOB}", namespace="ml-b", phase="Pending"}}',
                    "values": "1x45",
                },
                {
                    "series": f'nnunet_distill_jobs{{job="{JOB}", namespace="ml-c", phase="Pending"}}',
                    "values": "1x10 0x35",
                },
                {
                    "series": f'nnunet_distill_dice_retention{{job="{JOB}", namespace="ml-a", name="liver"}}',
                    "values": "0.95x45",
                },
                {
                    "series": f'nnunet_distill_dice_retention{{job="{JOB}", namespace="ml-a", '
                    'name="spleen"}',
                    "values": "0.99x45",
                },
                {"series": f'up{{job="{JOB}", namespace="nnunet-system", pod="op-0"}}', "values": "1x45"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "NnunetDistillJobFailed", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "NnunetDistillJobFailed",
                    "exp_alerts": [{"exp_labels": {"namespace": "ml-a", "severity": "warning"}}],
                },
                {"eval_time": "20m", "alertname": "NnunetDistillJobStuckPending", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "NnunetDistillJobStuckPending",
                    "exp_alerts": [{"exp_labels": {"namespace": "ml-b", "severity": "warning"}}],
                },
                {
                    "eval_time": "10m",
                    "alertname": "NnunetDistillAccuracyGateFailed",
                    "exp_alerts": [
                        {"exp_labels": {"namespace": "ml-a", "name": "liver", "severity": "warning"}}
                    ],
                },
                {"eval_time": "40m", "alertname": "NnunetDistillOperatorDown", "exp_alerts": []},
            ],
        }
    ]
    _run(tmp_path, _without_annotations(rule_groups), tests)


def test_operator_down_keeps_its_job_label_when_down_and_when_gone(rule_groups, tmp_path) -> None:
    down = {
        "interval": "1m",
        "input_series": [
            {"series": f'up{{job="{JOB}", namespace="nnunet-system", pod="op-0"}}', "values": "1 1 0x20"}
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "NnunetDistillOperatorDown", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "NnunetDistillOperatorDown",
                "exp_alerts": [{"exp_labels": {"job": JOB, "severity": "critical"}}],
            },
        ],
    }
    gone = {  # never scraped at all (no target): absent() must still name the job
        "interval": "1m",
        "input_series": [{"series": 'up{job="something-else"}', "values": "1x20"}],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "NnunetDistillOperatorDown",
                "exp_alerts": [{"exp_labels": {"job": JOB, "severity": "critical"}}],
            },
        ],
    }
    _run(tmp_path, _without_annotations(rule_groups), [down, gone])


def _dashboard_expr(title_part: str, ref: str = "A") -> str:
    for panel in DASHBOARD["panels"]:
        if title_part in panel["title"]:
            return next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
    raise AssertionError(f"no panel titled like {title_part!r}")


def _fill(expr: str, **variables: str) -> str:
    values = {"namespace": ".*", "job": ".*", "__range": "6h", "__rate_interval": "5m", **variables}
    return re.sub(r"\$([A-Za-z_]\w*)", lambda m: values[m.group(1)], expr)  # not label_replace's $1


def test_gpu_panel_joins_long_hashed_job_names_to_their_distillationjob(tmp_path) -> None:
    from nnunet_distill_operator import k8s

    long_name = "liver-tumour-ct-student-reduction-4-temperature-3-with-da5"
    job_name = k8s.job_name(long_name, "distill")
    assert not job_name.startswith(long_name + "-")  # the old `$job-.*` pattern could never match it
    other_job = k8s.job_name("spleen", "distill")
    series = [
        {"series": 'DCGM_FI_DEV_GPU_UTIL{gpu="0", namespace="ml", pod="p-long"}', "values": "80x10"},
        {"series": 'DCGM_FI_DEV_GPU_UTIL{gpu="1", namespace="ml", pod="p-other"}', "values": "10x10"},
        {
            "series": f'kube_pod_owner{{namespace="ml", pod="p-long", owner_kind="Job", '
            f'owner_name="{job_name}", '
            'owner_is_controller="true"}',
            "values": "1x10",
        },
        {
            "series": f'kube_pod_owner{{namespace="ml", pod="p-other", owner_kind="Job", '
            f'owner_name="{other_job}", '
            'owner_is_controller="true"}',
            "values": "1x10",
        },
        {
            "series": f'kube_job_owner{{namespace="ml", job_name="{job_name}", owner_kind="DistillationJob", '
            f'owner_name="{long_name}", owner_is_controller="true"}}',
            "values": "1x10",
        },
        {
            "series": f'kube_job_owner{{namespace="ml", job_name="{other_job}", '
            'owner_kind="DistillationJob", '
            'owner_name="spleen", owner_is_controller="true"}',
            "values": "1x10",
        },
    ]
    expr = _dashboard_expr("GPU utilisation")
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {
                    "expr": _fill(expr, job=long_name),
                    "eval_time": "5m",
                    "exp_samples": [
                        {"labels": f'{{distillationjob="{long_name}", job_name="{job_name}"}}', "value": 80}
                    ],
                },
                {
                    "expr": _fill(expr),
                    "eval_time": "5m",
                    "exp_samples": [
                        {"labels": f'{{distillationjob="{long_name}", job_name="{job_name}"}}', "value": 80},
                        {"labels": f'{{distillationjob="spleen", job_name="{other_job}"}}', "value": 10},
                    ],
                },
            ],
        }
    ]
    _run(tmp_path, [], tests)


def test_stage_panels_show_a_stage_that_finished_hours_ago(tmp_path) -> None:
    """One distill stage finished at 2h (600 s, in the 300-900 s bucket); at 6h the 6h-range panels still show
    it. The operator exports every known stage at 0 from its start, which is what lets increase() see the
    first one."""
    labels = f'job="{JOB}", stage="distill", result="Succeeded"'
    bucket = "nnunet_distill_stage_duration_seconds_bucket"
    series = [
        {"series": f'{bucket}{{{labels}, le="300.0"}}', "values": "0x360"},
        {"series": f'{bucket}{{{labels}, le="900.0"}}', "values": "0x120 1x240"},
        {"series": f'{bucket}{{{labels}, le="+Inf"}}', "values": "0x120 1x240"},
        {"series": f"nnunet_distill_stage_duration_seconds_count{{{labels}}}", "values": "0x120 1x240"},
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {
                    "expr": _fill(_dashboard_expr("Stage Jobs created", "B")),
                    "eval_time": "6h",
                    "exp_samples": [{"labels": '{result="Succeeded", stage="distill"}', "value": 1}],
                },
                {
                    "expr": _fill(_dashboard_expr("Stage duration", "A")),
                    "eval_time": "6h",
                    "exp_samples": [{"labels": '{stage="distill"}', "value": 600}],
                },
                # what the panels used before: a 5-minute rate window, empty four hours after the event
                {
                    "expr": "sum by (stage) (rate(nnunet_distill_stage_duration_seconds_count[5m])) > 0",
                    "eval_time": "6h",
                    "exp_samples": [],
                },
            ],
        }
    ]
    _run(tmp_path, [], tests)
