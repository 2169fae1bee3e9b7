import math

import torch
from torch.nn import functional as F

from fedhpo_core.aggregators import ServerSettings
from fedhpo_core.client import ClientData, ClientJob, local_update, train_locally
from fedhpo_core.federation import FederatedData, Federation
from fedhpo_core.models import ModelSpec, flat_weights, load_flat_weights
from fedhpo_core.settings import ClientConfig
from fedhpo_core.tuners import FixedConfig

SPEC = ModelSpec("mlp", (1, 4, 4), 3)


def make_client(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientData.of(x, y, x[:4], y[:4])


def test_fedavg_one_client_one_full_batch_step_equals_plain_sgd():
    client = make_client()
    n = len(client.y_train)
    data = FederatedData((client,), (client.x_val, client.y_val), (client.x_val, client.y_val), SPEC)
    federation = Federation(data, ServerSettings("fedavg", 1.0, 0.9, 0.99, 1e-3), participation=1.0, seed=7)
    config = ClientConfig(lr=0.3, batch_size=n, local_epochs=1)
    result = federation.run(FixedConfig(config), rounds=1)

    model = load_flat_weights(SPEC.build(), SPEC.initial_weights(7))
    loss = F.cross_entropy(model(client.x_train), client.y_train)
    loss.backward()
    with torch.no_grad():
        expected = torch.cat([(p - 0.3 * p.grad).reshape(-1) for p in model.parameters()])
    assert torch.allclose(result.state.weights, expected, atol=1e-6)
    assert not torch.equal(result.state.weights, SPEC.initial_weights(7))


def test_fedprox_adds_mu_times_distance_to_the_gradient():
    client = make_client()
    n = len(client.y_train)
    start = SPEC.initial_weights(1)
    config = ClientConfig(lr=0.1, batch_size=n, local_epochs=3, mu=0.5)
    job = ClientJob(0, 1, config, seed=0)
    prox = local_update(SPEC, start, client, job).weights

    # By hand: full-batch gradient descent on loss + mu/2 ||w - w0||^2, three steps.
    model = load_flat_weights(SPEC.build(), start)
    anchor = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model.zero_grad()
        objective = F.cross_entropy(model(client.x_train), client.y_train)
        objective = objective + 0.25 * sum(
            ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
        )
        objective.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert torch.allclose(prox, flat_weights(model), atol=1e-6)
    plain = local_update(SPEC, start, client, ClientJob(0, 1, ClientConfig(lr=0.1, batch_size=n, local_epochs=3), 0))
    assert not torch.allclose(prox, plain.weights)


def test_update_reports_samples_and_local_validation():
    client = make_client(n=30)
    update = local_update(SPEC, SPEC.initial_weights(0), client, ClientJob(2, 1, ClientConfig(batch_size=8), 0))
    assert update.client == 2 and update.num_samples == 30 and update.num_val == 4
    assert math.isfinite(update.train_loss) and 0 <= update.val_score <= 1


def test_huge_learning_rate_yields_a_non_finite_loss_not_an_exception():
    client = make_client()
    model = load_flat_weights(SPEC.build(), SPEC.initial_weights(0))
    loss, _ = train_locally(model, client, ClientConfig(lr=1e12, batch_size=4, local_epochs=5), torch.Generator())
    assert not math.isfinite(loss)
