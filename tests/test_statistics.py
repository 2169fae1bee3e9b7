"""Client statistics (what a client uploads beside its weights) and a tuner's per-client aggregation
weights (the `ClientWeights` link), against hand-computed values and across both engines."""

import math

import numpy as np
import pytest
import torch
from test_cohort import CONFIGS, digits_data

from fedhpo_core.aggregators import ServerSettings
from fedhpo_core.client import ClientData, ClientJob, evaluate
from fedhpo_core.cohort import Cohort, train_cohort
from fedhpo_core.federation import FederatedData, Federation, RoundSteps, train_sequentially
from fedhpo_core.models import ModelSpec, workspace_model
from fedhpo_core.postprocess import (
    ClientWeights,
    ClipNorm,
    DropNonFinite,
    GaussianNoise,
    UniformWeights,
    apply_chain,
    batch_of,
)
from fedhpo_core.privacy import Privacy
from fedhpo_core.settings import ClientConfig
from fedhpo_core.statistics import VAL_LOSS_AFTER, VAL_LOSS_BEFORE, DataEncoding
from fedhpo_core.tuners import FixedConfig
from fedhpo_core.tuners.fedex import FedEx

FEDAVG = ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3)
ENCODING = DataEncoding(dim=16, seed=3)
ASKED = [  # what each of the six clients' jobs asks for
    (VAL_LOSS_BEFORE, VAL_LOSS_AFTER, ENCODING),
    (VAL_LOSS_AFTER,),
    (),
    (ENCODING, VAL_LOSS_BEFORE),
    (VAL_LOSS_BEFORE, VAL_LOSS_AFTER, ENCODING),
    (ENCODING,),
]


def jobs_asking(asked, configs=CONFIGS):
    return [ClientJob(c, 1, config, 0, statistics=s) for c, (config, s) in enumerate(zip(configs, asked, strict=True))]


@pytest.fixture(scope="module")
def digits():
    return digits_data("mlp")


def test_both_engines_compute_exactly_the_statistics_asked_for_and_agree(digits):
    start = digits.spec.initial_weights(0)
    jobs = jobs_asking(ASKED)
    sequential = train_sequentially(digits.spec, start, jobs, digits.clients)
    batched = train_cohort(digits.spec, start, jobs, digits.clients)
    for a, b, asked in zip(sequential, batched, ASKED, strict=True):
        names = [s.name for s in asked]
        assert list(a.statistics) == names and list(b.statistics) == names
        if "val_loss_before" in names:
            assert a.statistics["val_loss_before"] == pytest.approx(b.statistics["val_loss_before"], abs=1e-5)
        if "val_loss_after" in names:
            assert a.statistics["val_loss_after"] == a.val_loss
            assert b.statistics["val_loss_after"] == pytest.approx(a.val_loss, abs=1e-5)
        if "data_encoding" in names:
            assert a.statistics["data_encoding"].shape == (16 * 10,)
            assert (a.statistics["data_encoding"] - b.statistics["data_encoding"]).abs().max() < 1e-5
    # By hand: the received global model on the client's validation split, before any training.
    model = workspace_model(digits.spec, start)
    for update in batched:
        if "val_loss_before" in update.statistics:
            data = digits.clients[update.client]
            expected, _ = evaluate(model, data.x_val, data.y_val)
            assert update.statistics["val_loss_before"] == pytest.approx(expected, rel=1e-6)
            assert update.statistics["val_loss_before"] != pytest.approx(update.val_loss, rel=1e-3)


def test_a_cohort_that_asks_for_nothing_uploads_none_and_validates_once(digits, monkeypatch):
    start = digits.spec.initial_weights(0)
    for train in (train_cohort, train_sequentially):
        updates = train(digits.spec, start, jobs_asking([()] * 6), digits.clients)
        assert all(u.statistics == {} for u in updates)
    calls = []
    validate = Cohort.validate
    monkeypatch.setattr(Cohort, "validate", lambda self, params: calls.append(1) or validate(self, params))
    same_batch = [ClientConfig()] * 6  # one cohort
    train_cohort(digits.spec, start, jobs_asking([()] * 6, same_batch), digits.clients)
    assert len(calls) == 1  # after training only: nobody asked for the loss before
    train_cohort(digits.spec, start, jobs_asking([()] * 5 + [(VAL_LOSS_BEFORE,)], same_batch), digits.clients)
    assert len(calls) == 3


def test_the_data_encoding_is_the_mean_of_random_features_outer_onehot_labels():
    spec = ModelSpec("mlp", (1, 2, 2), 3)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 2, 2, generator=generator), torch.tensor([0, 2, 2, 1, 0])
    empty = (x[:0], y[:0])
    first, second = ClientData.of(x[:3], y[:3], *empty), ClientData.of(x[3:], y[3:], *empty)
    w, b = ENCODING.features(4)
    # By hand, sample by sample: phi(x) = sqrt(2 / D) cos(W x + b), e = mean of phi(x_i) onehot(y_i)^T.
    by_hand = []
    for client in (first, second):
        e = torch.zeros(16, 3)
        for xi, yi in zip(client.x_train, client.y_train, strict=True):
            e[:, yi] += math.sqrt(2 / 16) * torch.cos(w @ xi.flatten() + b)
        by_hand.append(e.flatten() / client.num_train)
    encodings = ENCODING.compute(spec, [first, second])
    assert all(torch.allclose(e, h, atol=1e-6) for e, h in zip(encodings, by_hand, strict=True))
    assert [e.numel() for e in encodings] == [ENCODING.floats(spec, c) for c in (first, second)] == [48, 48]


def test_the_data_encoding_is_seeded_shared_by_equal_data_and_tells_labels_apart():
    spec = ModelSpec("mlp", (1, 8, 8), 10)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator)
    empty = (x[:0], y[:0])
    same = [ClientData.of(x, y, *empty), ClientData.of(x.clone(), y.clone(), *empty)]
    relabelled = ClientData.of(x, (y + 1) % 10, *empty)
    a, b, c = ENCODING.compute(spec, [*same, relabelled])
    assert torch.equal(a, b)
    assert (a - c).norm() > 0.5 * a.norm()
    assert torch.equal(a, ENCODING.compute(spec, same[:1])[0])  # the same alone as in a cohort
    assert torch.equal(a, DataEncoding(dim=16, seed=3).compute(spec, same[:1])[0])
    assert (a - DataEncoding(dim=16, seed=4).compute(spec, same[:1])[0]).norm() > 0.5 * a.norm()


def test_the_random_features_approximate_the_gaussian_kernel_of_lengthscale_sqrt_d():
    d, encoding = 64, DataEncoding(dim=4000, seed=0)
    w, b = encoding.features(d)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(100, d, generator=generator)
    z = x + torch.linspace(0, 2, 100).unsqueeze(1) * torch.randn(100, d, generator=generator)
    phi_x, phi_z = (math.sqrt(2 / 4000) * torch.cos(v @ w.T + b) for v in (x, z))
    kernel = torch.exp(-((x - z) ** 2).sum(1) / (2 * d))
    assert kernel.min() < 0.2 and kernel.max() == 1.0  # pairs from equal to far apart at this lengthscale
    assert ((phi_x * phi_z).sum(1) - kernel).abs().max() < 0.05


class Asking(FixedConfig):
    statistics = (VAL_LOSS_BEFORE, ENCODING)


def test_bytes_sent_counts_the_statistics_uploads(digits):
    federation = Federation(digits, FEDAVG, participation=0.5, seed=0)
    reports = []
    federation.run(Asking(ClientConfig()), 2, observe=lambda report, _: reports.append(report))
    model_bytes = (64 * 128 + 128 + 128 * 10 + 10) * 4
    # 3 of 6 clients take part and upload; each uploads 1 + 16 x 10 floats beside its model.
    assert [r.bytes_sent for r in reports] == [3 * model_bytes + 3 * (model_bytes + 4 * 161)] * 2
    assert all(set(u.statistics) == {"val_loss_before", "data_encoding"} for r in reports for u in r.updates)


def test_the_passes_statistics_take_are_charged_to_the_simulated_round_time(digits):
    """Uniform devices: 1000 samples a second. Asked for the loss before training (an extra pass
    over its validation split) and the data encoding (a pass over its training data), each client
    computes n_val + n_train samples more; the round waits for the slowest."""
    federation = Federation(digits, FEDAVG, participation=1.0, seed=0)
    times = {}
    for name, tuner in (("plain", FixedConfig(ClientConfig())), ("asking", Asking(ClientConfig()))):
        reports = []
        federation.run(tuner, 1, observe=lambda report, _, reports=reports: reports.append(report))
        times[name] = reports[0].sim_time_s
    model_s = 2 * 8.0 * (64 * 128 + 128 + 128 * 10 + 10) * 4 / 10e6  # down and up at 10 Mbit/s
    slowest = max((2 * c.num_train + c.num_val) / 1000 for c in digits.clients)
    assert times["asking"] == pytest.approx(model_s + slowest)
    assert times["plain"] == pytest.approx(model_s + max(c.num_train / 1000 for c in digits.clients))


def test_fedex_reads_the_statistics_it_declares_through_the_round_loop(digits):
    configs = [ClientConfig(lr=lr) for lr in (0.1, 0.01)]
    tuner = FedEx(configs, [{"lr": c.lr} for c in configs], seed=0)
    reports = []
    Federation(digits, FEDAVG, 1.0, seed=0).run(tuner, 2, observe=lambda report, _: reports.append(report))
    assert all(set(u.statistics) == {"val_loss_before", "val_loss_after"} for r in reports for u in r.updates)
    assert not np.allclose(tuner.theta, 0.5)  # it observed the signals


UPLOADS = [(0, torch.tensor([1.0, 0.0]), 1), (1, torch.tensor([0.0, 2.0]), 2), (2, torch.tensor([3.0, 3.0]), 3)]


def test_client_weights_multiply_fedavgs_weights():
    x = torch.zeros(2)
    mean, kept = apply_chain([DropNonFinite(), ClientWeights({0: 2.0, 2: 0.5})], x, UPLOADS)
    # Weights n_k x factor: 1 x 2, 2 x 1 (not in the map), 3 x 0.5.
    assert torch.allclose(mean, (2 * UPLOADS[0][1] + 2 * UPLOADS[1][1] + 1.5 * UPLOADS[2][1]) / 5.5)
    assert kept == [0, 1, 2]
    without, _ = apply_chain([ClientWeights({2: 0.0})], x, UPLOADS)
    others, _ = apply_chain([], x, UPLOADS[:2])
    assert torch.equal(without, others) and torch.allclose(others, torch.tensor([1 / 3, 4 / 3]))


def tiny_federation(**settings) -> Federation:
    spec = ModelSpec("mlp", (4,), 3)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    clients = tuple(ClientData.of(x[i : i + 8], y[i : i + 8], x[:0], y[:0]) for i in range(0, 32, 8))
    return Federation(FederatedData(clients, (x, y), (x, y), spec), FEDAVG, seed=0, **settings)


def test_under_dp_a_factor_is_capped_at_one_before_clipping():
    federation = tiny_federation(participation=0.5, privacy=Privacy(clip=1.0, noise=0.0))
    links = federation.links(1, {0: 3.0, 1: 0.5})
    assert [type(link) for link in links] == [DropNonFinite, UniformWeights, ClientWeights, ClipNorm, GaussianNoise]
    # Clipped to norm 1 ([3, 4] -> [0.6, 0.8]), weights min(3, 1) and 0.5, over q N = 2.
    mean, _ = apply_chain(links, torch.zeros(2), [(0, torch.tensor([3.0, 4.0]), 10), (1, torch.tensor([0.3, 0.4]), 1)])
    assert torch.allclose(mean, (torch.tensor([0.6, 0.8]) + 0.5 * torch.tensor([0.3, 0.4])) / 2)


def test_under_the_papers_scaffold_factors_scale_the_uniform_weights():
    links = tiny_federation(participation=1.0, algorithm="scaffold-paper").links(1, {1: 3.0})
    assert [type(link) for link in links] == [DropNonFinite, UniformWeights, ClientWeights]
    mean, _ = apply_chain(links, torch.zeros(2), UPLOADS)
    assert torch.allclose(mean, (UPLOADS[0][1] + 3 * UPLOADS[1][1] + UPLOADS[2][1]) / 5)
    fedavg = tiny_federation(participation=1.0)
    assert [type(link) for link in fedavg.links(1)] == [DropNonFinite]  # no factors: the chain as it was
    assert [type(link) for link in fedavg.links(1, {1: 3.0})] == [DropNonFinite, ClientWeights]


class OnlyClientZero(FixedConfig):
    """Every client trains; only client 0 counts in the aggregate."""

    def aggregation_weights(self, round, clients):
        return {c: 0.0 for c in clients if c != 0}


@pytest.mark.parametrize("engine", ["cohort", "sequential"])
def test_a_tuners_factors_make_the_global_model_client_zeros(digits, engine):
    federation = Federation(digits, FEDAVG, participation=1.0, seed=0)
    config = ClientConfig(lr=0.1, momentum=0.0)
    reports = []
    federation.run(OnlyClientZero(config), 2, RoundSteps(engine), observe=lambda report, _: reports.append(report))
    for report in reports:
        zero = next(u for u in report.updates if u.client == 0)
        assert torch.allclose(report.weights_after, zero.weights, atol=1e-6)
    plain = []
    federation.run(FixedConfig(config), 1, RoundSteps(engine), observe=lambda report, _: plain.append(report))
    zero = next(u for u in plain[0].updates if u.client == 0)
    assert not torch.allclose(plain[0].weights_after, zero.weights, atol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [{"algorithm": "scaffold"}, {"algorithm": "scaffold-paper"}, {"privacy": Privacy(clip=1.0, noise=0.5)}],
    ids=["scaffold", "scaffold-paper", "dp"],
)
def test_factors_run_under_scaffold_and_dp(digits, settings):
    federation = Federation(digits, FEDAVG, participation=0.5, seed=0, **settings)
    result = federation.run(OnlyClientZero(ClientConfig(lr=0.1)), 3)
    assert not result.diverged and bool(torch.isfinite(result.state.weights).all())
    assert result.state.weights.shape == (digits.spec.size,)


def test_batch_of_views_consecutive_rows_and_stacks_anything_else():
    batch = torch.arange(12.0).view(4, 3)
    same = batch_of(list(batch))
    assert same.data_ptr() == batch.data_ptr() and torch.equal(same, batch)  # no copy
    assert batch_of(list(batch[1:3])).data_ptr() == batch[1].data_ptr()
    for rows in ([batch[2], batch[0]], [batch[0], batch[2]], [batch[0], torch.ones(3)]):
        stacked = batch_of(rows)
        assert stacked.data_ptr() not in (r.data_ptr() for r in rows) and torch.equal(stacked, torch.stack(rows))
