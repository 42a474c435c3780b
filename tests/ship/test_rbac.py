"""The chart's RBAC grants exactly the API calls the operator makes: the list lives in
nnunet_distill_operator.rbac (tests/operator records the calls the running operator makes and compares them
with the rendered chart both ways); here the rendered Roles/ClusterRoles are compared with it both ways, in
both watch modes. Trainer pods get no chart-made identity: the operator creates one per DistillationJob."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.ship.conftest import NAMESPACE, by_kind

WATCHED = ["ml-train", "ml-research"]

Grant = tuple[str, str, str]  # (group, resource, verb)


def grants(rules) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def expected(rules, namespaced: bool | None = None) -> set[Grant]:
    return {
        (r.group, r.resource, v)
        for r in rules
        for v in r.verbs
        if namespaced is None or r.namespaced == namespaced
    }


def bound_grants(docs: list[dict], service_account: str, sa_namespace: str) -> dict[str | None, set[Grant]]:
    """What a ServiceAccount may do, per namespace (None = cluster-wide), following the bindings."""
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in by_kind(docs, "Role") + by_kind(docs, "ClusterRole")
    }
    result: dict[str | None, set[Grant]] = defaultdict(set)
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account and s["namespace"] == sa_namespace
            for s in subjects
        ):
            continue
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace")
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        result[ns if binding["kind"] == "RoleBinding" else None] |= grants(role["rules"])
    return dict(result)


def operator_sa(docs) -> str:
    deploy = by_kind(docs, "Deployment")[0]
    return deploy["spec"]["template"]["spec"]["serviceAccountName"]


def test_cluster_wide_mode_grants_exactly_the_operators_calls(render) -> None:
    from nnunet_distill_operator import rbac

    docs = render({})
    got = bound_grants(docs, operator_sa(docs), NAMESPACE)
    assert set(got) == {None}, f"cluster-wide mode should bind cluster-wide only, got {sorted(got, key=str)}"
    assert got[None] == expected(rbac.OPERATOR_RULES), (
        f"missing: {sorted(expected(rbac.OPERATOR_RULES) - got[None])}; "
        f"extra: {sorted(got[None] - expected(rbac.OPERATOR_RULES))}"
    )


def test_watch_namespaces_mode_grants_namespaced_calls_only_in_watched_namespaces(render) -> None:
    from nnunet_distill_operator import rbac

    docs = render({"watchNamespaces": WATCHED})
    got = bound_grants(docs, operator_sa(docs), NAMESPACE)
    # Nothing cluster-wide: with exact namespace names kopf does not scan for the CRD (operator_settings).
    assert set(got) == set(WATCHED), sorted(got, key=str)
    for ns in WATCHED:
        assert got[ns] == expected(rbac.OPERATOR_RULES, namespaced=True), ns
    assert not by_kind(docs, "ClusterRoleBinding") or all(
        b["roleRef"]["name"].endswith(("-editor", "-viewer")) for b in by_kind(docs, "ClusterRoleBinding")
    )


@pytest.mark.parametrize(
    "values", [{}, {"watchNamespaces": WATCHED}], ids=["cluster-wide", "watch-namespaces"]
)
def test_the_operator_holds_what_it_grants_each_jobs_trainer_and_the_chart_makes_no_trainer_identity(
    render, values
) -> None:
    """Kubernetes lets the operator create each job's trainer Role only with permissions it holds itself."""
    from nnunet_distill_operator import api, k8s, rbac

    docs = render(values)
    assert not [d for d in by_kind(docs, "ServiceAccount") if "trainer" in d["metadata"]["name"]]
    assert not [d for d in by_kind(docs, "Role") if "trainer" in d["metadata"]["name"]]
    spec = api.parse_spec({"dataset": {"id": 1}, "storage": {"claimName": "data"}})
    role = k8s.trainer_identity(k8s.Owner("liver", "ml-train", "uid"), spec)[1]
    role_grants = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert role_grants == expected(rbac.TRAINER_RULES)
    assert role["rules"][0]["resourceNames"] == ["liver"]
    for scope, granted in bound_grants(docs, operator_sa(docs), NAMESPACE).items():
        if scope is not None or not values:
            assert role_grants <= granted, scope
        assert (
            {
                ("", "serviceaccounts", "create"),
                ("rbac.authorization.k8s.io", "roles", "create"),
                ("rbac.authorization.k8s.io", "rolebindings", "create"),
            }
            <= granted
            or scope is None
            and values
        )


def test_peering_is_not_granted_because_the_chart_runs_one_standalone_operator(render) -> None:
    from nnunet_distill_operator import rbac

    docs = render({})
    everything = set().union(*bound_grants(docs, operator_sa(docs), NAMESPACE).values())
    assert not everything & expected(rbac.PEERING_RULES)
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args, "without peering RBAC the operator must run with --standalone"


def test_user_roles_aggregate_into_admin_edit_view(render) -> None:
    from nnunet_distill_operator import api

    docs = render({})
    by_label = {}
    for role in by_kind(docs, "ClusterRole"):
        for label in ("aggregate-to-admin", "aggregate-to-edit", "aggregate-to-view"):
            if role["metadata"]["labels"].get(f"rbac.authorization.k8s.io/{label}") == "true":
                by_label[label] = grants(role["rules"])
    write = {"create", "update", "patch", "delete", "deletecollection"}
    assert {(api.GROUP, api.PLURAL, v) for v in write} <= by_label["aggregate-to-edit"]
    assert by_label["aggregate-to-admin"] == by_label["aggregate-to-edit"]
    assert by_label["aggregate-to-view"] == {
        (api.GROUP, r, v) for r in (api.PLURAL, f"{api.PLURAL}/status") for v in ("get", "list", "watch")
    }
    # Users never write status: that is the operator's and the trainer's.
    for label, granted in by_label.items():
        assert not {(g, r, v) for g, r, v in granted if r.endswith("/status") and v in write}, label
    assert by_kind(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole") != []
    assert not [
        r
        for r in by_kind(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole")
        if "rbac.authorization.k8s.io/aggregate-to-view" in r["metadata"]["labels"]
    ]


def test_rbac_create_false_renders_no_rbac(render) -> None:
    docs = render({"rbac": {"create": False}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]
