"""Monitoring objects: ServiceMonitor / PodMonitor / PrometheusRule (prometheus-operator CRDs, which
kubernetes-validate has no schema for, so their shape is checked here), and the Grafana dashboard, whose every
PromQL query is parsed with a real PromQL parser and may name only metrics the operator really exports (its
metrics.METRIC_NAMES), plus the explicitly listed DCGM exporter / kube-state-metrics / Prometheus series."""

from __future__ import annotations

import json
import re

import pytest

from tests.ship.conftest import CHART, NAMESPACE, by_kind, one

DASHBOARD_FILES = sorted((CHART / "files" / "dashboards").glob("*.json"))
# Series the dashboard may read that the operator does not export, each from a named exporter.
EXTERNAL_SERIES = {
    "DCGM_FI_DEV_GPU_UTIL": "dcgm-exporter",
    "DCGM_FI_DEV_FB_USED": "dcgm-exporter",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "dcgm-exporter",
    "kube_pod_owner": "kube-state-metrics",
    "kube_job_owner": "kube-state-metrics",
    "up": "Prometheus (scrape health)",
}
# Grafana's built-in variables must become valid PromQL before parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")


def operator_series() -> frozenset[str]:
    from nnunet_distill_operator import metrics

    return metrics.sample_names()


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression reads, from promql-parser's AST (not a regex over the text)."""
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def walk(node) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            if node.name:
                names.add(node.name)
            for matcher in getattr(node.matchers, "matchers", []) or []:
                if matcher.name == "__name__":
                    names.add(matcher.value)
            return
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable."""
    out = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"variable {var['name']}: only label_values(<selector>, <label>) is supported"
            out.append((f"variable ${var['name']}", inner.group(1)))
    return out


def test_metric_name_extraction_is_real() -> None:
    """The extractor must see through aggregations, functions, joins and ranges, and must not take labels or
    function names for metrics."""
    expr = (
        'histogram_quantile(0.9, sum by (le, stage) (rate(a_bucket{x="b"}[$__rate_interval]))) '
        "* on (namespace, pod) group_left (owner_name) max by (namespace, pod, owner_name) (kube_pod_owner) "
        '+ absent(up{job="j"} == 1) - time() + {__name__="c"}'
    )
    assert metric_names(expr) == {"a_bucket", "kube_pod_owner", "up", "c"}


def test_operator_exports_what_the_chart_expects() -> None:
    from nnunet_distill_operator import metrics

    assert metrics.METRIC_NAMES and all(n.startswith("nnunet_distill_") for n in metrics.METRIC_NAMES)
    assert len(set(metrics.METRIC_NAMES)) == len(metrics.METRIC_NAMES)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_queries_name_only_exported_metrics(path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    allowed = operator_series() | set(EXTERNAL_SERIES)
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    used: set[str] = set()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: {expr!r} reads no metric"
        unknown = names - allowed
        assert not unknown, f"{where} queries {sorted(unknown)}, which nothing exports: {expr}"
        used |= names
    # The panels: jobs by phase, per-job epoch/loss/Dice, stage durations, reconcile rate/errors, GPU.
    for needed in (
        "nnunet_distill_jobs",
        "nnunet_distill_epoch",
        "nnunet_distill_train_loss",
        "nnunet_distill_kd_loss",
        "nnunet_distill_pseudo_dice",
        "nnunet_distill_stage_duration_seconds_bucket",
        "nnunet_distill_reconcile_total",
        "nnunet_distill_reconcile_errors_total",
        "DCGM_FI_DEV_GPU_UTIL",
    ):
        assert needed in used, f"the dashboard has no panel on {needed}"
    # Panels reference the templated data source, so the dashboard works with any Prometheus.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_gpu_panels_join_dcgm_with_stage_jobs_by_pod() -> None:
    dashboard = json.loads(DASHBOARD_FILES[0].read_text())
    gpu = [e for _, e in dashboard_queries(dashboard) if "DCGM_FI_" in e]
    assert gpu
    for expr in gpu:
        assert "on (namespace, pod)" in expr and "kube_pod_owner" in expr, expr


def test_dashboard_configmap(render) -> None:
    docs = render(
        {
            "dashboards": {
                "enabled": True,
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "nnU-Net"},
            }
        }
    )
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "nnU-Net"}
    for path in DASHBOARD_FILES:
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    # Client-side `kubectl apply` stores the object in an annotation limited to 256 KiB.
    assert sum(len(v) for v in cm["data"].values()) < 200_000
    assert by_kind(render({"dashboards": {"enabled": False}}), "ConfigMap") == []


def _endpoints(monitor: dict) -> list[dict]:
    return monitor["spec"].get("endpoints") or monitor["spec"].get("podMetricsEndpoints")


def test_service_and_pod_monitor_shape(render, all_on_values, podmonitor_values) -> None:
    for kind, values in (("ServiceMonitor", all_on_values), ("PodMonitor", podmonitor_values)):
        docs = render(values)
        deploy = one(docs, "Deployment")
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        monitor = one(docs, kind)
        assert not by_kind(docs, "PodMonitor" if kind == "ServiceMonitor" else "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # additionalLabels
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = _endpoints(monitor)
        assert endpoint["path"] == "/metrics" and endpoint["port"] == "metrics"
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
        assert endpoint["honorLabels"] is True and endpoint["relabelings"] and endpoint["metricRelabelings"]
        selector = spec["selector"]["matchLabels"]
        if kind == "ServiceMonitor":
            service = one(docs, "Service")
            assert selector.items() <= service["metadata"]["labels"].items()
            assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
            assert service["spec"]["selector"].items() <= pod_labels.items()
        else:
            assert selector.items() <= pod_labels.items()
        assert container_ports["metrics"] == 9100
        assert f"--metrics-port={container_ports['metrics']}" in container["args"]


@pytest.mark.parametrize("kind", ["serviceMonitor", "podMonitor"])
def test_default_monitors_keep_each_jobs_namespace_label(render, kind) -> None:
    """The operator exports per-job series labelled with the DistillationJob's namespace; the monitor must
    not let Prometheus overwrite it with the operator's own (honor_labels: false would)."""
    (monitor,) = [
        d for d in render({"metrics": {kind: {"enabled": True}}}) if d["kind"] == kind[0].upper() + kind[1:]
    ]
    (endpoint,) = _endpoints(monitor)
    overwrites_namespace = any(
        r.get("targetLabel") == "namespace" for r in endpoint.get("metricRelabelings", [])
    )
    assert endpoint["honorLabels"] is True and not overwrites_namespace


def test_service_and_pod_monitor_exclude_each_other(chart, helm) -> None:
    with pytest.raises(helm.HelmError, match="scraped twice"):
        chart.render(
            {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
            name="r",
            namespace="n",
        )


def test_rare_event_panels_count_over_the_whole_range() -> None:
    """Stages finish hours apart: a rate over a few minutes shows nothing most of the time, so the stage
    panels count with increase() over the dashboard's range, as instant queries."""
    dashboard = json.loads(DASHBOARD_FILES[0].read_text())
    stage_targets = [
        t
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if "nnunet_distill_stage_" in t["expr"] or "job_start_latency" in t["expr"]
    ]
    assert len(stage_targets) >= 4
    for t in stage_targets:
        assert "increase(" in t["expr"] and "[$__range]" in t["expr"] and "rate(" not in t["expr"], t["expr"]
        assert t.get("instant") is True, t["expr"]


def test_gpu_joins_match_names_exactly() -> None:
    """Long DistillationJob names give hashed Job names; no `$job-.*` pattern may stand in for the ownership
    join."""
    dashboard = json.loads(DASHBOARD_FILES[0].read_text())
    for _, expr in dashboard_queries(dashboard):
        assert "$job-" not in expr and "$job." not in expr, expr


def test_monitors_are_off_by_default_and_service_monitor_needs_the_service(render, chart, helm) -> None:
    docs = render({})
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    with pytest.raises(helm.HelmError, match="metrics.service.enabled"):
        chart.render(
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            name="r",
            namespace="n",
        )


def test_prometheus_rule_shape_and_queries(render, all_on_values) -> None:
    rule = one(render(all_on_values), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
    builtin = {
        "NnunetDistillJobStuckPending",
        "NnunetDistillJobFailed",
        "NnunetDistillAccuracyGateFailed",
        "NnunetDistillOperatorDown",
    }
    assert builtin <= set(alerts) and "NnunetDistillExtraRuleForTests" in alerts  # extraRules appended
    allowed = operator_series() | {"up"}
    for name in builtin:
        alert = alerts[name]
        unknown = metric_names(alert["expr"]) - allowed
        assert not unknown, (
            f"{name} queries {sorted(unknown)}, which the operator does not export: {alert['expr']}"
        )
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        if "for" in alert:
            assert DURATION.match(alert["for"]), alert["for"]
    assert 'job="nnunet-distill-operator"' in alerts["NnunetDistillOperatorDown"]["expr"]
    assert "0.97" in alerts["NnunetDistillAccuracyGateFailed"]["expr"]


def test_operator_down_alert_matches_the_scrape_job_label(render, all_on_values, podmonitor_values) -> None:
    """ServiceMonitor/PodMonitor use jobLabel app.kubernetes.io/name, so `up{job=...}` must use its value."""
    for kind, values in (("ServiceMonitor", all_on_values), ("PodMonitor", podmonitor_values)):
        docs = render(values)
        rule = one(docs, "PrometheusRule")
        expr = next(
            r["expr"]
            for r in rule["spec"]["groups"][0]["rules"]
            if r.get("alert") == "NnunetDistillOperatorDown"
        )
        monitor = one(docs, kind)
        label = monitor["spec"]["jobLabel"]
        source = (
            one(docs, "Service") if kind == "ServiceMonitor" else one(docs, "Deployment")["spec"]["template"]
        )
        assert f'job="{source["metadata"]["labels"][label]}"' in expr


def test_each_alert_can_be_switched_off(render) -> None:
    names = {
        "jobStuckPending": "NnunetDistillJobStuckPending",
        "jobFailed": "NnunetDistillJobFailed",
        "accuracyGateFailed": "NnunetDistillAccuracyGateFailed",
        "operatorDown": "NnunetDistillOperatorDown",
    }
    for key, alert in names.items():
        rule = one(
            render({"metrics": {"prometheusRule": {"enabled": True, "alerts": {key: {"enabled": False}}}}}),
            "PrometheusRule",
        )
        present = {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}
        assert alert not in present and len(present) == 3
