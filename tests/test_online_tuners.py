"""The mathematical core of the round-level methods, on problems small enough to check by hand."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedhpo_core.models import ModelSpec, load_flat_weights
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.fedex import FedEx
from fedhpo_core.tuners.fedtune import FedTune, mixture_credits

CONFIGS = [ClientConfig(lr=lr) for lr in (0.1, 0.01, 0.001)]
VALUES = [{"lr": c.lr} for c in CONFIGS]
SPEC = ModelSpec("mlp", (1, 4, 4), 3)


def test_fedex_step_matches_a_hand_computed_exponentiated_gradient_step():
    fedex = FedEx(CONFIGS, VALUES, seed=0)
    fedex.draws = {0: 0, 1: 0, 2: 2}  # two clients drew config 0, one drew config 2
    theta = np.full(3, 1 / 3)
    losses, sizes = {0: 0.5, 1: 1.0, 2: 2.0}, {0: 10, 1: 30, 2: 60}
    # By hand, baseline 0 in the first round: g_0 = (0.1 * 0.5 + 0.3 * 1.0) / (1/3), g_2 = 0.6 * 2.0 / (1/3)
    expected_grad = np.array([(0.05 + 0.3) * 3, 0.0, 1.2 * 3])
    assert fedex.gradient(losses, sizes, baseline=0.0) == pytest.approx(expected_grad)
    eta = math.sqrt(2 * math.log(3))  # eta_1 = sqrt(2 log k) / sqrt(1)
    expected = theta * np.exp(-eta * expected_grad)
    expected /= expected.sum()

    class Report:
        updates = [type("U", (), {"client": c, "val_loss": losses[c], "num_val": sizes[c]})() for c in losses]

    fedex.observe(Report)
    assert fedex.theta == pytest.approx(expected)
    assert fedex.previous_loss == pytest.approx(0.1 * 0.5 + 0.3 * 1.0 + 0.6 * 2.0)
    # The second step subtracts the first round's mean loss as the baseline.
    assert fedex.gradient({0: 1.0}, {0: 1}, baseline=fedex.previous_loss)[0] == pytest.approx(
        (1.0 - fedex.previous_loss) / fedex.theta[0]
    )
    # With no baseline yet every drawn configuration's loss counts against it: the undrawn one leads.
    assert fedex.chosen() == {"lr": 0.01}


def test_fedex_moves_mass_to_the_configuration_with_lower_loss():
    fedex = FedEx(CONFIGS, VALUES, seed=1)
    for round in range(1, 60):
        fedex.configure(round, list(range(8)))
        losses = {c: (0.2 if j == 1 else 1.0) for c, j in fedex.draws.items()}

        class Report:
            updates = [type("U", (), {"client": c, "val_loss": losses[c], "num_val": 5})() for c in losses]

        fedex.observe(Report)
    assert fedex.theta.argmax() == 1 and fedex.theta[1] > 0.9


def random_uploads(count):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(SPEC.size, generator=generator) * 0.5, n) for n in (10, 30, 60)[:count]]


def mixture_loss(uploads, ones, x, y):
    shares = torch.tensor([n for _, n in uploads], dtype=torch.float64)
    shares = shares / shares.sum()
    model = SPEC.build().double()
    outputs = []
    for weights, _ in uploads:
        load_flat_weights(model, weights.double())
        outputs.append(model(x.double()))
    return F.cross_entropy(sum(s * o * w for s, o, w in zip(shares, outputs, ones, strict=True)), y).item()


def test_fedtune_credit_equals_a_finite_difference_of_the_validation_loss():
    uploads = random_uploads(3)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    credits = mixture_credits(SPEC, uploads, x, y)
    step = 1e-4
    for i in range(3):
        up, down = [1.0] * 3, [1.0] * 3
        up[i] += step
        down[i] -= step
        derivative = (mixture_loss(uploads, up, x, y) - mixture_loss(uploads, down, x, y)) / (2 * step)
        assert credits[i] == pytest.approx(-derivative, rel=1e-3, abs=1e-5)


def test_fedtune_moves_probability_to_the_configuration_with_better_credit():
    x, y = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.int64)
    fedtune = FedTune(CONFIGS, VALUES, clients=2, spec=SPEC, server_val=(x, y), seed=0)
    for round in range(1, 80):
        fedtune.configure(round, [0, 1])
        # Client 0 is rewarded for config 2, client 1 for config 0; other draws are penalized.
        good = {0: 2, 1: 0}
        fedtune.update({c: (0.5 if k == good[c] else -0.5) for c, k in fedtune.draws.items()})
    pi = fedtune.pi
    assert pi[0].argmax() == 2 and pi[1].argmax() == 0 and pi[0, 2] > 0.9 and pi[1, 0] > 0.9
    assert np.allclose(pi.sum(axis=1), 1.0)
    assert fedtune.chosen() == {"lr/client_0": 0.001, "lr/client_1": 0.1}


def test_one_fedtune_step_is_eq_11_on_the_logits():
    x, y = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.int64)
    fedtune = FedTune(CONFIGS, VALUES, clients=1, spec=SPEC, server_val=(x, y), seed=0, eta=0.5)
    fedtune.draws = {0: 1}
    fedtune.update({0: 0.3})
    # a = 0 + 0.5 * 0.3 * (onehot(1) - 1/3): the drawn entry rises by 0.1, the others fall by 0.05.
    assert fedtune.logits[0] == pytest.approx([-0.05, 0.1, -0.05])


def stepwise(samples, seed=0):
    from fedhpo_core.search.space import SearchSpace
    from fedhpo_core.tuners.stepwise import Stepwise

    return Stepwise(SearchSpace.load(None).parameters("global", 1), ClientConfig(), samples, 10, seed)


def test_straggler_aware_selection_bounds_round_time_and_everyone_takes_part():
    samples = [50, 400, 120, 80, 900, 60, 300, 70, 200, 100]
    tuner = stepwise(samples)
    times = tuner.seconds(range(10), 1)
    seen = set()
    for round in range(1, 41):
        chosen = tuner.select(round, list(range(10)))
        seen.update(chosen)
        assert tuner.round_time == pytest.approx(max(times[c] for c in chosen))
        # Within the deadline, unless a client that alone exceeds it was the stalest.
        assert tuner.round_time <= tuner.deadline or (len(chosen) == 1 and times[chosen[0]] > tuner.deadline)
    assert seen == set(range(10))
    unbounded = max(times)  # what taking everyone every round would cost
    assert tuner.deadline < unbounded


def test_stepwise_feedback_combines_global_and_local_improvement():
    tuner = stepwise([100] * 4)
    tuner.configure(1, [0, 1])

    class Report:
        val_acc, client_val_acc, diverged = 0.5, 0.3, False

    tuner.observe(Report)
    assert tuner.feedback == pytest.approx(0.5 * (0.5 - 0.1) + 0.5 * (0.3 - 0.1))  # chance is 0.1 before round 1
    assert tuner.study.trials[0].value == pytest.approx(tuner.feedback)
    tuner.configure(2, [2, 3])
    Report.val_acc, Report.client_val_acc = 0.6, 0.5
    tuner.observe(Report)
    assert tuner.feedback == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)
    assert tuner.chosen() == tuner.study.trials[0].params  # the larger improvement so far


def test_fedhyper_hypergradient_sign_moves_the_rates_and_clipping_bounds_them():
    from fedhpo_core.tuners.fedhyper import FedHyper

    tuner = FedHyper(ClientConfig(lr=0.05))
    tuner.step(torch.tensor([0.3, 0.4]))  # first round: no previous pseudo-gradient, nothing moves
    assert (tuner.alpha, tuner.beta) == (1.0, 0.05)
    tuner.step(torch.tensor([0.6, 0.8]))  # aligned: h = 0.18 + 0.32 = 0.5 > 0, both rates rise
    assert tuner.hypergradient == pytest.approx(0.5)
    assert tuner.alpha == pytest.approx(1.5) and tuner.beta == pytest.approx(0.05 + 0.05 * 0.5)
    tuner.step(torch.tensor([-0.6, -0.8]))  # reversed: h = -1, both fall
    assert tuner.alpha == pytest.approx(0.5) and tuner.beta == pytest.approx(0.075 - 0.05)
    tuner.step(torch.tensor([60.0, 80.0]))  # h = -10000: clipped at the lower bounds
    assert tuner.alpha == pytest.approx(1 / 3) and tuner.beta == pytest.approx(0.005)
    tuner.step(torch.tensor([600.0, 800.0]))  # h = +1e5: clipped at the upper bounds
    assert tuner.alpha == pytest.approx(3.0) and tuner.beta == pytest.approx(0.5)


def test_fedhyper_schedulers_work_alone_and_scale_the_server_rate():
    from fedhpo_core.aggregators import ServerSettings
    from fedhpo_core.tuners.fedhyper import FedHyper

    server = ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3)
    weights = torch.zeros(2)

    def upload(values):
        return [type("U", (), {"weights": torch.tensor(values), "num_samples": 1})()]

    for schedulers, moves_alpha, moves_beta in [(("global",), True, False), (("server_local",), False, True)]:
        tuner = FedHyper(ClientConfig(lr=0.05), schedulers)
        tuner.server_settings(server, weights, upload([0.3, 0.4]))
        settings = tuner.server_settings(server, weights, upload([0.6, 0.8]))
        assert (tuner.alpha != 1.0) == moves_alpha and (tuner.beta != 0.05) == moves_beta
        assert settings.lr == pytest.approx(tuner.alpha if moves_alpha else 1.0)
        assert tuner.configure(3, [0])[0].lr == pytest.approx(tuner.beta)
    with pytest.raises(ValueError, match="schedulers"):
        FedHyper(ClientConfig(), ("server_side",))


def test_fedhyper_client_side_scheduler_matches_a_hand_written_loop():
    from fedhpo_core.client import ClientData, train_locally

    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 4, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    data = ClientData.of(x, y, x[:0], y[:0])
    start = SPEC.initial_weights(0)
    delta = torch.randn(SPEC.size, generator=generator) * 0.05
    config = ClientConfig(lr=0.5, batch_size=16, local_epochs=5, lr_hypergradient=True)
    model = load_flat_weights(SPEC.build(), start)
    train_locally(model, data, config, torch.Generator().manual_seed(0), global_update=delta, clients_in_round=4)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    # By hand: full-batch gradient descent, the rate rescaled after every step from the second on.
    reference = load_flat_weights(SPEC.build(), start)
    lr, multiplier, previous = 0.5, 1.0, delta
    for step_number in range(5):
        before = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
        step = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]) - before
        if step_number >= 1:
            gamma = min(1.1, 1 + 0.1 * float(step @ delta) / 4 + float(step @ previous))
            multiplier = min(10.0, max(0.1, gamma * multiplier))
            lr = 0.5 * multiplier
            previous = step
    assert torch.allclose(got, torch.cat([p.detach().reshape(-1) for p in reference.parameters()]), atol=1e-6)
    assert lr != 0.5  # the schedule moved the rate


def test_without_a_global_update_the_client_side_scheduler_is_plain_sgd():
    from fedhpo_core.client import ClientData, train_locally

    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    data = ClientData.of(x, y, x[:0], y[:0])
    runs = []
    for hyper in (True, False):
        model = load_flat_weights(SPEC.build(), SPEC.initial_weights(0))
        config = ClientConfig(lr=0.1, batch_size=8, local_epochs=3, lr_hypergradient=hyper)
        train_locally(model, data, config, torch.Generator().manual_seed(0))
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(*runs)  # the first round has no previous global update
