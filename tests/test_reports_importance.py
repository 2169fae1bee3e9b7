"""Parameter importances of a study, on planted studies whose answer is known (no Prefect)."""

import math

import optuna
import pandas as pd
import pytest

from fedhpo_core.reports import importance_figure, importance_table


def planted(n_trials: int = 40, directions=("maximize",)) -> optuna.Study:
    """The score depends only on x; y is noise the sampler draws beside it (and a second objective's value)."""
    study = optuna.create_study(directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        return (math.sin(6 * x), y) if len(directions) > 1 else math.sin(6 * x)

    study.optimize(objective, n_trials=n_trials)
    return study


def test_the_parameter_the_score_depends_on_explains_it():
    table = importance_table(planted(), seed=0)
    assert list(table.columns) == ["parameter", "importance"]
    assert list(table.parameter) == ["x", "y"] and table.importance.is_monotonic_decreasing
    assert table.importance.iloc[0] > 0.8 and table.importance.sum() == pytest.approx(1)


def test_a_multi_objective_study_is_judged_on_its_first_objective():
    table = importance_table(planted(directions=("maximize", "minimize")), seed=0)
    assert table.parameter.iloc[0] == "x" and table.importance.iloc[0] > 0.8


def test_the_same_seed_gives_the_same_table():
    study = planted()
    pd.testing.assert_frame_equal(importance_table(study, seed=3), importance_table(study, seed=3))
    assert not importance_table(study, seed=3).equals(importance_table(study, seed=4))  # the seed is used


def recorded(trials: list[tuple[dict, float]]) -> optuna.Study:
    """A study of the given complete trials: parameters (each drawn from [0, 1]) and score."""
    study = optuna.create_study(direction="maximize")
    for params, score in trials:
        distributions = {name: optuna.distributions.FloatDistribution(0, 1) for name in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=score))
    return study


UNDEFINED = {
    "no trials": recorded([]),
    "one trial": recorded([({"x": 0.1, "y": 0.2}, 0.5)]),
    "every score the same": recorded([({"x": 0.1}, 0.5), ({"x": 0.9}, 0.5), ({"x": 0.5}, 0.5)]),
    "no parameter varied": recorded([({"x": 0.3}, 0.1), ({"x": 0.3}, 0.5), ({"x": 0.3}, 0.9)]),
    "one finite score": recorded([({"x": 0.1}, 0.5), ({"x": 0.9}, math.inf)]),
    "no parameters": recorded([({}, 0.1), ({}, 0.9)]),
}


@pytest.mark.parametrize("case", UNDEFINED)
def test_undefined_importances_are_an_empty_table_and_an_annotated_figure(case):
    table = importance_table(UNDEFINED[case], seed=0)
    assert table.empty and list(table.columns) == ["parameter", "importance"]
    assert table.to_csv(index=False) == "parameter,importance\n"
    assert importance_figure(table, case).axes[0].texts


def test_the_figure_draws_a_bar_per_parameter_most_important_on_top():
    table = importance_table(planted(), seed=0)
    axis = importance_figure(table, "planted").axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["y", "x"]  # bottom to top
    assert [bar.get_width() for bar in axis.patches] == list(table.importance[::-1])
