"""examples/: every DistillationJob validates against the generated CRD schema (as the API server would, with
strict field validation) and the operator's own models; the Argo CD / Flux manifests point at things that
exist, and the chart values they carry pass the chart's values.schema.json."""

from __future__ import annotations

import pytest

from tests.ship.conftest import CHART, REPO, load_all_strict, load_strict

EXAMPLES = REPO / "examples"


def example_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(EXAMPLES.glob("*.yaml")) for doc in load_all_strict(p.read_text())]


def distillation_jobs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in example_docs() if doc.get("kind") == "DistillationJob"]


def test_there_is_a_minimal_and_a_full_example() -> None:
    names = {name for name, _ in distillation_jobs()}
    assert {"distillationjob-minimal.yaml", "distillationjob-full.yaml"} <= names


@pytest.mark.parametrize("name,job", distillation_jobs(), ids=[n for n, _ in distillation_jobs()])
def test_example_distillationjob_is_valid(name: str, job: dict) -> None:
    from nnunet_distill_operator import api, crd

    assert job["apiVersion"] == api.API_VERSION
    generated = load_strict(REPO / "crds" / crd.CRD_FILENAME)
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema == crd.openapi_schema(), "crds/ is stale: run make crds"
    assert crd.validate_object(job) == [], name
    api.parse_spec(job["spec"])  # cross-field rules the CRD schema cannot express


def test_full_example_sets_every_top_level_spec_field() -> None:
    from nnunet_distill_operator import api

    full = dict(distillation_jobs())["distillationjob-full.yaml"]
    fields = {f.alias or name for name, f in api.DistillationJobSpec.model_fields.items()}
    # image/imagePullSecrets/serviceAccountName default to the operator's (chart) settings; the example
    # leaves them out on purpose so that it runs with any installation.
    missing = fields - set(full["spec"]) - {"image", "imagePullSecrets", "serviceAccountName"}
    assert not missing, f"distillationjob-full.yaml does not show {sorted(missing)}"


def test_the_crd_rejects_a_broken_example() -> None:
    """The validation above can fail: a typo and a bad value are reported with their paths."""
    from nnunet_distill_operator import crd

    job = dict(distillation_jobs())["distillationjob-minimal.yaml"]
    broken = {**job, "spec": {**job["spec"], "dataset": {"id": 0}, "studnet": {}}}
    errors = crd.validate_object(broken)
    assert any(e.startswith("spec.dataset.id") for e in errors), errors
    assert any("studnet" in e for e in errors), errors


def test_gitops_folder_lists_exactly_the_distillationjob_examples() -> None:
    """Argo CD and Flux apply examples/kustomization.yaml: the distillationjob-*.yaml examples, not the local
    demo job (its synthetic dataset exists only on the demo machine) nor the GitOps manifests themselves."""
    kustomization = load_strict(EXAMPLES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in EXAMPLES.glob("distillationjob-*.yaml")
    )


def test_argocd_applications(chart) -> None:
    apps = [d for d in load_all_strict((EXAMPLES / "argocd-application.yaml").read_text())]
    assert {a["kind"] for a in apps} == {"Application"} and len(apps) == 2
    for app in apps:
        assert app["apiVersion"] == "argoproj.io/v1alpha1"
        spec = app["spec"]
        assert spec["project"] and spec["destination"]["namespace"] and spec["destination"]["server"]
        path = REPO / spec["source"]["path"]
        assert path.is_dir(), (
            f"{app['metadata']['name']}: source.path {spec['source']['path']} does not exist"
        )
        if "helm" in spec["source"]:
            assert path == CHART
            chart.validate_schema(spec["source"]["helm"]["valuesObject"])
            assert "ServerSideApply=true" in spec["syncPolicy"]["syncOptions"]
        else:
            assert (path / "kustomization.yaml").is_file()
            assert "SkipDryRunOnMissingResource=true" in spec["syncPolicy"]["syncOptions"]


def test_flux_manifests(chart) -> None:
    from nnunet_distill_operator import api

    release_docs = load_all_strict((EXAMPLES / "flux-helmrelease.yaml").read_text())
    repo = next(d for d in release_docs if d["kind"] == "GitRepository")
    release = next(d for d in release_docs if d["kind"] == "HelmRelease")
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    source = release["spec"]["chart"]["spec"]
    assert source["sourceRef"] == {
        "kind": "GitRepository",
        "name": repo["metadata"]["name"],
        "namespace": repo["metadata"]["namespace"],
    }
    assert (REPO / source["chart"]).resolve() == CHART
    chart.validate_schema(release["spec"]["values"])

    (kustomization,) = load_all_strict((EXAMPLES / "flux-kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    spec = kustomization["spec"]
    assert spec["sourceRef"]["name"] == repo["metadata"]["name"]
    assert (REPO / spec["path"]).resolve() == EXAMPLES
    job_names = {job["metadata"]["name"] for _, job in distillation_jobs()}
    for check in spec["healthChecks"]:
        assert check["apiVersion"] == api.API_VERSION and check["kind"] == api.KIND
        assert check["name"] in job_names and check["namespace"] == spec["targetNamespace"]


def test_chart_artifacthub_crd_example_is_the_minimal_example() -> None:
    import yaml

    annotations = load_strict(CHART / "Chart.yaml")["annotations"]
    (example,) = yaml.safe_load(annotations["artifacthub.io/crdsExamples"])
    assert example == dict(distillation_jobs())["distillationjob-minimal.yaml"]
    (crd_entry,) = yaml.safe_load(annotations["artifacthub.io/crds"])
    from nnunet_distill_operator import api, crd

    assert (
        crd_entry["name"] == crd.CRD_NAME
        and crd_entry["version"] == api.VERSION
        and crd_entry["kind"] == api.KIND
    )
