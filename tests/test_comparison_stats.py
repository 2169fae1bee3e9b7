"""The paired comparison of methods over seeds, on results whose statistics are worked by hand."""

import math

import pandas as pd
import pytest

from fedhpo_core.reports import comparison_table, markdown_table, paired_differences


def results(rows: dict[str, list[float]], budget: int = 30) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": m, "budget": budget, "seed": s, "final_test_acc": acc}
            for m, accs in rows.items()
            for s, acc in enumerate(accs)
        ]
    )


def test_a_consistent_gain_is_better_and_a_mixed_one_a_tie():
    table = results({"random": [0.90, 0.80, 0.85], "a": [0.92, 0.83, 0.875], "b": [0.91, 0.78, 0.855]})
    paired = paired_differences(table, "random").set_index("method")
    # a: differences +0.02, +0.03, +0.025; mean 0.025, sd 0.005, t(0.975, 2) = 4.3027.
    half = 0.005 * 4.302653 / math.sqrt(3)
    assert paired.loc["a", "mean_difference"] == pytest.approx(0.025)
    assert (paired.loc["a", "ci_low"], paired.loc["a", "ci_high"]) == pytest.approx((0.025 - half, 0.025 + half))
    assert paired.loc["a", "verdict"] == "better"
    # Three positive differences: the exact signed-rank p is 2 / 2^3.
    assert paired.loc["a", "signed_rank_p"] == pytest.approx(0.25)
    assert paired.loc["a", "differences"] == "s0:+0.0200 s1:+0.0300 s2:+0.0250"
    # b: +0.01, -0.02, +0.005: the interval holds 0.
    assert paired.loc["b", "verdict"] == "tie"
    worse = paired_differences(results({"random": [0.9, 0.8, 0.85], "c": [0.8, 0.71, 0.74]}), "random")
    assert worse.verdict.tolist() == ["worse"]


def test_one_seed_gives_no_interval_and_the_table_says_so():
    table = results({"random": [0.9], "a": [0.95]})
    paired = paired_differences(table, "random")
    assert paired.verdict.tolist() == ["one seed"] and math.isnan(paired.ci_low[0])
    shown = comparison_table(table, "random")
    assert shown.loc["a", "budget 30: vs random"] == "+0.0500 one seed"
    assert shown.loc["random", "budget 30: vs random"] == "reference"
    assert "budget 30: vs random" in markdown_table(shown)


def test_identical_results_are_a_tie_with_p_one():
    paired = paired_differences(results({"random": [0.9, 0.8], "same": [0.9, 0.8]}), "random")
    assert paired.verdict.tolist() == ["tie"] and paired.signed_rank_p.tolist() == [1.0]


def test_a_comparison_of_one_method_has_no_pairs_and_still_a_table():
    table = results({"random": [0.9, 0.8]})
    assert paired_differences(table, "random").empty
    assert comparison_table(table, "random").loc["random", "budget 30: vs random"] == "reference"
