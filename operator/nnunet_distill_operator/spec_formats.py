"""The value formats of a DistillationJob spec: Kubernetes names, quantities, label keys, object-store URIs,
and the base of every spec model (camelCase on the wire, strict types, unknown fields refused).

The API server checks these patterns too (they go into the CRD's schema); the operator checks them with the
same models, so a spec that reaches it never fails later in a pod.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_.-]*$"  # nnU-Net plans / trainer / planner class names
# A *positive* Kubernetes quantity: no sign, and not zero (a zero or negative CPU, memory or /dev/shm size
# is never what a training pod needs; the API server would accept some of them and the pod would fail).
QUANTITY = (
    r"^(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?[0-9]+))?$"
)
QUANTITY_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}
# Label keys (qualified names: optional DNS-subdomain prefix and '/', then a name) and label values.
LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
LABEL_VALUE = rf"^({LABEL_NAME})?$"
# Object-storage destinations the publish stage understands; buckets need a name, file:// an absolute path.
# No query string or fragment: signed URLs and SAS tokens are credentials and belong in the Secret.
OUTPUT_URI = r"^((s3|gs|az)://[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9](/[^\s?#]*)?|file:///[^\s?#]*)$"
# Bucket / container naming rules per scheme, stated (never the offending value, which may be a secret typed
# into the wrong field) when a name breaks them.
BUCKET_RULES: dict[str, tuple[str, str]] = {
    "s3": (
        r"^(?!xn--)(?!.*-s3alias$)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        (
            "an S3 bucket name has 3-63 characters: lower-case letters, digits, '.' and '-', starting and "
            "ending with a letter or digit, and is not an IP address"
        ),
    ),
    "gs": (
        (
            r"^(?!goog)(?!.*google)(?!\d+\.\d+\.\d+\.\d+$)(?=.{3,222}$)[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?"
            r"(\.[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?)*$"
        ),
        (
            "a GCS bucket name has 3-63 characters (222 with dots, at most 63 between dots): lower-case "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit, not starting "
            "with 'goog', not containing 'google', and not an IP address"
        ),
    ),
    "az": (
        r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
        (
            "an Azure container name has 3-63 characters: lower-case letters, digits and single '-', "
            "starting and ending with a letter or digit"
        ),
    ),
}
SUB_PATH = r"^[^/\s](.*[^/\s])?$"


def _quantity(value: Any) -> Any:
    """Kubernetes quantities may be written as YAML numbers (`cpu: 4`); keep them as strings."""
    if isinstance(value, bool):  # pydantic reports ValueErrors (not TypeErrors) as validation errors
        raise ValueError("must be a Kubernetes quantity such as 4, 500m or 16Gi, not a boolean")  # noqa: TRY004
    if isinstance(value, (int, float)):
        value = str(value)
    if isinstance(value, str) and not re.match(QUANTITY, value):
        raise ValueError(
            f"{value!r} is not a positive Kubernetes quantity (examples: 4, 500m, 16Gi; no sign, not zero)"
        )
    return value


def quantity_value(quantity: str) -> float:
    """A (valid) quantity as a number: '16Gi' -> 17179869184.0, '500m' -> 0.5."""
    m = re.match(r"^([0-9.]+)([eE][+-]?[0-9]+)?([A-Za-z]*)$", quantity)
    if m is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number = float(m.group(1) + (m.group(2) or ""))
    return number * QUANTITY_SUFFIXES.get(m.group(3), 1)


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
        }
    ),
]


class SpecModel(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python; unknown fields and
    JSON-type mismatches ("yes" for a boolean) are errors, as for the API server."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)
