import numpy as np
import pytest

from fedhpo_core.partition import PARTITIONERS, label_histogram, label_skew, partition_dataset

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def split(partition="iid", clients=10, seed=0, **options):
    return partition_dataset(LABELS, clients, partition, seed, 0.1, 0.2, **options)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_sample_lands_in_exactly_one_place(name):
    p = split(name, alpha=0.3, shards_per_client=2)
    pieces = [p.server_val, *p.client_train, *p.client_val]
    everything = np.concatenate(pieces)
    assert len(everything) == len(LABELS)
    assert np.array_equal(np.sort(everything), np.arange(len(LABELS)))
    assert len(p.server_val) == 100
    assert all(len(t) >= 1 for t in p.client_train)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_partition_other_seed_other(name):
    a, b, c = split(name, seed=3), split(name, seed=3), split(name, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.client_train, b.client_train, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_train, c.client_train, strict=True))


def test_label_skew_grows_as_alpha_shrinks():
    def mean_skew(alpha):
        return np.mean(
            [label_skew(label_histogram(LABELS, split("dirichlet", seed=s, alpha=alpha), 10)) for s in range(5)]
        )

    skews = [mean_skew(alpha) for alpha in (100.0, 1.0, 0.1, 0.01)]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.15 and skews[-1] > 0.7


def test_iid_is_balanced_and_nearly_unskewed():
    p = split("iid")
    sizes = [len(t) + len(v) for t, v in zip(p.client_train, p.client_val, strict=True)]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(label_histogram(LABELS, p, 10)) < 0.2


def test_shards_give_each_client_exactly_k_classes():
    for k in (1, 2, 3):
        histogram = label_histogram(LABELS, split("shards", shards_per_client=k), 10)
        assert ((histogram > 0).sum(axis=1) == k).all()


def test_shards_reject_too_few_clients_for_all_classes():
    with pytest.raises(ValueError, match="shards"):
        split("shards", clients=3, shards_per_client=2)


def test_no_client_is_left_empty_even_with_extreme_skew():
    # 200 clients over 900 samples at alpha 0.001: most clients get no class at all from Dirichlet.
    p = split("dirichlet", clients=200, alpha=0.001)
    assert all(len(t) >= 1 for t in p.client_train)
    assert sum(len(t) + len(v) for t, v in zip(p.client_train, p.client_val, strict=True)) == 900


def test_one_sample_per_client_keeps_it_for_training():
    p = partition_dataset(LABELS[:20], 18, "iid", 0, 0.1, 0.5)
    assert [len(t) for t in p.client_train] == [1] * 18
    assert [len(v) for v in p.client_val] == [0] * 18


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(ValueError, match="clients"):
        partition_dataset(LABELS[:10], 20, "iid", 0, 0.1, 0.1)
