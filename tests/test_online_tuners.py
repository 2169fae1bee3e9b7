"""The mathematical core of the round-level methods, on problems small enough to check by hand."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedhpo_core.client import ClientUpdate
from fedhpo_core.federation import RoundReport
from fedhpo_core.models import ModelSpec, load_flat_weights
from fedhpo_core.search.space import SearchSpace
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners.fedex import FedEx
from fedhpo_core.tuners.fedtune import FedTune, mixture_credits, update_credits
from fedhpo_core.tuners.policy import Factors
from fedhpo_core.tuners.stepwise import Stepwise

CONFIGS = [ClientConfig(lr=lr) for lr in (0.1, 0.01, 0.001)]
VALUES = [{"lr": c.lr} for c in CONFIGS]
SPEC = ModelSpec("mlp", (1, 4, 4), 3)


def losses(before: float, after: float) -> dict[str, float]:
    """A client's uploaded statistics of FedEx and FedTune: its validation loss before and after."""
    return {"val_loss_before": before, "val_loss_after": after}


def fedex_report(draws_losses: dict, sizes: dict, before: dict | None = None):
    """A round report holding only what FedEx reads: clients' local validation losses and sizes."""
    before = before or {}
    updates = [
        ClientUpdate(c, torch.zeros(1), 1, 0.0, loss, 0.0, sizes[c], statistics=losses(before.get(c, math.nan), loss))
        for c, loss in draws_losses.items()
    ]
    return RoundReport(1, {}, tuple(updates), 0.0, 0.0, torch.zeros(1), torch.zeros(1))


def test_fedex_paper_step_matches_a_hand_computed_exponentiated_gradient_step():
    fedex = FedEx(CONFIGS, VALUES, seed=0, **FedEx.PAPER)
    fedex.draws = {0: (0,), 1: (0,), 2: (2,)}  # two clients drew config 0, one drew config 2
    theta = np.full(3, 1 / 3)
    losses, sizes = {0: 0.5, 1: 1.0, 2: 2.0}, {0: 10, 1: 30, 2: 60}
    # By hand, baseline 0 in the first round: g_0 = (0.1 * 0.5 + 0.3 * 1.0) / (1/3), g_2 = 0.6 * 2.0 / (1/3)
    gradient = np.array([(0.05 + 0.3) * 3, 0.0, 1.2 * 3])
    eta = math.sqrt(2 * math.log(3))  # eta_1 = sqrt(2 log k) / sqrt(1)
    expected = theta * np.exp(-eta * gradient)
    expected /= expected.sum()
    fedex.observe(fedex_report(losses, sizes))
    assert fedex.theta == pytest.approx(expected)
    assert fedex.previous == pytest.approx(0.1 * 0.5 + 0.3 * 1.0 + 0.6 * 2.0)
    # With no baseline in the first round every drawn configuration's loss counted against it.
    assert fedex.chosen() == {"lr": 0.01}
    # The second step subtracts the first round's mean loss: a loss above it lowers theta_0.
    fedex.draws = {0: (0,)}
    theta = fedex.theta
    fedex.observe(fedex_report({0: 1.0}, {0: 1}))
    step = eta / math.sqrt(2) * (1.0 - 1.55) / theta[0]
    assert np.log(fedex.theta / fedex.theta[1]) == pytest.approx(np.log(theta / theta[1]) - [step, 0, 0])


def test_fedex_signals_are_after_difference_and_log_ratio():
    update = ClientUpdate(0, torch.zeros(1), 1, 0.0, 0.5, 0.0, 4, statistics=losses(2.0, 0.5))
    signals = {s: FedEx(CONFIGS, VALUES, 0, signal=s).signal_of(update) for s in ("after", "difference", "log-ratio")}
    assert signals == pytest.approx({"after": 0.5, "difference": -1.5, "log-ratio": math.log(0.25)})


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


def test_fedtune_update_credit_equals_a_finite_difference_of_the_aggregate_validation_loss():
    uploads = random_uploads(3)
    start = torch.randn(SPEC.size, generator=torch.Generator().manual_seed(2)) * 0.5
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    credits = update_credits(SPEC, start, uploads, x, y)
    shares = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    model = SPEC.build().double()

    def loss(ones):
        weights = start.double() + sum(
            s * o * (w.double() - start.double()) for s, o, (w, _) in zip(shares, ones, uploads, strict=True)
        )
        return F.cross_entropy(load_flat_weights(model, weights)(x.double()), y).item()

    step = 1e-5
    for i in range(3):
        up, down = [0.0] * 3, [0.0] * 3
        up[i], down[i] = step, -step
        assert credits[i] == pytest.approx(-(loss(up) - loss(down)) / (2 * step), rel=1e-3, abs=1e-6)


def test_one_paper_fedtune_step_is_eq_11_on_the_logits():
    x, y = torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.int64)
    fedtune = FedTune(
        CONFIGS, VALUES, clients=1, spec=SPEC, server_val=(x, y), seed=0, **(FedTune.PAPER | {"eta": 0.5})
    )
    fedtune.draws = {0: (1,)}
    fedtune.update(fedtune.advantages({0: 0.3}))
    # a = 0 + 0.5 * 0.3 * (onehot(1) - 1/3): the drawn entry rises by 0.1, the others fall by 0.05.
    assert fedtune.personal[0][0] == pytest.approx([-0.05, 0.1, -0.05])
    assert fedtune.pi[0] == pytest.approx(np.exp([-0.05, 0.1, -0.05]) / np.exp([-0.05, 0.1, -0.05]).sum())


def test_a_grid_of_candidates_is_drawn_one_setting_at_a_time():
    values = [{"lr": lr, "weight_decay": wd} for lr in (0.1, 0.01) for wd in (0.0, 0.1, 0.01)]
    factors = Factors(values, factorized=True)
    assert factors.factorized and factors.sizes == [2, 3]
    assert values[factors.candidate((1, 2))] == {"lr": 0.01, "weight_decay": 0.01}
    probabilities = factors.probabilities([np.array([0.25, 0.75]), np.array([0.5, 0.3, 0.2])])
    assert probabilities.sum() == pytest.approx(1.0) and probabilities[factors.candidate((1, 0))] == pytest.approx(
        0.375
    )
    assert not Factors(values[:5], factorized=True).factorized  # not a full grid: one categorical
    assert Factors(values, factorized=False).sizes == [6]


def stepwise(seconds, seed=0, **options):
    return Stepwise(SearchSpace.load(None).parameters("global", 1), ClientConfig(), seconds, 10, seed, **options)


def test_straggler_aware_selection_bounds_round_time_and_everyone_takes_part():
    times = [0.5, 4.0, 1.2, 0.8, 9.0, 0.6, 3.0, 0.7, 2.0, 1.0]
    tuner = stepwise(times)
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
    tuner = stepwise([100] * 4, **Stepwise.PAPER)
    tuner.configure(1, [0, 1])

    class Report:
        val_score, client_val_score, diverged = 0.5, 0.3, False

    tuner.observe(Report)
    assert tuner.feedback == pytest.approx(0.5 * (0.5 - 0.1) + 0.5 * (0.3 - 0.1))  # chance is 0.1 before round 1
    assert tuner.study.trials[0].value == pytest.approx(tuner.feedback)
    tuner.configure(2, [2, 3])
    Report.val_score, Report.client_val_score = 0.6, 0.5
    tuner.observe(Report)
    assert tuner.feedback == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)
    assert tuner.chosen() == tuner.study.trials[0].params  # the larger improvement so far


def test_stepwise_log_error_feedback_is_the_same_for_the_same_error_ratio():
    tuner = stepwise([100] * 4, baseline="none")
    for round, (server, clients) in enumerate([(0.55, 0.55), (0.775, 0.775)], start=1):
        tuner.configure(round, [0, 1])
        report = type("Report", (), {"val_score": server, "client_val_score": clients, "diverged": False})
        tuner.observe(report)
        assert tuner.feedback == pytest.approx(math.log(2))  # the error halves in both rounds
    # With the window baseline the second round is judged against the first: no better, no worse.
    windowed = stepwise([100] * 4)
    for round, accuracy in enumerate([0.55, 0.775], start=1):
        windowed.configure(round, [0, 1])
        windowed.observe(type("Report", (), {"val_score": accuracy, "client_val_score": accuracy, "diverged": False}))
    assert windowed.feedback == pytest.approx(0.0, abs=1e-12)


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
        return [type("U", (), {"weights": torch.tensor(values), "num_samples": 1, "diverged": False})()]

    for schedulers, moves_alpha, moves_beta in [(("global",), True, False), (("server_local",), False, True)]:
        tuner = FedHyper(ClientConfig(lr=0.05), schedulers)
        tuner.server_settings(server, weights, upload([0.3, 0.4]))
        settings = tuner.server_settings(server, weights, upload([0.6, 0.8]))
        assert (tuner.alpha != 1.0) == moves_alpha and (tuner.beta != 0.05) == moves_beta
        assert settings.lr == pytest.approx(tuner.alpha if moves_alpha else 1.0)
        assert tuner.configure(3, [0])[0].lr == pytest.approx(tuner.beta)
        before = (tuner.alpha, tuner.beta)
        tuner.server_settings(server, weights, [])  # a round where no client uploaded: no step
        assert (tuner.alpha, tuner.beta) == before
    with pytest.raises(ValueError, match="schedulers"):
        FedHyper(ClientConfig(), ("server_side",))


def test_fedhyper_client_side_scheduler_matches_a_hand_written_loop():
    from fedhpo_core.client import ClientData, train_locally
    from fedhpo_core.tuners.fedhyper import HypergradientLR

    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 4, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    data = ClientData.of(x, y, x[:0], y[:0])
    start = SPEC.initial_weights(0)
    delta = torch.randn(SPEC.size, generator=generator) * 0.05
    config = ClientConfig(lr=0.5, batch_size=16, local_epochs=5)
    model = load_flat_weights(SPEC.build(), start)
    train_locally(model, data, config, torch.Generator().manual_seed(0), HypergradientLR(delta, clients=4))
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


def test_fedhyper_schedules_clients_from_the_last_global_update_from_the_second_round():
    from fedhpo_core.tuners.fedhyper import FedHyper

    tuner, server_side = FedHyper(ClientConfig(lr=0.1)), FedHyper(ClientConfig(lr=0.1), ("global", "server_local"))
    for fedhyper in (tuner, server_side):
        fedhyper.configure(1, [0, 2, 5])
        assert fedhyper.local_schedule(1, 0) is None  # the first round has no global update
        fedhyper.observe(RoundReport(1, {}, (), 0.0, 0.0, torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])))
        fedhyper.configure(2, [1, 4])
    schedule = tuner.local_schedule(2, 4)
    assert torch.equal(schedule.global_update, torch.tensor([0.5, -1.0])) and schedule.clients == 2
    assert server_side.local_schedule(2, 4) is None
