"""Generate the DistillationJob CustomResourceDefinition from the pydantic models in `api.py`.

Kubernetes only accepts *structural* schemas: no `$ref`, types on every node, `anyOf` only in the
int-or-string form, no `additionalProperties: false`, boolean `exclusiveMinimum`. Pydantic emits JSON
Schema 2020-12, so this module rewrites it rather than hand-maintaining a second schema that would drift.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from nnunet_distill_operator import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
CRD_FILENAME = f"{CRD_NAME}.yaml"
# Where `nnunet-distill crds --write` puts the CRD (see docs/contracts.md): the repo's crds/ and the
# chart's files/ (the chart installs it from a template so that helm upgrade upgrades it).
CRD_TARGETS = ("crds", "charts/nnunet-distill-operator/files/crds")

PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Job phase."},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "Current stage."},
    {
        "name": "Epoch",
        "type": "integer",
        "jsonPath": ".status.progress.epoch",
        "description": "Epochs completed in the current training stage.",
    },
    {
        "name": "Dice",
        "type": "number",
        "jsonPath": ".status.progress.pseudoDice",
        "description": "Latest pseudo Dice of the current training stage.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "priority": 1,
        "description": "Why the job failed or stalled.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)

_DROP = {"title", "examples"}


def kubernetes_type_schema(model: str) -> dict[str, Any]:
    """The OpenAPI schema of a Kubernetes type (`V1Affinity`), from the kubernetes client's models, which are
    generated from the Kubernetes OpenAPI document: embedded in the CRD, as controller-gen embeds the Go
    types, so the API server itself refuses malformed affinity terms."""
    from kubernetes import client

    raw = getattr(client, model).model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})

    def clean(node: Any) -> Any:
        if isinstance(node, list):
            return [clean(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: clean(v) for k, v in node.items()}
        if isinstance(out.get("description"), str):  # the generator appends its own attribute docs
            out["description"] = out["description"].split("\n\nAttributes:")[0].strip()
        return out

    return _structural(clean(raw), {k: clean(v) for k, v in defs.items()})


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one pydantic JSON-schema node into a Kubernetes structural-schema node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "x-k8s-schema" in node:
        embedded = kubernetes_type_schema(node.pop("x-k8s-schema"))
        node.pop("anyOf", None)
        node.pop("default", None)
        return {**embedded, **{k: v for k, v in node.items() if k in ("description",)}}
    out: dict[str, Any] = {}
    for key, value in _resolved(node, defs).items():
        if key not in _DROP:
            _rewrite(out, key, value, defs)
    if "properties" in out or out.get("additionalProperties") is not None:
        out.setdefault("type", "object")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    # type and description first: the YAML is read by people (and diffed in reviews).
    head = {k: out.pop(k) for k in ("type", "description") if k in out}
    return {**head, **out}


def _resolved(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The node with its $ref inlined and an optional (anyOf with null) collapsed to its one option."""
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Field-level keys (description, default) win over the referenced model's.
        node = {**target, **node}
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']!r} in a structural schema")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        option = options[0]
        if "$ref" in option:
            option = _structural(option, defs)
        node = {**option, **outer}
        if node.get("default", 0) is None:
            del node["default"]
    return node


def _rewrite(out: dict[str, Any], key: str, value: Any, defs: dict[str, Any]) -> None:
    """One keyword of a JSON-schema node in structural-schema terms (some have none: left out)."""
    if key == "properties":
        out[key] = {k: _structural(v, defs) for k, v in value.items()}
    elif key in ("items", "additionalProperties"):
        # false is forbidden in structural schemas (strict field validation rejects unknown fields instead);
        # true is expressed as x-kubernetes-preserve-unknown-fields.
        if not isinstance(value, bool):
            out[key] = _structural(value, defs)
    elif key == "anyOf":
        out[key] = [{k: v for k, v in o.items() if k not in _DROP} for o in value]
    elif key in ("exclusiveMinimum", "exclusiveMaximum"):
        out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
        out[key] = True
    elif key == "const":
        out["enum"] = [value]
    elif not (key == "default" and isinstance(value, (dict, list))):
        # object defaults come from the nested fields; the operator fills them in anyway
        out[key] = value


def _model_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def spec_schema() -> dict[str, Any]:
    return _model_schema(api.DistillationJobSpec)


def status_schema() -> dict[str, Any]:
    schema = _model_schema(api.DistillationJobStatus)
    # Required-ness of condition fields is the API's (metav1.Condition) and the operator's concern; an
    # unknown field in status from a newer trainer is pruned by the API server, never rejected.
    return schema


def openapi_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A DistillationJob distills an nnU-Net teacher ensemble into one small student, "
        "exports it to ONNX and publishes it.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "distillation.nnunet.io/v1alpha1"},
            "kind": {"type": "string", "description": "DistillationJob"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "nnunet-distill-operator",
                "app.kubernetes.io/part-of": "nnunet-distill",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `nnunet-distill crds --write` from nnunet_distill_operator/api.py. Do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def write(root: str | Path = ".") -> list[Path]:
    """Write the CRD to every target under `root`; returns the files written."""
    text = crd_yaml()
    written = []
    for target in CRD_TARGETS:
        path = Path(root) / target / CRD_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def strict_schema(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema as the API server applies it with strict field validation (kubectl's default):
    unknown fields are errors. Used to validate CRs offline (tests, CI, the chart's examples)."""
    schema = copy.deepcopy(schema if schema is not None else openapi_schema())

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
                and node is not schema["properties"].get("metadata")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Errors the API server's schema validation would report for a DistillationJob, as 'path: message'.

    OpenAPI v3 in Kubernetes is JSON-Schema draft 4 (boolean exclusiveMinimum), hence Draft4Validator.
    jsonschema is a dev dependency: the operator itself never needs this function.
    """
    import jsonschema

    validator = jsonschema.Draft4Validator(strict_schema())
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".")
        message = err.message
        if err.validator == "additionalProperties":
            unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            path = ".".join(filter(None, [path, unknown[0] if unknown else ""]))
            message = f"unknown field {', '.join(map(repr, unknown))}"
        errors.append(f"{path or '<root>'}: {message}")
    return errors
