"""Clustered experts on the planted two-group problem (`planted_groups`: group 0's best lr 0.05,
group 1's 0.005, three grid steps apart): the groups found from the clients' encodings or, when the
encodings say nothing, by the router; each group's expert on its own rate, where one global rate
serves half the clients. Measured (100 rounds, seeds 0-11): by encoding, shuffled encodings with the
router, and by preference, every client within one grid step of its group's best and the groups
exact in every seed (the router repairs shuffled encodings within 60 rounds in all 12); shuffled
without the router 0.5-0.6; FedEx 0.5; a flipped signal 0 or 0.5. Then one real study on digits."""

import numpy as np
import optuna
import pytest
from planted_groups import CLIENTS, CONFIGS, VALUES, group_of, on_group_best, run
from sklearn.metrics import adjusted_rand_score
from test_planted import FlippedFedEx

from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, RoundSteps, partition_of
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import CHOSEN_ATTR
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.search.study import open_study, run_search
from fedhpo_core.settings import TrainSettings
from fedhpo_core.tracking import Tracker
from fedhpo_core.trial import TrialTrainer
from fedhpo_core.tuners.clustered import ENCODING, ClusteredExperts, ClusteredSearch
from fedhpo_core.tuners.fedex import FedEx

SEEDS = (0, 1, 2)
ROUNDS = 100


def clustered(seed: int, **options) -> ClusteredExperts:
    return ClusteredExperts(CONFIGS, VALUES, CLIENTS, seed, **options)


def chosen_lrs(tuner: ClusteredExperts) -> dict[int, float]:
    chosen = tuner.chosen()
    assert set(chosen) == {f"lr/client_{c}" for c in range(CLIENTS)}
    return {c: chosen[f"lr/client_{c}"] for c in range(CLIENTS)}


def rand_index(tuner: ClusteredExperts) -> float:
    """The adjusted Rand index of the clients' experts against the planted groups (1: the groups)."""
    return adjusted_rand_score([group_of(c) for c in range(CLIENTS)], [tuner.expert_of(c) for c in range(CLIENTS)])


@pytest.mark.parametrize("grouping", ["encoding", "preference"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_groups_are_found_and_each_experts_lr_is_its_groups(seed, grouping):
    tuner = run(clustered(seed, grouping=grouping), ROUNDS, seed)
    assert rand_index(tuner) == 1.0
    assert on_group_best(chosen_lrs(tuner)) >= 0.9
    assert sorted(expert.chosen()["lr"] for expert in tuner.experts) == [0.005, 0.05]
    if grouping == "encoding":  # every encoding is in after round 1: no more are asked for
        assert ENCODING not in tuner.statistics and len(tuner.encodings) == CLIENTS


@pytest.mark.parametrize("seed", SEEDS)
def test_with_shuffled_encodings_the_router_repairs_the_groups(seed):
    """k-means on shuffled encodings puts half of each group in each expert; without the router an
    expert settles on one group's rate and serves the other half badly; with it, every client
    ends in its group's expert."""
    off = run(clustered(seed, route_every=0), ROUNDS, seed, shuffled=True)
    assert abs(rand_index(off)) < 0.2 and 0.25 <= on_group_best(chosen_lrs(off)) <= 0.75
    on = run(clustered(seed), ROUNDS, seed, shuffled=True)
    assert rand_index(on) == 1.0 and on_group_best(chosen_lrs(on)) >= 0.9


@pytest.mark.parametrize("seed", SEEDS)
def test_a_global_method_and_one_expert_give_every_client_one_rate(seed):
    fedex = run(FedEx(CONFIGS, VALUES, seed), ROUNDS, seed)
    assert on_group_best(dict.fromkeys(range(CLIENTS), fedex.chosen()["lr"])) <= 0.5
    one = run(clustered(seed, experts=1), ROUNDS, seed)
    assert set(chosen_lrs(one).values()) == {fedex.chosen()["lr"]}  # FedEx, draw for draw
    assert np.array_equal(one.experts[0].log_theta[0], fedex.log_theta[0]) and FedEx.statistics == one.statistics


class FlippedExperts(ClusteredExperts):
    """Broken: experts and router read the signal with the wrong sign (the router reads the experts')."""

    def expert(self, index):
        return FlippedFedEx(self.configs, self.values, super().expert(index).seed, **self.fedex_options)


class SilentExperts(ClusteredExperts):
    """Broken: every client reports the same signal."""

    def signal_of(self, update):
        return 0.0

    def expert(self, index):
        expert = super().expert(index)
        expert.signal_of = self.signal_of
        return expert


@pytest.mark.parametrize("broken", [FlippedExperts, SilentExperts])
def test_a_flipped_or_removed_signal_fails(broken):
    for seed in SEEDS:
        tuner = run(broken(CONFIGS, VALUES, CLIENTS, seed), ROUNDS, seed)
        assert on_group_best(chosen_lrs(tuner)) < 0.9


def test_the_registered_method_runs_a_real_study_on_digits(monkeypatch):
    """Built from the registry, inside a study's trial on digits: the engines upload the encodings,
    the clients are grouped, and the trial records a rate per client."""
    fixed = TrainSettings(dataset="digits", clients=4, experiment="clustered-tests")
    data = FederatedData.build(load_dataset("digits", fixed.data_root), partition_of(fixed.data), fixed.model)
    built = []
    tuner_for = ClusteredSearch.tuner_for
    monkeypatch.setattr(
        ClusteredSearch, "tuner_for", lambda self, context: built.append(tuner_for(self, context)) or built[-1]
    )
    method = method_named("clustered").build({"route_every": 2, "probe": 0.5})
    study = open_study(method, optuna.storages.InMemoryStorage(), "clustered", resume=False)
    space = SearchSpace.from_dict({"lr": {"type": "categorical", "choices": [0.01, 0.05, 0.1]}})
    trainer = TrialTrainer(data, fixed, "server", Tracker(fixed.experiment, "study"), "clustered", RoundSteps())
    spent = run_search(method, study, space, "global", 4, trainer, 6, 3, seed=0, fixed=fixed, data=data)
    assert spent.spent == 6
    (tuner,) = built
    assert tuner.grouped and sorted(tuner.encodings) == [0, 1, 2, 3] and sum(tuner.sizes()) == 4
    assert all(encoding.shape == (ENCODING.dim * 10,) for encoding in tuner.encodings.values())
    chosen = study.trials[0].user_attrs[CHOSEN_ATTR]
    assert sorted(chosen) == [f"lr/client_{c}" for c in range(4)] and set(chosen.values()) <= {0.01, 0.05, 0.1}
