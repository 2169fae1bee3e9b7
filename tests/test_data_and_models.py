import pickle

import numpy as np
import pytest
import torch

from fedhpo_core.data import DATASETS, load_dataset
from fedhpo_core.models import MODELS, ModelSpec, flat_weights, load_flat_weights


def test_digits_sizes_match_the_static_spec_and_are_standardized():
    digits = load_dataset("digits", "unused")
    assert len(digits.y_train) == DATASETS["digits"].num_train
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.input_shape == (1, 8, 8)
    assert abs(float(digits.x_train.mean())) < 0.1 and abs(float(digits.x_train.std()) - 1) < 0.1


def test_mnist_and_fashion_mnist_read_from_torchvision_layout(shared_data):
    for name in ("mnist", "fashion_mnist"):
        data = load_dataset(name, shared_data)
        assert data.x_train.shape == (60_000, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
        assert len(data.y_train) == DATASETS[name].num_train
        assert set(data.y_train.unique().tolist()) == set(range(10))


def test_cifar10_reads_batches_the_test_writes(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def write(name, n):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))

    for i in range(1, 6):
        write(f"data_batch_{i}", 4)
    write("test_batch", 3)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))
    # Made-up files cannot match torchvision's MD5 sums of the real archive.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)

    data = DATASETS["cifar10"].load(str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.y_train.dtype == torch.int64
    model = ModelSpec("cnn", data.input_shape, 10).build()
    assert model(data.x_train).shape == (20, 10)


def test_missing_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="mnist is not in torchvision's layout"):
        DATASETS["mnist"].load(str(tmp_path))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_model_takes_every_input_shape(name, shape):
    spec = ModelSpec(name, shape, 10)
    assert spec.build()(torch.zeros(2, *shape)).shape == (2, 10)
    assert len(spec.initial_weights(0)) == spec.size


def test_mlp_is_the_papers_one_hidden_layer_of_128():
    assert ModelSpec("mlp", (1, 28, 28), 10).size == 784 * 128 + 128 + 128 * 10 + 10


def test_flat_weights_round_trip_without_aliasing():
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    weights = spec.initial_weights(0)
    model = load_flat_weights(spec.build(), weights)
    assert torch.equal(flat_weights(model), weights)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(spec.initial_weights(0), weights)  # the vector was copied, not shared
    assert not torch.equal(spec.initial_weights(1), weights)


def test_a_labelled_torch_dataset_becomes_tensors_with_its_outputs_counted():
    from torch.utils.data import TensorDataset

    from fedhpo_core.data import Dataset

    x, labels = torch.arange(30.0).view(10, 3), torch.tensor([0, 1, 2, 4, 0, 1, 2, 4, 0, 1])
    data = Dataset.of("toy", TensorDataset(x, labels), TensorDataset(x[:2], labels[:2]))
    assert torch.equal(data.x_train, x) and torch.equal(data.y_train, labels) and data.outputs == 5
    assert data.classification and data.num_classes == 5 and data.input_shape == (3,)
    regression = Dataset.of("toy", TensorDataset(x, x[:, 0]), TensorDataset(x[:2], x[:2, 0]))
    assert not regression.classification and regression.outputs == 1 and regression.num_classes == 0
