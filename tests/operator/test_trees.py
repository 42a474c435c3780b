"""JSON-tree helpers (trees.py): a copy shares nothing, so stage Jobs print without YAML aliases."""

from __future__ import annotations

import yaml
from nnunet_distill_operator import k8s, plan, trees
from nnunet_distill_operator.api import parse_spec


def test_copy_tree_shares_nothing_and_unshares_repeated_subtrees() -> None:
    env = [{"name": "A", "value": "1"}]
    tree = {"containers": [{"env": env}, {"env": env}], "n": 3, "s": "x", "none": None}
    out = trees.copy_tree(tree)
    assert out == tree
    assert out["containers"][0]["env"] is not env
    assert out["containers"][0]["env"] is not out["containers"][1]["env"]  # deepcopy would keep them shared
    out["containers"][0]["env"][0]["value"] = "2"
    assert env[0]["value"] == "1" and out["containers"][1]["env"][0]["value"] == "1"


def test_compact_drops_nones_at_every_depth() -> None:
    assert trees.compact({"a": None, "b": {"c": None, "d": [{"e": None, "f": 0}]}, "g": ""}) == {
        "b": {"d": [{"f": 0}]},
        "g": "",
    }


def test_stage_jobs_print_without_yaml_aliases() -> None:
    spec = parse_spec(
        {
            "dataset": {"id": 27},
            "storage": {"claimName": "nnunet-data"},
            "resources": {"distill": {"gpus": 2}},
        }
    )
    owner = k8s.Owner("liver", "default", "uid-1")
    paths = plan.DataPaths.in_pod("liver")
    docs = [
        k8s.job_for(s, owner=owner, spec=spec, paths=paths)
        for s in plan.plan(spec, name="liver", paths=paths)
    ]
    text = yaml.safe_dump_all(docs, sort_keys=False)
    assert "&id" not in text and "*id" not in text
    assert len(docs) >= 2
