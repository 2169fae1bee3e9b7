"""Simulated devices and the postprocessor chain: round times by hand, dropouts, stragglers and
non-finite uploads left out of an aggregate that stays correct."""

import math

import numpy as np
import pytest
import torch

from fedhpo_core.aggregators import weighted_mean
from fedhpo_core.data import load_dataset
from fedhpo_core.devices import Devices, Profiles, profiles_of
from fedhpo_core.federation import FederatedData, Federation, partition_of
from fedhpo_core.postprocess import DropNonFinite, apply_chain
from fedhpo_core.settings import ClientConfig, SettingsError, TrainSettings
from fedhpo_core.trial import system_objectives
from fedhpo_core.tuners import FixedConfig, PerClientConfig

# Three devices: 100, 50 and 10 samples/s; 8 and 4 and 1 Mbit/s up, twice that down; always online.
SMALL = Profiles(np.array([100.0, 50.0, 10.0]), np.array([8.0, 4.0, 1.0]), np.array([16.0, 8.0, 2.0]), np.ones(3))
MODEL_BYTES = 1_000_000  # 8 Mbit


def test_a_clients_round_time_by_hand():
    seconds = SMALL.seconds([0, 1, 2], samples=[200, 100, 50], epochs=[1, 2, 1], model_bytes=MODEL_BYTES)
    # down 8/16 + compute 200/100 + up 8/8; down 8/8 + 2*100/50 + 8/4; 8/2 + 50/10 + 8/1
    assert seconds.tolist() == pytest.approx([0.5 + 2 + 1, 1 + 4 + 2, 4 + 5 + 8])


def test_the_round_waits_for_the_slowest_or_stops_at_the_deadline():
    samples, epochs = {0: 200, 1: 100, 2: 50}, {0: 1, 1: 2, 2: 1}
    waiting = Devices(SMALL).plan(1, [0, 1, 2], samples, epochs, MODEL_BYTES)
    assert waiting.uploading == (0, 1, 2) and waiting.seconds == pytest.approx(17.0)
    deadline = Devices(SMALL, deadline_s=10.0).plan(1, [0, 1, 2], samples, epochs, MODEL_BYTES)
    assert deadline.uploading == (0, 1) and deadline.late == (2,) and deadline.seconds == 10.0
    early = Devices(SMALL, deadline_s=20.0).plan(1, [0, 1, 2], samples, epochs, MODEL_BYTES)
    assert early.late == () and early.seconds == pytest.approx(17.0)  # all in: no need to wait for D


def test_dropouts_are_seeded_per_round_at_the_configured_rate():
    devices = Devices(profiles_of("uniform", 50, 0), dropout=0.3, seed=4)
    clients, samples, epochs = list(range(50)), dict.fromkeys(range(50), 10), dict.fromkeys(range(50), 1)
    plans = [devices.plan(t, clients, samples, epochs, MODEL_BYTES) for t in range(1, 201)]
    assert plans == [devices.plan(t, clients, samples, epochs, MODEL_BYTES) for t in range(1, 201)]
    rate = np.mean([len(p.dropped) / 50 for p in plans])
    assert rate == pytest.approx(0.3, abs=0.02) and len({p.dropped for p in plans}) == 200
    assert all(not set(p.dropped) & set(p.uploading) for p in plans)


def test_presets_are_seeded_and_spread_as_documented():
    uniform = profiles_of("uniform", 5, 0)
    assert set(uniform.speed) == {1000.0} and set(uniform.availability) == {1.0}
    phones = profiles_of("cross-device", 4000, 1)
    assert np.array_equal(phones.speed, profiles_of("cross-device", 4000, 1).speed)
    assert not np.array_equal(phones.speed, profiles_of("cross-device", 4000, 2).speed)
    assert np.median(phones.speed) == pytest.approx(500, rel=0.1)
    assert np.median(phones.upload_mbps) == pytest.approx(2, rel=0.1)
    assert np.median(phones.download_mbps) == pytest.approx(10, rel=0.1)
    assert np.percentile(phones.speed, 90) / np.percentile(phones.speed, 10) > 10
    assert phones.availability.mean() == pytest.approx(0.8, abs=0.02)
    online = Devices(phones, seed=1)
    share = np.mean([len(online.online(t, range(4000))) / 4000 for t in range(1, 21)])
    assert share == pytest.approx(0.8, abs=0.02)


def test_a_non_finite_upload_is_left_out_and_the_mean_is_the_others():
    x = torch.zeros(2)
    uploads = [
        (0, torch.tensor([1.0, 2.0]), 1),
        (1, torch.tensor([math.nan, 0.0]), 5),
        (2, torch.tensor([3.0, 4.0]), 3),
    ]
    mean, kept = apply_chain([DropNonFinite()], x, uploads)
    assert kept == [0, 2] and torch.allclose(mean, torch.tensor([(1 + 9) / 4, (2 + 12) / 4]))
    nothing, none_kept = apply_chain([DropNonFinite()], x, [(1, torch.tensor([math.inf, 0.0]), 5)])
    assert none_kept == [] and torch.equal(nothing, x)


@pytest.fixture(scope="module")
def digits():
    settings = TrainSettings(clients=6, participation=1.0)
    data = FederatedData.build(load_dataset("digits", settings.data_root), partition_of(settings.data), "mlp")
    return settings, data


def test_a_client_that_diverges_is_left_out_and_the_round_goes_on(digits):
    settings, data = digits
    configs = [ClientConfig(lr=0.05)] * 6
    configs[2] = ClientConfig(lr=1e38)  # its update overflows
    reports = []
    result = Federation.of(data, settings).run(PerClientConfig(configs), 3, observe=lambda r, _: reports.append(r))
    assert not result.diverged and result.state.round == 3
    assert all(r.left_out == (2,) for r in reports)
    first = reports[0]
    kept = [u for u in first.updates if u.client != 2]
    by_hand = weighted_mean([u.weights for u in kept], [u.num_samples for u in kept])
    assert torch.allclose(first.weights_after, by_hand, atol=1e-6)
    assert math.isfinite(first.train_loss)  # the round's metrics are the aggregated clients'


def test_every_upload_non_finite_is_a_diverged_run(digits):
    settings, data = digits
    result = Federation.of(data, settings).run(FixedConfig(ClientConfig(lr=1e38)), 3)
    assert result.diverged and result.diverged_round == 1


def test_dropouts_and_stragglers_are_not_aggregated_and_time_adds_up(digits):
    _, data = digits
    settings = TrainSettings(clients=6, devices="cross-device", dropout=0.3, deadline_s=1.0, seed=2)
    reports = []
    result = Federation.of(data, settings).run(FixedConfig(ClientConfig()), 6, observe=lambda r, _: reports.append(r))
    assert result.state.round == 6 and not result.diverged
    assert any(r.plan.dropped for r in reports) and any(r.plan.late for r in reports)
    for report in reports:
        assert set(report.clients) == set(report.plan.uploading)  # only the in-time uploads trained and count
        assert not set(report.clients) & (set(report.plan.dropped) | set(report.plan.late))
        assert report.plan.seconds <= 1.0
        downloads = len(report.configs)  # every participant got the model, a dropout or late one too
        assert report.bytes_sent == (downloads + len(report.updates)) * data.spec.size * 4
        if report.updates:
            by_hand = weighted_mean([u.weights for u in report.updates], [u.num_samples for u in report.updates])
            assert torch.allclose(report.weights_after, by_hand, atol=1e-6)
    assert result.state.sim_time_s == pytest.approx(sum(r.plan.seconds for r in reports))
    assert [r.sim_time_s for r in reports] == pytest.approx(np.cumsum([r.plan.seconds for r in reports]).tolist())


def test_time_to_target_is_the_simulated_time_of_the_first_round_that_reaches_it(digits):
    settings, data = digits
    reports = []
    Federation.of(data, settings).run(FixedConfig(ClientConfig()), 5, observe=lambda r, _: reports.append(r))
    target = reports[2].val_score
    first = next(r for r in reports if r.val_score >= target)
    costs = system_objectives(reports, target_acc=target)
    assert costs["time_to_target_s"] == first.sim_time_s and costs["sim_time_s"] == reports[-1].sim_time_s
    assert system_objectives(reports, target_acc=1.0)["time_to_target_s"] == math.inf
    assert "time_to_target_s" not in system_objectives(reports)


def test_device_settings_are_checked():
    with pytest.raises(SettingsError, match="unknown devices 'phones'"):
        TrainSettings(devices="phones")
    with pytest.raises(SettingsError, match="dropout must be in"):
        TrainSettings(dropout=1.0)
    with pytest.raises(SettingsError, match="deadline_s must be >= 0"):
        TrainSettings(deadline_s=-1.0)
