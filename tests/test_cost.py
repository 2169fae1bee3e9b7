"""Cost as one model: each round's cost with compressed uploads and downloads counted exactly, the
chain's order under DP, error feedback kept in the federation's state, and studies whose budget
is in client updates, bytes or simulated seconds charged exactly and never past it."""

import math
from dataclasses import replace

import optuna
import pytest
import torch

from fedhpo_core.compression import QSGD, Cast, TopK, compressor_of
from fedhpo_core.cost import UNITS, Cost
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, partition_of
from fedhpo_core.postprocess import ClipNorm, Compress, Contribution, DropNonFinite, GaussianNoise, UniformWeights
from fedhpo_core.registry import method as method_named
from fedhpo_core.search.base import RESULT_ATTR, Budget, cost_used, planned_trials, spent
from fedhpo_core.search.space import Configuration, SearchSpace
from fedhpo_core.search.study import TuneSettings, open_study, run_search
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tracking import Tracker
from fedhpo_core.trial import TrialTrainer
from fedhpo_core.tuners import FixedConfig

FIXED = TrainSettings(dataset="digits", clients=4, participation=0.5, experiment="cost-tests")


@pytest.fixture(scope="module")
def data():
    return FederatedData.build(load_dataset("digits", FIXED.data_root), partition_of(FIXED.data), FIXED.model)


def run(data, rounds=1, start=None, **changes):
    settings = replace(FIXED, **changes)
    return Federation.of(data, settings).run(FixedConfig(settings.client_config), rounds, start=start)


@pytest.mark.parametrize(
    ("changes", "payload"),
    [
        ({}, lambda p: 4 * p),
        ({"compression": "qsgd", "compression_bits": 4}, lambda p: math.ceil(p * 5 / 8) + 4 * math.ceil(p / 512)),
        ({"compression": "topk", "topk_fraction": 0.01}, lambda p: 8 * math.ceil(0.01 * p)),
        ({"compression": "cast", "compression_bits": 16}, lambda p: 2 * p),
        ({"compression": "cast", "compression_bits": 8}, lambda p: p + 4 * math.ceil(p / 512)),
    ],
)
def test_a_rounds_cost_counts_each_uploads_payload_and_the_model_down(data, changes, payload):
    reports = []
    settings = replace(FIXED, **changes)
    Federation.of(data, settings).run(FixedConfig(settings.client_config), 2, observe=lambda r, _: reports.append(r))
    size = data.spec.size
    for report in reports:  # two of four clients a round
        assert report.cost.rounds == 1 and report.cost.client_updates == 2
        assert report.cost.bytes_down == 2 * 4 * size
        assert report.cost.bytes_up == 2 * payload(size)
        assert report.bytes_sent == report.cost.bytes_up + report.cost.bytes_down
        samples = sum(data.clients[c].num_train for c in report.clients)
        assert report.cost.samples == samples and report.cost.sim_seconds == report.plan.seconds
        # Uniform devices: 1000 samples/s, 10 Mbit/s both ways; the slowest client sets the round.
        expected = max(
            8 * 4 * size / 1e7 + data.clients[c].num_train / 1000 + 8 * payload(size) / 1e7 for c in report.clients
        )
        assert report.cost.sim_seconds == pytest.approx(expected)


def test_costs_add_up_and_read_in_every_unit():
    a, b = Cost(1, 2, 30, 400, 500, 0.5), Cost(2, 4, 60, 100, 100, 1.0)
    total = a + b
    assert total == Cost(3, 6, 90, 500, 600, 1.5)
    assert [total.in_unit(u) for u in UNITS] == [3, 6, 1100, 1.5]
    assert Cost.of(total.as_dict()) == total and Cost.of(None) == Cost()


def test_the_budget_reserves_rounds_before_they_train_and_charges_what_they_cost():
    budget = Budget(1000, "bytes", round_cost=300)
    assert budget.total == 3 and budget.remaining == 3
    assert budget.reserve(Cost(bytes_up=600)) and budget.reserve(Cost(bytes_up=400))
    assert not budget.reserve(Cost(bytes_up=1))  # 1000 reserved: nothing more fits
    budget.settle(600, Cost(bytes_up=600))
    assert budget.spent == 600 and budget.remaining == 1
    with pytest.raises(RuntimeError, match="passed the budget"):
        budget.settle(400, Cost(bytes_up=401))


def test_under_dp_the_chain_clips_then_compresses_then_clips_again_then_adds_noise(data):
    settings = replace(FIXED, dp_clip=1.0, dp_noise=0.5, compression="qsgd", compression_bits=2)
    federation = Federation.of(data, settings)
    links = federation.links(1, None, dict.fromkeys((0, 1), compressor_of(settings.client_config)))
    kinds = [type(link) for link in links]
    assert kinds == [DropNonFinite, UniformWeights, ClipNorm, Compress, ClipNorm, GaussianNoise]
    # Every summed update is within the bound, however the quantizer lengthened it.
    uploads = [(c, torch.randn(data.spec.size) * 5, 10) for c in (0, 1)]
    kept = [Contribution(c, w, float(n)) for c, w, n in uploads]
    for link in links[:-1]:
        kept = link.clients(kept)
    assert all(float(torch.linalg.vector_norm(c.delta)) <= 1.0 + 1e-5 for c in kept)


def test_topk_is_refused_with_dp_in_one_line():
    with pytest.raises(SettingsError, match="topk cannot run with dp_clip") as error:
        TrainSettings(dp_clip=1.0, compression="topk")
    assert "\n" not in str(error.value)
    space = SearchSpace.from_dict({"compression": {"type": "categorical", "choices": ["none", "topk"]}})
    with pytest.raises(SettingsError, match="search space entry 'compression'.*topk cannot run with dp_clip"):
        space.check(TrainSettings(dp_clip=1.0))


def test_error_feedback_lives_in_the_state_so_a_run_continues_exactly(data):
    settings = {"compression": "topk", "topk_fraction": 0.05}
    straight = run(data, 3, **settings)
    first = run(data, 2, **settings)
    assert first.state.residuals and all(float(r.abs().sum()) > 0 for r in first.state.residuals.values())
    continued = run(data, 1, start=first.state, **settings)
    assert torch.equal(continued.state.weights, straight.state.weights)
    forgotten = run(data, 1, start=replace(first.state, residuals={}), **settings)
    assert not torch.equal(forgotten.state.weights, straight.state.weights)


def test_error_feedback_conserves_what_clients_meant_to_send(data):
    """After each round, what a client sent plus what it keeps equals the sum of its updates."""
    federation = Federation.of(data, replace(FIXED, participation=1.0, compression="topk", topk_fraction=0.02))
    compressors = dict.fromkeys((0, 1), TopK(0.02))
    residuals: dict[int, torch.Tensor] = {}
    sent_total, input_total = torch.zeros(2, data.spec.size), torch.zeros(2, data.spec.size)
    for t in range(1, 6):
        deltas = torch.randn(2, data.spec.size, generator=torch.Generator().manual_seed(t))
        link = federation.links(t, None, compressors, residuals)[-1]
        out = link.clients([Contribution(c, d, 1.0) for c, d in enumerate(deltas.clone())])  # the chain's own
        sent_total += torch.stack([c.delta for c in out])
        input_total += deltas
        residuals = link.unsent
    assert torch.allclose(sent_total + torch.stack([residuals[0], residuals[1]]), input_total, atol=1e-5)


def test_compressed_downloads_send_the_change_and_count_its_payload(data):
    settings = {"compression": "cast", "compression_bits": 16, "compress_downloads": True}
    reports = []
    chosen = replace(FIXED, **settings)
    first = Federation.of(data, chosen).run(
        FixedConfig(chosen.client_config), 2, observe=lambda r, _: reports.append(r)
    )
    assert all(r.cost.bytes_down == 2 * 2 * data.spec.size for r in reports)  # 16 bits a weight, two clients
    assert first.state.broadcast is not None
    # What the clients held in round 2 is within float16's rounding of the server's model then.
    assert torch.allclose(first.state.broadcast, reports[-1].weights_before, rtol=1e-3, atol=1e-4)
    assert not torch.equal(first.state.broadcast, reports[-1].weights_before)
    continued = run(data, 1, start=first.state, **settings)
    assert torch.equal(continued.state.weights, run(data, 3, **settings).state.weights)
    plain = run(data, 3)
    assert not torch.equal(continued.state.weights, plain.state.weights)


def test_sixteen_bit_uploads_train_as_well_as_thirty_two(data):
    plain = run(data, 8, participation=1.0).evaluations[-1]
    cast = run(data, 8, participation=1.0, compression="cast", compression_bits=16).evaluations[-1]
    assert abs(cast.val_score - plain.val_score) <= 0.01


def trainer(data, fixed):
    return TrialTrainer(data, fixed, "server", Tracker(fixed.experiment, "study"), "t", RoundSteps())


@pytest.mark.parametrize(("unit", "limit"), [("client-updates", 30), ("bytes", None), ("sim-seconds", 5.0)])
def test_a_study_in_any_unit_charges_its_trainings_costs_and_never_passes_the_budget(data, unit, limit):
    federation = Federation.of(data, FIXED)
    round_cost = federation.reference_cost(FIXED.client_config).in_unit(unit)
    limit = limit or 12 * round_cost
    method = method_named("random").build()
    study = open_study(method, optuna.storages.InMemoryStorage(), "s", resume=False)
    space = SearchSpace.from_dict({"lr": {"type": "categorical", "choices": [0.01, 0.05, 0.1]}})
    budget = run_search(
        method,
        study,
        space,
        "global",
        4,
        trainer(data, FIXED),
        limit,
        3,
        0,
        FIXED,
        data,
        unit=unit,
        round_cost=round_cost,
    )
    trials = planned_trials(study)
    charged = sum(Cost.of(t.user_attrs[RESULT_ATTR]["cost"]).in_unit(unit) for t in trials)
    assert budget.spent == spent(study, unit) == pytest.approx(charged) and charged <= limit
    assert sum(cost_used(t).in_unit(unit) for t in trials) == pytest.approx(charged)
    assert len(trials) == 3 and all(cost_used(t).in_unit(unit) <= limit / 3 + 1e-9 for t in trials)


def test_a_byte_budget_buys_a_compressed_configuration_more_rounds(data):
    fixed = replace(FIXED, participation=1.0)
    federation = Federation.of(data, fixed)
    round_cost = federation.reference_cost(fixed.client_config).in_unit("bytes")
    method = method_named("grid").build()
    study = open_study(method, optuna.storages.InMemoryStorage(), "s", resume=False)
    space = SearchSpace.from_dict({"compression_bits": {"type": "categorical", "choices": [8, 16]}})
    cast = replace(fixed, compression="cast")
    run_search(
        method,
        study,
        space,
        "global",
        4,
        trainer(data, cast),
        8 * round_cost,
        2,
        0,
        cast,
        data,
        unit="bytes",
        round_cost=round_cost,
    )
    rounds = {t.params["compression_bits"]: t.user_attrs["rounds_used"] for t in planned_trials(study)}
    # 4 uncompressed rounds' bytes each: 16-bit uploads leave 4 * 8 / (4 + 2) = 5.33 rounds, 8-bit about 6.4.
    assert rounds[16] == 5 and rounds[8] == 6


def test_a_budget_in_another_unit_is_checked_once_a_rounds_cost_is_known(data):
    tune = TuneSettings(method="random", budget=40, budget_unit="client-updates", n_configs=30)
    with pytest.raises(SettingsError, match="budget 40 client-updates buys 20 rounds of 2 client-updates each"):
        tune.budget_of(Federation.of(data, FIXED), FIXED)
    with pytest.raises(SettingsError, match="unknown budget_unit 'dollars'"):
        TuneSettings(budget_unit="dollars")
    assert (
        TuneSettings(budget=60, budget_unit="client-updates", n_configs=30)
        .budget_of(Federation.of(data, FIXED), FIXED)
        .total
        == 30
    )


def test_a_trials_checkpoint_keeps_what_error_feedback_and_downloads_hold(data):
    fixed = replace(FIXED, compression="topk", topk_fraction=0.05, compress_downloads=True)
    training, study = trainer(data, fixed), optuna.create_study(direction="maximize")
    trial, configuration = study.ask(), Configuration({"lr": 0.05})
    first = training(trial, configuration, 2, None, None, None)
    start = training.load(first.checkpoint)  # read back from the trial run's artifacts
    assert start.state.residuals.keys() == first.state.residuals.keys()
    assert torch.equal(start.state.broadcast, first.state.broadcast)
    continued = training(trial, configuration, 1, start, None, None)
    straight = training(study.ask(), configuration, 3, None, None, None)
    assert torch.equal(continued.state.weights, straight.state.weights)
    assert continued.cost.rounds == 1 and first.cost.rounds == 2 and straight.cost == first.cost + continued.cost


def test_quantizers_are_the_compressors_settings_name():
    assert compressor_of(TrainSettings(compression="qsgd", compression_bits=4).client_config) == QSGD(4, 512)
    assert compressor_of(TrainSettings(compression="topk", topk_fraction=0.1).client_config) == TopK(0.1)
    assert compressor_of(TrainSettings(compression="cast", compression_bits=16).client_config) == Cast(16, 512)
