"""DP-FedAvg's pieces against hand-computed values and the accountant library itself."""

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedhpo_core.privacy import clip, epsilon, private_mean


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    update = torch.tensor([3.0, 4.0])  # norm 5
    assert torch.allclose(clip(update, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.equal(clip(update, 10.0), update)  # within the bound: unchanged
    for seed in range(20):
        big = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 100
        assert float(torch.linalg.vector_norm(clip(big, 0.5))) <= 0.5 * (1 + 1e-6)


def test_the_private_mean_is_the_clipped_sum_over_the_expected_count_plus_noise_of_scale_sigma_c():
    updates = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
    exact = private_mean(updates, 1.0, 0.0, 4.0, torch.Generator().manual_seed(0))
    assert torch.allclose(exact, (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 4)  # by hand
    zeros = [torch.zeros(200_000)]
    noisy = private_mean(zeros, 0.5, 2.0, 10.0, torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.01)  # sigma C / (q N)
    again = private_mean(zeros, 0.5, 2.0, 10.0, torch.Generator().manual_seed(0))
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
