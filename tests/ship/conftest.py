"""Shared helpers for the shipping tests: the real chart rendered by the Helm SDK, parsed strictly.

Everything here runs offline and in milliseconds (Helm's Go SDK through helm-python-sdk, kubernetes-validate's
bundled schemas), so the whole tests/ship suite stays far below a minute.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "nnunet-distill-operator"
ALL_ON_VALUES_FILE = CHART / "ci" / "all-on-values.yaml"
PODMONITOR_VALUES_FILE = CHART / "ci" / "podmonitor-values.yaml"
# The chart declares kubeVersion >=1.27; validate against its floor, a mid version and a recent one.
KUBE_VERSIONS = ("1.27", "1.30", "1.34")
RELEASE = "distill"
NAMESPACE = "nnunet-system"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, which PyYAML would silently collapse (the API server
    and Helm's own parser do not agree on which one wins)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_all_strict(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc]


def load_strict(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_StrictLoader)


def leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) whose value is not a non-empty mapping: what a user can set."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaf_paths(value, prefix + (str(key),))
    else:
        yield prefix, tree


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def helm():
    import helm_python

    return helm_python


@pytest.fixture(scope="session")
def chart(helm):
    loaded = helm.Chart.load(str(CHART))
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def all_on_values() -> dict:
    return load_strict(ALL_ON_VALUES_FILE)


@pytest.fixture(scope="session")
def podmonitor_values() -> dict:
    return load_strict(PODMONITOR_VALUES_FILE)


@pytest.fixture(scope="session")
def default_values() -> dict:
    return load_strict(CHART / "values.yaml")


@pytest.fixture(scope="session")
def render(chart):
    """render(values) -> list of manifests (dicts), every template's output parsed strictly."""

    def _render(values: dict | None = None, namespace: str = NAMESPACE) -> list[dict]:
        files = chart.render(values or {}, name=RELEASE, namespace=namespace)
        docs: list[dict] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            try:
                docs.extend(load_all_strict(text))
            except yaml.YAMLError as exc:  # name the template, not only the line inside it
                raise AssertionError(f"{path} renders invalid YAML: {exc}") from exc
        return docs

    return _render


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
