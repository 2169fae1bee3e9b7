"""DP-FedAvg's pieces against hand-computed values and the accountant library itself."""

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedhpo_core.aggregators import ServerSettings, aggregate
from fedhpo_core.data import load_dataset
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.postprocess import ClipNorm, Contribution, apply_chain
from fedhpo_core.privacy import Privacy, epsilon
from fedhpo_core.settings import SettingsError, TrainSettings
from fedhpo_core.tuners import FixedConfig


def clipped(update: torch.Tensor, bound: float) -> torch.Tensor:
    return ClipNorm(bound).client(Contribution(0, update, 1.0)).delta


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    update = torch.tensor([3.0, 4.0])  # norm 5
    assert torch.allclose(clipped(update, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped(update, 10.0), update)  # within the bound: unchanged
    for seed in range(20):
        big = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 100
        assert float(torch.linalg.vector_norm(clipped(big, 0.5))) <= 0.5 * (1 + 1e-6)


def test_the_private_mean_is_the_clipped_sum_over_the_expected_count_plus_noise_of_scale_sigma_c():
    x = torch.zeros(2)
    uploads = [(0, torch.tensor([3.0, 4.0]), 10), (1, torch.tensor([0.3, 0.4]), 1000)]  # sizes ignored
    exact, kept = apply_chain(Privacy(clip=1.0, noise=0.0).links(4.0, seed=0), x, uploads)
    assert torch.allclose(exact, (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 4) and kept == [0, 1]
    zeros = [(0, torch.zeros(200_000), 1)]
    noisy, _ = apply_chain(Privacy(clip=0.5, noise=2.0).links(10.0, seed=0), torch.zeros(200_000), zeros)
    assert float(noisy.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.01)  # sigma C / (q N)
    again, _ = apply_chain(Privacy(clip=0.5, noise=2.0).links(10.0, seed=0), torch.zeros(200_000), zeros)
    assert torch.equal(noisy, again)  # the noise comes from the run's seeded stream


def test_epsilon_is_the_accountants_and_grows_with_rounds():
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 100))
    assert epsilon(0.1, 1.2, 100, 1e-5) == accountant.get_epsilon(1e-5)
    spent = [epsilon(0.1, 1.2, rounds, 1e-5) for rounds in (0, 1, 10, 100, 1000)]
    assert spent[0] == 0.0 and spent == sorted(spent) and len(set(spent)) == 5
    assert epsilon(0.1, 0.0, 10, 1e-5) == float("inf")  # no noise, no privacy
    assert epsilon(0.1, 4.0, 100, 1e-5) < epsilon(0.1, 1.2, 100, 1e-5)  # more noise, less spent


def test_private_aggregation_by_hand_and_a_round_without_clients():
    x, fedavg = torch.zeros(2), ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3)
    uploads = [(torch.tensor([3.0, 4.0]), 10), (torch.tensor([0.3, 0.4]), 1000)]
    weights, _ = aggregate(fedavg, x, uploads, {}, Privacy(clip=1.0).links(4.0, seed=0))
    assert torch.allclose(weights, torch.tensor([0.9, 1.2]) / 4)
    alone, _ = aggregate(fedavg, x, [], {}, Privacy(clip=1.0, noise=1.0).links(4.0, seed=0))
    expected_noise = torch.randn(2, generator=torch.Generator().manual_seed(0)) / 4
    assert torch.allclose(alone, expected_noise)  # no client sampled: the noise alone moves the model


@pytest.fixture(scope="module")
def digits():
    settings = TrainSettings(clients=10, participation=0.3, dp_clip=1.0, dp_noise=0.8)
    data = FederatedData.build(load_dataset("digits", settings.data_root), partition_of(settings.data), "mlp")
    return settings, data


def test_clients_are_sampled_independently_with_probability_q(digits):
    settings, data = digits
    federation = Federation(data, settings.server, settings.participation, settings.seed, settings.privacy)
    drawn = [federation.sample_clients(t) for t in range(1, 2001)]
    assert drawn == [federation.sample_clients(t) for t in range(1, 2001)]  # from the run's seed
    counts = torch.bincount(torch.tensor([c for clients in drawn for c in clients]), minlength=10)
    assert ((counts / 2000 - 0.3).abs() < 0.04).all()
    assert {len(clients) for clients in drawn} > {2, 3, 4}  # the round's size varies, as Poisson's does


def test_a_private_run_completes_and_reports_the_accountants_epsilon_every_round(digits):
    settings, data = digits
    federation = Federation(data, settings.server, settings.participation, settings.seed, settings.privacy)
    reports = []
    result = federation.run(FixedConfig(settings.client_config), 3, observe=lambda r, _: reports.append(r))
    assert not result.diverged and torch.isfinite(result.state.weights).all()
    assert [r.epsilon for r in reports] == [epsilon(0.3, 0.8, t, 1e-5) for t in (1, 2, 3)]
    plain = Federation(data, settings.server, settings.participation, settings.seed).run(
        FixedConfig(settings.client_config), 1
    )
    assert not torch.equal(plain.state.weights, result.state.weights)


def test_privacy_settings_are_checked():
    with pytest.raises(SettingsError, match="dp_noise needs dp_clip > 0"):
        TrainSettings(dp_noise=1.0)
    with pytest.raises(SettingsError, match="dp_delta must be in"):
        TrainSettings(dp_clip=1.0, dp_delta=1.0)
