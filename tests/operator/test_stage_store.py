"""The operator's store of stage Jobs and pods (stage_store.py), and the startup LIST's scope."""

from __future__ import annotations

from typing import Any

from nnunet_distill_operator import k8s
from nnunet_distill_operator.operator_state import kept_job
from nnunet_distill_operator.stage_store import (
    StageStore,
    has_patterns,
    listing_namespaces,
    matching_namespaces,
)


def stage_object(
    name: str, owner: str | None, stage: str | None, uid: str, namespace: str = "default", **extra: Any
) -> dict[str, Any]:
    labels = {k8s.LABEL_JOB: owner or "x"}
    if stage is not None:
        labels[k8s.LABEL_STAGE] = stage
    annotations = {k8s.ANNOTATION_JOB_NAME: owner} if owner else {}
    meta = {"name": name, "namespace": namespace, "uid": uid, "labels": labels, "annotations": annotations}
    return {"metadata": meta, **extra}


def test_objects_are_kept_by_owner_and_stage_and_dropped_on_deletion() -> None:
    store = StageStore(keep=kept_job)
    template = {"spec": {"serviceAccountName": "trainer", "containers": [{"name": "main", "image": "i"}]}}
    store.put(stage_object("liver-distill", "liver", "distill", "u1", spec={"template": template}))
    store.put(stage_object("liver-export", "liver", "export", "u2"))
    store.put(stage_object("lung-distill", "lung", "distill", "u3"))
    store.put(stage_object("other", None, "distill", "u4"))  # not ours: no owner annotation
    store.put(stage_object("nostage", "liver", None, "u5"))  # no stage label
    liver = store.by_stage("default", "liver")
    assert sorted(liver) == ["distill", "export"]
    assert liver["distill"][0]["spec"]["template"] == {"spec": {"serviceAccountName": "trainer"}}  # kept_job
    assert store.by_stage("other-namespace", "liver") == {}
    store.drop(stage_object("liver-distill", "liver", "distill", "u1"))
    assert sorted(store.by_stage("default", "liver")) == ["export"]
    # A newer object of the same stage (another uid) comes last.
    store.put(stage_object("liver-export", "liver", "export", "u6", status={"active": 1}))
    assert [b["metadata"]["uid"] for b in store.by_stage("default", "liver")["export"]] == ["u2", "u6"]


def test_what_the_startup_list_put_goes_unless_a_watch_event_confirmed_it() -> None:
    store = StageStore()
    store.put(stage_object("a-distill", "a", "distill", "u1"), provisional=True)
    store.put(stage_object("b-distill", "b", "distill", "u2"), provisional=True)
    store.put(
        stage_object("b-distill", "b", "distill", "u2", status={"active": 1})
    )  # kopf's listing: confirmed
    assert store.drop_unconfirmed() == 1  # a-distill was deleted before kopf listed it
    assert store.by_stage("default", "a") == {}
    assert store.by_stage("default", "b")["distill"][0]["status"] == {"active": 1}
    assert store.drop_unconfirmed() == 0


def test_kopf_namespace_patterns_select_namespaces() -> None:
    names = ["ml", "ml-dev", "ml-prod", "kube-system", "default"]
    assert matching_namespaces(["ml-*"], names) == ["ml-dev", "ml-prod"]
    assert matching_namespaces(["ml*", "!ml-prod"], names) == ["ml", "ml-dev"]
    assert matching_namespaces(["!kube-*"], names) == ["ml", "ml-dev", "ml-prod", "default"]
    assert matching_namespaces(["default,ml"], names) == ["ml", "default"]
    assert has_patterns(["ml-*"]) and has_patterns(["!x"]) and has_patterns(["a,b"])
    assert not has_patterns(["ml", "default"])


def test_exact_namespaces_and_the_cluster_need_no_namespace_list() -> None:
    def no_request(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("exact names need no API call")

    assert listing_namespaces(no_request, ()) == [None]  # cluster-wide: one LIST of every namespace
    assert listing_namespaces(no_request, ("ml", "default", "ml")) == ["ml", "default"]
