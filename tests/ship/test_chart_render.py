"""The Helm chart, rendered by Helm's own Go SDK: lint, Kubernetes schemas, and the security/operational
properties the issue asks for (Recreate, liveness, non-root, read-only root with writable /tmp, ...)."""

from __future__ import annotations

import pytest
import yaml

from tests.ship.conftest import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    by_kind,
    leaf_paths,
    load_strict,
    merged,
    one,
)

PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
WATCHED = ["ml-train", "ml-research"]


def values_variants(all_on: dict) -> dict[str, dict]:
    return {
        "defaults": {},
        "all-on": all_on,
        "watch-namespaces": {"watchNamespaces": WATCHED},
        "everything-off": {
            "rbac": {"create": False},
            "crds": {"install": False},
            "dashboards": {"enabled": False},
            "metrics": {"service": {"enabled": False}},
            "serviceAccount": {"create": False, "name": "existing-operator-sa"},
        },
    }


@pytest.fixture(scope="module", params=["defaults", "all-on", "watch-namespaces", "everything-off"])
def variant(request, render, all_on_values):
    values = values_variants(all_on_values)[request.param]
    return request.param, values, render(values)


def test_helm_lint_passes_with_defaults_and_all_toggles_on(helm, all_on_values) -> None:
    for values in ({}, all_on_values):
        for kube in KUBE_VERSIONS:
            report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{kube}.0")
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert report["errors"] == [] and problems == [], report


def test_all_on_values_switch_on_every_boolean_of_values_yaml(default_values, all_on_values) -> None:
    """The 'every toggle on' render is only as good as this file: derive the toggles from values.yaml (every
    boolean the schema declares; booleans inside pass-through objects such as securityContext are not
    toggles)."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    effective = dict(leaf_paths(merged(default_values, all_on_values)))
    toggles = []
    for path, _value in leaf_paths(default_values):
        node = schema
        for key in path:
            node = node.get("properties", {}).get(key, {})
        if node.get("type") == "boolean":
            toggles.append(path)
            if path == (
                "metrics",
                "podMonitor",
                "enabled",
            ):  # excludes the ServiceMonitor: ci/podmonitor-values
                assert (
                    effective[path] is False and effective[("metrics", "serviceMonitor", "enabled")] is True
                )
                continue
            assert effective[path] is True, f"ci/all-on-values.yaml must set {'.'.join(path)}: true"
    assert len(toggles) >= 10, toggles


def test_every_manifest_passes_kubernetes_validate_strict(variant) -> None:
    import kubernetes_validate

    name, _, docs = variant
    assert docs, f"{name}: nothing rendered"
    for doc in docs:
        if doc["kind"] in PROMETHEUS_OPERATOR_KINDS:
            continue  # no bundled schema; see test_monitoring.py for their structural checks
        for kube in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, kube, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {kube}: "
                    f"{exc.message} at {list(exc.path)}"
                )


def test_every_object_is_labelled_and_namespaced_where_it_must_be(variant) -> None:
    name, _, docs = variant
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for doc in docs:
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE, (name, doc["kind"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta, f"{doc['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace"), f"{name}: {doc['kind']} {meta['name']} has no namespace"
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{name}: an object is rendered twice"


def test_deployment_runs_one_recreated_hardened_operator(render) -> None:
    deploy = one(render({}), "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # A writable /tmp is the only writable path, and TMPDIR points there.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]
    # Liveness probes kopf's health endpoint on the port the operator is told to serve it on.
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert "--liveness-port=8080" in container["args"] and "--metrics-port=9100" in container["args"]
    assert "readinessProbe" not in container


def test_deployment_args_follow_watch_mode(render) -> None:
    args = one(render({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)
    args = one(render({"watchNamespaces": WATCHED}), "Deployment")["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={n}" for n in WATCHED]


def test_deployment_args_parse_with_the_operator_cli(render, all_on_values) -> None:
    """The chart may only pass flags the real operator CLI accepts (docs/contracts.md)."""
    from nnunet_distill_operator import cli

    for values in ({}, {"watchNamespaces": WATCHED}, all_on_values):
        container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        cli.build_operator_parser().parse_args(container["args"])


def test_image_references(render) -> None:
    container = one(render({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container["image"].endswith(f"nnunet-distill-operator:{app_version}")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NNUNET_DISTILL_TRAINER_IMAGE"].endswith(f"nnunet-distill-trainer:{app_version}")
    digest = "sha256:" + "a" * 64
    container = one(
        render({"image": {"digest": digest}, "trainer": {"image": {"digest": digest}}}), "Deployment"
    )["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("@" + digest)
    assert {e["name"]: e.get("value") for e in container["env"]}["NNUNET_DISTILL_TRAINER_IMAGE"].endswith(
        "@" + digest
    )


def test_crds_upgrade_with_the_chart_and_keep_policy_is_optional(render) -> None:
    crds = by_kind(render({}), "CustomResourceDefinition")
    assert crds, "CRDs must be templates (so helm upgrade upgrades them)"
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    unkept = by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert unkept and all(
        "helm.sh/resource-policy" not in c["metadata"].get("annotations", {}) for c in unkept
    )
    assert by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition") == []
    assert not (CHART / "crds").exists(), (
        "crds/ would install the CRD a second time, outside Helm's ownership"
    )


def test_rendered_crds_are_the_generated_files(render) -> None:
    """Templating must not change the schema (fromYaml/toYaml round trip: numbers, empty objects, order)."""
    files = {p.name: load_strict(p) for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    rendered = {c["metadata"]["name"]: c for c in by_kind(render({}), "CustomResourceDefinition")}
    assert sorted(rendered) == sorted(f["metadata"]["name"] for f in files.values())
    for crd in files.values():
        got = rendered[crd["metadata"]["name"]]
        assert got["spec"] == crd["spec"]
        assert got["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nnunet-distill"


def test_chart_crd_files_equal_the_repository_crds() -> None:
    """`make crds` writes both copies; a stale chart copy would ship an old schema."""
    repo_crds = {p.name: load_strict(p) for p in (CHART.parents[1] / "crds").glob("*.yaml")}
    chart_crds = {p.name: load_strict(p) for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert chart_crds, "charts/nnunet-distill-operator/files/crds/ is empty: run make crds"
    assert chart_crds == repo_crds


def test_values_schema_rejects_bad_values(chart, helm) -> None:
    bad = [
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"digest": "latest"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"watchNamespaces": ["ml", "ml"]},
        {"metrics": {"port": 0}},
        {"metrics": {"port": "9100"}},
        {"metrics": {"serviceMonitor": {"interval": "thirty seconds"}}},
        {"metrics": {"prometheusRule": {"alerts": {"jobFailed": {"severity": "page-everyone"}}}}},
        {"operator": {"logLevel": "chatty"}},
        {"operator": {"tmpSizeLimit": "lots"}},
        {"crds": {"keep": "yes"}},
        {"rbac": {"aggregateToDefaultRoles": 1}},
        {"trainer": {"namespaces": "ml"}},
        {"imagePullSecrets": ["regcred"]},
        {"metrics": {"serviceMonitor": {"additionalLabels": {"release": 1}}}},
        {"operator": {"securityContext": {"readOnlyRootFilesytem": True}}},  # typo inside a Kubernetes object
        {"operator": {"podSecurityContext": {"runAsUser": "root"}}},
        {"operator": {"resources": {"requests": {"cpu": "lots"}}}},
        {"watchNamespace": ["ml"]},  # typo of watchNamespaces: additionalProperties=false catches it
    ]
    for values in bad:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    chart.validate_schema({})


def test_values_schema_accepts_the_shipped_values(chart, default_values, all_on_values) -> None:
    chart.validate_schema(default_values)
    chart.validate_schema(all_on_values)


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        assert node["$ref"].startswith("#/definitions/"), node["$ref"]
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_values_schema_covers_every_value(default_values) -> None:
    """Walk values.yaml: each leaf must have a typed, described schema node, reached through objects that
    forbid unknown keys (so a typo anywhere fails at install time). Kubernetes objects (securityContext)
    use Kubernetes' own definitions, inlined from kubernetes-validate's strict schemas."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    for path, value in leaf_paths(default_values):
        node, where = schema, []
        for key in path:
            described = node.get("description")
            node = _resolve(schema, node)
            # Closed (false) or typed (a schema every extra key's value must match, e.g. resource quantities).
            assert node.get("additionalProperties", True) is not True, (
                f"{'.'.join(where) or '<root>'} accepts unknown keys"
            )
            assert key in node.get("properties", {}), (
                f"values.schema.json has no property for {'.'.join(path)}"
            )
            node = node["properties"][key]
            where.append(key)
        described = node.get("description")
        node = _resolve(schema, node)
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        assert kinds[type(value)] in types, f"{'.'.join(path)}: schema type {types} vs value {value!r}"
        assert described or node.get("description"), (
            f"{'.'.join(path)} has no description in values.schema.json"
        )


def test_notes_render(chart, all_on_values) -> None:
    for values in ({}, all_on_values):
        notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)[
            "nnunet-distill-operator/templates/NOTES.txt"
        ]
        assert "kubectl get dj" in notes and RELEASE in notes
