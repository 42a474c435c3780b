"""Unlabelled training cases (--unlabelled_cases): the pure rules that keep placeholders out of the teachers'
folds, the student's split and batch mask, and the flag's validation."""

from __future__ import annotations

import pytest
from nnunet_distill import contract, distill, unlabelled
from nnunet_distill.cli.train_flags import STANDARD, build_parser_standard, config_from_args
from nnunet_distill.config import ConfigError, DistillationConfig

SPLITS = [{"train": ["case_0000", "case_0001"], "val": ["case_0002"]}, {"train": ["case_0002"], "val": []}]
KEYS = ["case_0000", "case_0001", "case_0002", "unlabelled_0000", "unlabelled_0001"]


def test_cases_outside_every_fold_are_accepted():
    assert unlabelled.problems(["unlabelled_0000", "unlabelled_0001"], KEYS, SPLITS, "s.json") == []
    assert unlabelled.problems([], KEYS, [], "s.json") == []


def test_a_case_in_a_teacher_fold_or_missing_or_without_a_split_file_is_refused():
    (in_fold,) = unlabelled.problems(["case_0001"], KEYS, SPLITS, "s.json")
    assert in_fold.startswith(
        "--unlabelled_cases names case_0001, which fold 0 of s.json trains or validates"
    )
    val, train = unlabelled.problems(["case_0002"], KEYS, SPLITS, "s.json")  # fold 0 validates, 1 trains
    assert "fold 0" in val and "fold 1" in train
    (missing,) = unlabelled.problems(["unlabelled_0009"], KEYS, SPLITS, "s.json")
    assert "unlabelled_0009, not in the preprocessed dataset" in missing
    (no_split,) = unlabelled.problems(["unlabelled_0000"], KEYS, [], "s.json")
    assert "needs s.json listing the labelled cases only" in no_split


def test_split_and_batch_mask():
    assert unlabelled.training_split(["a", "b"], ["u", "a"]) == ["a", "b", "u"]
    assert unlabelled.labelled_samples(["u", "a", "u"], ["u"]) == [False, True, False]


def test_the_spec_and_cli_rules_are_one_set_of_pure_functions():
    assert contract.repeated(["a", "b", "a", "c", "b"]) == ["a", "b"] and contract.repeated(["a"]) == []
    assert contract.needs_kd(["u"], 0.0) and not contract.needs_kd(["u"], 0.3)
    assert not contract.needs_kd([], 0.0)  # no unlabelled cases: nothing to learn by KD alone
    assert contract.held_out(["u2", "u1", "x"], ["x", "u1"]) == ["u1", "x"]
    assert contract.held_out(["u1"], None) == []


def _config(**kwargs) -> DistillationConfig:
    return DistillationConfig(dataset="901", fold=0, reduction_factor=2, **kwargs)


def test_config_refuses_duplicates_no_kd_and_overlap_with_test_cases():
    assert _config(unlabelled_cases=("u1", "u2")).as_dict()["unlabelled_cases"] == ["u1", "u2"]
    with pytest.raises(ConfigError, match="lists a case twice: u1$"):
        _config(unlabelled_cases=("u1", "u1"))
    with pytest.raises(ConfigError, match=r"needs KD: with -a 0"):
        _config(alpha=0.0, unlabelled_cases=("u1",))
    with pytest.raises(ConfigError, match="--unlabelled_cases and --test_cases both name u1"):
        _config(unlabelled_cases=("u1",), test_cases=("u1", "t1"))


def build_config(argv: list[str]) -> DistillationConfig:
    return config_from_args(build_parser_standard().parse_args(argv), STANDARD)


def test_cli_flag_reaches_the_config_and_a_resume_with_other_cases_is_refused():
    cfg = build_config(["-d", "901", "-f", "0", "-r", "2", "--unlabelled_cases", "u1", "u2"])
    assert cfg.unlabelled_cases == ("u1", "u2")
    assert build_config(["-d", "901", "-f", "0", "-r", "2"]).unlabelled_cases == ()
    saved = {"unlabelled_cases": ["u1", "u2"]}
    assert distill.resume_mismatches(saved, {"unlabelled_cases": ["u1", "u2"]}) == []
    assert distill.resume_mismatches(saved, {"unlabelled_cases": []}) == [
        "unlabelled_cases ['u1', 'u2'] (this run: --unlabelled_cases [])"
    ]


def test_labelled_share_weighs_the_uniform_draw_closely_and_evenly():
    labelled = ["case_0000", "case_0001", "case_0002", "case_0003"]
    cases = [f"unlabelled_{i:04d}" for i in range(16)]
    assert sum(unlabelled.labelled_samples(labelled + cases, cases)) / 20 == 0.2  # nnU-Net's uniform draw
    for share in (0.5, 0.3, 0.9, 0.1, 0.2, 0.33, 0.05, 0.97):
        keys = unlabelled.weighted_identifiers(labelled + cases, cases, share)
        drawn = unlabelled.labelled_samples(keys, cases)
        assert abs(sum(drawn) / len(keys) - share) <= unlabelled.SHARE_TOLERANCE, share
        assert len({keys.count(k) for k in labelled}) == 1 and len({keys.count(k) for k in cases}) == 1
        assert set(keys) == set(labelled + cases)  # neither kind is ever dropped
    assert unlabelled.weighted_identifiers(labelled + cases, cases, 0.5).count("case_0000") == 4
    # a DDP shard may hold one kind only: nothing to weigh
    assert unlabelled.weighted_identifiers(labelled, cases, 0.5) == labelled
    assert unlabelled.weighted_identifiers(cases[:3], cases, 0.5) == cases[:3]


def test_labelled_share_of_a_large_dataset_stays_a_short_list():
    labelled = [f"case_{i:04d}" for i in range(100)]
    cases = [f"unlabelled_{i:05d}" for i in range(10000)]
    keys = unlabelled.weighted_identifiers(labelled + cases, cases, 0.37)
    share = sum(unlabelled.labelled_samples(keys, cases)) / len(keys)
    assert abs(share - 0.37) <= unlabelled.SHARE_TOLERANCE and len(keys) < 20 * len(labelled + cases)
    tiny = unlabelled.weighted_identifiers(labelled[:1] + cases[:1], cases, 0.001)
    assert tiny.count("case_0000") == 1 and tiny.count("unlabelled_00000") == 999
    # a share the bounded repeats cannot reach keeps both kinds, as close as they get
    extreme = unlabelled.weighted_identifiers(labelled + cases[:1], cases, 1e-5)
    assert extreme.count("unlabelled_00000") == unlabelled.MAX_REPEATS and extreme.count("case_0000") == 1


def test_labelled_share_is_a_probability_beside_unlabelled_cases():
    assert contract.labelled_share_problem(None, []) is None
    assert contract.labelled_share_problem(0.5, ["u"]) is None
    for bad in (0.0, 1.0, 1.5, -0.1):
        assert contract.labelled_share_problem(bad, ["u"]) == f"must be in (0, 1), got {bad}"
    assert "needs unlabelled cases" in contract.labelled_share_problem(0.5, [])
    assert _config(unlabelled_cases=("u1",), labelled_share=0.5).as_dict()["labelled_share"] == 0.5
    with pytest.raises(ConfigError, match=r"^--labelled_share needs unlabelled cases"):
        _config(labelled_share=0.5)
    with pytest.raises(ConfigError, match=r"^--labelled_share must be in \(0, 1\), got 1.0$"):
        _config(unlabelled_cases=("u1",), labelled_share=1.0)


def test_labelled_share_flag_reaches_the_config_and_a_resume_with_another_share_is_refused(capsys):
    base = ["-d", "901", "-f", "0", "-r", "2", "--unlabelled_cases", "u1"]
    assert build_config(base).labelled_share is None
    assert build_config([*base, "--labelled_share", "0.4"]).labelled_share == 0.4
    with pytest.raises(SystemExit):
        build_parser_standard().parse_args([*base, "--labelled_share", "half"])
    assert "--labelled_share: not a number: 'half'" in capsys.readouterr().err
    assert distill.resume_mismatches({"labelled_share": 0.5}, {"labelled_share": None}) == [
        "labelled_share 0.5 (this run: --labelled_share None)"
    ]
