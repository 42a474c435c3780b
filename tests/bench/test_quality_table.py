"""`bench quality`'s verdicts, from summaries shaped like the distill stage's: the table is pure, so the goal
checks are tested here without training anything (the bench itself trains for real)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.bench_quality import Report, Row, Run, table

LABELS = ("organ", "lesion", "vessel")


def _summary(retention: float, worst: float = 1.0) -> dict:
    per_label = {"organ": retention, "lesion": retention, "vessel": worst}
    return {
        "cases": {"count": 8, "source": "imagesTs", "ids": ["t0"], "mirroring_tta": True},
        "teacher_ensemble": {
            "folds": [0, 1, 2],
            "dice": dict.fromkeys(LABELS, 0.9),
            "mean_dice": 0.9,
            "parameters_per_fold": 10,
        },
        "student": {"dice": {k: 0.9 * v for k, v in per_label.items()}, "mean_dice": 0.9 * retention},
        "retention": {
            "mean": retention,
            "per_label": per_label,
            "worst_label": "vessel",
            "worst": worst,
        },
    }


def _rows(kd: list[float], no_kd: list[float], r4: float = 0.99) -> list[Row]:
    rows = [Row("r2_kd", "KD", 2, ()), Row("r2_no_kd", "no KD", 2, ("-a", "0")), Row("r4_kd", "r4", 4, ())]
    for row, values in zip(rows, (kd, no_kd, [r4]), strict=True):
        row.runs = [Run(_summary(v, worst=v), 60.0) for v in values]
    return rows


def test_repeated_runs_are_averaged_and_their_spread_printed() -> None:
    rows = _rows([0.99, 1.01], [0.98, 0.98])
    assert abs(rows[0].retention["mean"] - 1.0) < 1e-12
    assert abs(rows[0].dice["organ"] - 0.9) < 1e-12
    text, checks = table(rows)
    assert "(2: 0.990-1.010)" in text  # the KD row's spread
    assert abs(checks["r2_retention"]["measured"] - 1.0) < 1e-12
    assert abs(checks["kd_minus_no_kd"]["measured"] - 0.02) < 1e-12
    json.dumps(checks)  # the JSON the bench writes


def test_a_kd_gain_inside_the_run_to_run_spread_is_a_tie_not_a_gain() -> None:
    _text, checks = table(_rows([0.990, 1.010], [0.995, 0.999]))  # +0.003 with a spread of 0.02
    kd = checks["kd_minus_no_kd"]
    assert kd["measured"] > 0
    assert kd["met"] is False
    assert "2 SE" in kd["goal"]


def test_a_kd_gain_well_outside_the_spread_is_met() -> None:
    _text, checks = table(_rows([1.000, 1.001, 1.002], [0.990, 0.991, 0.992]))
    assert checks["kd_minus_no_kd"]["met"] is True
    assert checks["kd_minus_no_kd"]["goal"].endswith("(3 + 3 runs)")


def test_one_run_each_says_the_difference_was_not_weighed_against_the_spread() -> None:
    _text, checks = table(_rows([0.999], [0.998]))
    assert checks["kd_minus_no_kd"]["met"] is True
    assert "not weighed against the spread" in checks["kd_minus_no_kd"]["goal"]
    _text, checks = table(_rows([0.997], [0.998]))
    assert checks["kd_minus_no_kd"]["met"] is False


def test_worst_label_retention_is_the_lowest_mean_over_runs() -> None:
    rows = _rows([0.99, 0.99], [0.99, 0.99], r4=0.97)
    rows[0].runs = [Run(_summary(0.99, worst=0.94), 60.0), Run(_summary(0.99, worst=0.98), 60.0)]
    _text, checks = table(rows)
    assert abs(checks["min_label_retention"]["measured"] - 0.96) < 1e-12  # (0.94 + 0.98) / 2, below r4's 0.97
    assert checks["min_label_retention"]["met"] is True


def test_an_interrupted_run_keeps_the_students_trained_so_far(tmp_path: Path) -> None:
    rows = _rows([0.99], [0.98])
    rows[1].runs, rows[2].runs = [], []  # stopped after the first student
    args = argparse.Namespace(json=tmp_path / "quality.json", label_noise=0.0, repeat=3)
    report = Report(args, "cpu", ("-e", "40"), 100.0, time.perf_counter())
    report.write(rows, complete=False)
    written = json.loads(args.json.read_text())
    assert written["complete"] is False and written["repeat"] == 3
    assert list(written["rows"]) == ["r2_kd"]
    assert written["goals"]["kd_minus_no_kd"]["met"] is False  # nothing to compare with yet
    assert abs(written["rows"]["r2_kd"]["mean"]["retention"]["mean"] - 0.99) < 1e-12


def test_unlabelled_images_go_only_to_the_kd_rows_that_can_learn_from_them(tmp_path):
    from bench.bench_quality import LABELLED_ONLY, ROWS, QualityBench

    bench = QualityBench(tmp_path, "cpu", unlabelled=2)
    by_key = {r.key: r for r in [*ROWS, LABELLED_ONLY]}

    def unlabelled_of(key: str) -> list[str]:
        argv = bench.student_argv(by_key[key])
        return (
            argv[argv.index("--unlabelled_cases") + 1 : argv.index("--overwrite")]
            if ("--unlabelled_cases" in argv)
            else []
        )

    assert unlabelled_of("r2_kd") == unlabelled_of("r4_kd") == ["unlabelled_0000", "unlabelled_0001"]
    assert unlabelled_of("r2_no_kd") == [] and unlabelled_of("r2_kd_labelled") == []
    assert "--unlabelled_cases" not in QualityBench(tmp_path / "none", "cpu").student_argv(by_key["r2_kd"])
    assert (
        "also train on 2 unlabelled images that only the teachers label"
        in table(_rows([1.0], [1.0]), unlabelled=2)[0]
    )
    assert "unlabelled" not in table(_rows([1.0], [1.0]))[0]
    # the labelled-only student is described only where the table has it
    assert "on labelled cases only" not in table(_rows([1.0], [1.0]), unlabelled=2)[0]
    labelled_only = dataclasses.replace(LABELLED_ONLY, runs=[Run(_summary(1.0), 60.0)])
    text = table([*_rows([1.0], [1.0]), labelled_only], unlabelled=2)[0]
    assert "except those on labelled cases only (r2_kd_labelled)" in text


def test_an_unknown_row_is_refused_before_anything_is_trained(capsys):
    import pytest

    from bench.bench_quality import main

    with pytest.raises(SystemExit):
        main(["--rows", "r2_kd,nope"])
    assert "--rows: unknown nope (rows: r2_kd," in capsys.readouterr().err


def test_scarce_labels_split_only_the_labelled_cases_and_are_refused_below_five_folds(tmp_path, capsys):
    import pytest

    from bench.bench_quality import QualityBench, main

    bench = QualityBench(tmp_path, "cpu", unlabelled=3, labelled=5)
    bench.ws.preprocessed.joinpath(bench.dataset).mkdir(parents=True)
    bench.write_labelled_splits()
    splits = json.loads((bench.ws.preprocessed / bench.dataset / "splits_final.json").read_text())
    assert len(splits) == 5
    for split in splits:  # nnU-Net's 5 folds over the 5 labelled cases: one validation case each
        assert len(split["val"]) == 1 and len(split["train"]) == 4
        assert sorted(split["train"] + split["val"]) == [f"case_{i:04d}" for i in range(5)]
    assert "5 labelled training cases" in table(_rows([1.0], [1.0]), labelled=5)[0]
    with pytest.raises(SystemExit):
        main(["--labelled", "4"])
    assert "--labelled must be >= 5" in capsys.readouterr().err


def test_random_init_pairs_are_compared_apart_from_the_goal() -> None:
    from bench.bench_quality import ABLATION

    by_key = {r.key: r for r in ABLATION}
    random_rows = []
    for key, values in (("r2_pixel_random_labelled", [0.90, 0.76]), ("r2_no_kd_random", [0.69, 0.94])):
        random_rows.append(dataclasses.replace(by_key[key], runs=[Run(_summary(v), 60.0) for v in values]))
    text, checks = table([*_rows([1.0], [1.0]), *random_rows])
    assert "r2_pixel_random_labelled - r2_no_kd_random: +0.0150" in text
    assert "not a gain; random init" in text  # inside twice its standard error
    assert "r2_pixel_random - r2_no_kd_random" not in text  # that row was not trained
    assert set(checks) == {"r2_retention", "r4_retention", "kd_minus_no_kd", "min_label_retention"}
    assert "random init" not in table(_rows([1.0], [1.0]))[0]


def test_labelled_share_rows_pass_the_share_beside_the_unlabelled_images(tmp_path) -> None:
    from bench.bench_quality import ABLATION, QualityBench

    by_key = {r.key: r for r in ABLATION}
    with_images = QualityBench(tmp_path / "a", "cpu", unlabelled=3, labelled=5)
    argv = with_images.student_argv(by_key["r2_kd_share"])
    start = argv.index("--unlabelled_cases")
    assert argv[start + 1 : start + 6] == [*with_images.unlabelled_cases(), "--labelled_share", "0.5"]
    assert "--student_init" not in argv  # the default student: teacher init
    random_share = with_images.student_argv(by_key["r2_pixel_random_share"])
    assert "--labelled_share" in random_share and random_share[random_share.index("--student_init") + 1] == (
        "random"
    )
    # without unlabelled images there is nothing to weigh: the flag would be refused, so it is left out
    assert "--labelled_share" not in QualityBench(tmp_path / "b", "cpu", unlabelled=0).student_argv(
        by_key["r2_kd_share"]
    )
    share = dataclasses.replace(by_key["r2_kd_share"], runs=[Run(_summary(v), 60.0) for v in (1.01, 1.0)])
    text, _ = table([*_rows([1.0, 1.0], [1.0, 1.0]), share])
    assert "r2_kd_share - r2_no_kd: +0.0050" in text and "teacher init" in text
    assert "--labelled_share" not in text  # no unlabelled images in this table
    text = table([*_rows([1.0], [1.0]), share], unlabelled=16, labelled=5)[0]
    assert "probability r2_kd_share 0.5 (--labelled_share), against 4/20 = 0.20 for the uniform draw" in text
    assert "against 12/28 = 0.43" in table([*_rows([1.0], [1.0]), share], unlabelled=16, labelled=16)[0]
