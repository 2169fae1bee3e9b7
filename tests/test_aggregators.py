"""Each aggregator against values computed by hand from its update rule."""

import math

import pytest
import torch

from fedhpo_core.aggregators import ServerSettings, aggregate, weighted_mean

X = torch.tensor([0.0, 0.0], dtype=torch.float64)
# Two clients, 1 and 3 samples: weighted mean [2.5, 5.0], so delta = [2.5, 5.0] from X.
UPLOADS = [(torch.tensor([1.0, 2.0], dtype=torch.float64), 1), (torch.tensor([3.0, 6.0], dtype=torch.float64), 3)]


def server(name, lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3):
    return ServerSettings(name, lr, beta1, beta2, tau)


def test_weighted_mean_weights_by_samples():
    assert weighted_mean([w for w, _ in UPLOADS], [n for _, n in UPLOADS]).tolist() == [2.5, 5.0]


def test_fedavg_is_the_sample_weighted_mean():
    x, state = aggregate(server("fedavg"), X, UPLOADS, {})
    assert x.tolist() == [2.5, 5.0] and state == {}


def test_fedavg_with_server_lr_moves_part_way():
    x, _ = aggregate(server("fedavg", lr=0.5), X, UPLOADS, {})
    assert x.tolist() == [1.25, 2.5]


def test_fedavgm_accumulates_momentum():
    x1, state = aggregate(server("fedavgm"), X, UPLOADS, {})
    assert x1.tolist() == [2.5, 5.0]  # m_1 = delta_1
    second = [(torch.tensor([3.5, 6.0], dtype=torch.float64), 1)]  # delta_2 = [1, 1]
    x2, state = aggregate(server("fedavgm"), x1, second, state)
    # m_2 = 0.9 * [2.5, 5] + [1, 1] = [3.25, 5.5]; x_2 = x_1 + m_2
    assert x2.tolist() == pytest.approx([5.75, 10.5])
    assert state["m"].tolist() == pytest.approx([3.25, 5.5])


def adaptive_by_hand(v_rule):
    lr, b1, tau = 0.1, 0.9, 1e-3
    out = []
    for d in (2.5, 5.0):
        m = (1 - b1) * d
        v = v_rule(tau**2, d)
        out.append(lr * m / (math.sqrt(v) + tau))
    return out


@pytest.mark.parametrize(
    "name, v_rule",
    [
        ("fedadagrad", lambda v0, d: v0 + d * d),
        ("fedadam", lambda v0, d: 0.99 * v0 + 0.01 * d * d),
        ("fedyogi", lambda v0, d: v0 - 0.01 * d * d * math.copysign(1, v0 - d * d)),
    ],
)
def test_adaptive_first_step_matches_reddi_algorithm_2(name, v_rule):
    x, state = aggregate(server(name, lr=0.1), X, UPLOADS, {})
    assert x.tolist() == pytest.approx(adaptive_by_hand(v_rule), rel=1e-12)
    assert state["m"].tolist() == pytest.approx([0.25, 0.5])


def test_fedadam_second_step_uses_the_stored_moments():
    s = server("fedadam", lr=0.1)
    x1, state = aggregate(s, X, UPLOADS, {})
    second = [(x1 + torch.tensor([1.0, -1.0], dtype=torch.float64), 5)]  # delta_2 = [1, -1]
    x2, state2 = aggregate(s, x1, second, state)
    m = 0.9 * state["m"] + 0.1 * torch.tensor([1.0, -1.0], dtype=torch.float64)
    v = 0.99 * state["v"] + 0.01 * torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(x2, x1 + 0.1 * m / (v.sqrt() + 1e-3))
    assert torch.allclose(state2["v"], v)


def test_fedyogi_second_moment_can_shrink_unlike_adam():
    s = server("fedyogi", lr=0.1)
    _, state = aggregate(s, X, UPLOADS, {"v": torch.tensor([100.0, 100.0], dtype=torch.float64)})
    # v > delta^2, so Yogi subtracts: v = 100 - 0.01 * d^2
    assert state["v"].tolist() == pytest.approx([100 - 0.01 * 6.25, 100 - 0.01 * 25])
