"""The generated CRD: committed copies are current, the schema is structural, examples validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from nnunet_distill_operator import api, crd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("distillationjob-*.yaml")) + [ROOT / "examples" / "demo.yaml"]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("target", crd.CRD_TARGETS)
def test_committed_crd_is_up_to_date(target: str) -> None:
    path = ROOT / target / crd.CRD_FILENAME
    assert path.is_file(), f"{path} missing: run `make crds`"
    assert path.read_text() == crd.crd_yaml(), f"{path} is out of date: run `make crds`"


def test_schema_is_structural() -> None:
    """What the API server requires of a CRD schema (apiextensions structural-schema rules)."""
    schema = crd.openapi_schema()
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "$defs" not in text
    for path, node in _walk(schema):
        if path in (".metadata",):
            continue
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
        else:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not isinstance(node.get("additionalProperties"), bool), path
        if "properties" in node and "additionalProperties" in node:
            pytest.fail(f"{path}: properties and additionalProperties are exclusive")
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        assert "title" not in node and "oneOf" not in node, path
        assert node.get("uniqueItems") is not True, f"{path}: uniqueItems is forbidden"


def test_every_field_is_described_for_kubectl_explain() -> None:
    schema = crd.openapi_schema()
    missing = [
        p
        for p, node in _walk(schema["properties"]["spec"], "spec")
        + _walk(schema["properties"]["status"], "status")
        if not node.get("description") and not p.endswith("[]") and not p.endswith("{}")
    ]
    assert missing == []


def test_defaults_are_valid_under_their_own_schema() -> None:
    import jsonschema

    for _path, node in _walk(crd.openapi_schema()):
        if "default" in node:
            sub = {k: v for k, v in node.items() if k != "default"}
            jsonschema.Draft4Validator(sub).validate(node["default"])  # raises with the path otherwise


def test_validation_ranges_from_the_issue() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    alpha = spec["distillation"]["properties"]["alpha"]
    temperature = spec["distillation"]["properties"]["temperature"]
    r = spec["student"]["properties"]["reductionFactor"]
    fold_items = spec["teachers"]["properties"]["folds"]["items"]
    assert (alpha["minimum"], alpha["maximum"], alpha["default"]) == (0, 1, 0.3)
    assert (temperature["minimum"], temperature["exclusiveMinimum"], temperature["default"]) == (0, True, 3.0)
    assert (r["minimum"], r["default"]) == (1, 2)
    assert fold_items["minimum"] == 0
    assert spec["distillation"]["properties"]["epochs"]["default"] == 1000


def test_names_printer_columns_and_status_subresource() -> None:
    doc = crd.build_crd()
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == "distillationjobs.distillation.nnunet.io"
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "DistillationJob",
        "distillationjobs",
        ["dj", "distill"],
    )
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Stage", "Epoch", "Dice", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for col in version["additionalPrinterColumns"]:
        parts = col["jsonPath"].lstrip(".").split(".")
        if parts[0] == "status":  # every column points at a field the schema keeps (not pruned)
            node: Any = {"properties": status}
            for p in parts[1:]:
                node = node["properties"][p]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == [
        "type"
    ]


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_crd_object_validates_against_kubernetes_schemas(version: str) -> None:
    kubernetes_validate.validate(crd.build_crd(), version, strict=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd_and_the_operator(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == api.KIND]
    assert docs, f"{path} has no DistillationJob"
    for doc in docs:
        assert crd.validate_object(doc) == []
        api.parse_spec(doc["spec"])


def test_status_written_by_the_operator_validates_against_the_schema() -> None:
    from datetime import UTC, datetime

    from nnunet_distill_operator.reconcile import decide
    from nnunet_distill_operator.trees import compact

    cr = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "x", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"dataset": {"id": 3}, "storage": {"claimName": "data"}},
    }
    decision = decide(cr, {}, {}, datetime.now(UTC))
    cr["status"] = compact(decision.status)  # as stored: nulls in a merge patch delete fields
    cr["status"]["progress"] = {
        "epoch": 3,
        "totalEpochs": 10,
        "trainLoss": -0.5,
        "pseudoDice": 0.8,
        "updatedAt": "2026-01-01T00:00:00Z",
        "stage": "distill",
    }
    assert crd.validate_object(cr) == []
