"""The upload compressors against hand-computed values: byte counts, QSGD's unbiasedness and
variance bound (Alistarh et al. 2017, Lemma 3.1), top-k's magnitudes and error feedback's mass."""

import math

import numpy as np
import pytest
import torch

from fedhpo_core.compression import QSGD, Cast, TopK, Uncompressed, check_compression, compressor_of
from fedhpo_core.errors import SettingsError
from fedhpo_core.settings import ClientConfig


def generators(n: int, first_seed: int = 0) -> list[np.random.Generator]:
    return [np.random.default_rng(first_seed + i) for i in range(n)]


def test_payload_bytes_are_exact_for_a_known_size():
    assert Uncompressed().payload_bytes(1000) == 4000
    assert QSGD(bits=4, bucket=512).payload_bytes(1000) == 625 + 4 * 2  # ceil(1000 * 5 / 8) + a norm per bucket
    assert QSGD(bits=1, bucket=1000).payload_bytes(3) == 1 + 4  # ceil(6 / 8) bytes
    assert TopK(0.01).payload_bytes(1000) == 80  # k = 10, value + index
    assert TopK(0.001).payload_bytes(10) == 8  # k = max(1, ceil(0.01)) = 1
    assert TopK(1e-12).payload_bytes(10) == 8  # at least one coordinate, however small the fraction
    assert TopK(0.07).payload_bytes(100) == 56  # k = 7, not ceil(7.000000000000001) = 8
    assert Cast(16).payload_bytes(1000) == 2000
    assert Cast(8, bucket=512).payload_bytes(1000) == 1000 + 8


def qsgd_many(x: torch.Tensor, quantizer: QSGD, draws: int) -> torch.Tensor:
    return quantizer.compress(x.expand(draws, -1), generators(draws))


def bucket_norms_squared(x: torch.Tensor, bucket: int) -> torch.Tensor:
    return torch.stack([chunk.square().sum() for chunk in x.split(bucket)])


def test_qsgd_is_unbiased():
    x = torch.randn(300, generator=torch.Generator().manual_seed(7))
    mean = qsgd_many(x, QSGD(bits=4, bucket=128), 10_000).mean(dim=0)
    assert float((mean - x).norm() / x.norm()) < 0.01


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qsgd_variance_is_within_lemma_3_1s_bound(bits):
    x = torch.randn(300, generator=torch.Generator().manual_seed(7))
    q = qsgd_many(x, QSGD(bits=bits, bucket=128), 10_000)
    s = 2**bits - 1
    lengths = torch.tensor([128.0, 128.0, 44.0])  # the last bucket is shorter
    bound = (torch.minimum(lengths / s**2, lengths.sqrt() / s) * bucket_norms_squared(x, 128)).sum()
    variance = (q - x).square().sum(dim=1).mean()
    assert float(variance) <= float(bound)
    # the exact variance: (||v_b|| / s)^2 p (1 - p) a coordinate, p the fractional part of s|v_i|/||v_b||
    norms = bucket_norms_squared(x, 128).sqrt().repeat_interleave(lengths.long())
    p = torch.frac(s * x.abs() / norms)
    assert float(variance) == pytest.approx(float(((norms / s) ** 2 * p * (1 - p)).sum()), rel=0.05)


def test_qsgd_values_are_signed_levels_of_the_bucket_norm():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    x[200:300] = 0  # a zero bucket sends zeros
    q = QSGD(bits=3, bucket=100).compress(x.unsqueeze(0), generators(1))[0]
    s = 7
    norms = x.view(10, 100).norm(dim=1).repeat_interleave(100)
    levels = torch.where(norms > 0, q.abs() * s / norms, 0.0)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().min() >= 0 and levels.round().max() <= s
    assert torch.all((q == 0) | (q.sign() == x.sign()))
    assert torch.all(q[200:300] == 0)


def test_qsgd_hand_example_rounds_up_with_the_right_probability():
    x = torch.tensor([3.0, -4.0])  # one bucket, norm 5; s = 1
    q = qsgd_many(x, QSGD(bits=1, bucket=2), 10_000)
    assert set(q[:, 0].tolist()) <= {0.0, 5.0}
    assert set(q[:, 1].tolist()) <= {0.0, -5.0}
    assert abs(float((q[:, 0] == 5).float().mean()) - 3 / 5) < 0.02
    assert abs(float((q[:, 1] == -5).float().mean()) - 4 / 5) < 0.02


def test_topk_keeps_the_largest_magnitudes_negatives_included():
    x = torch.tensor([[0.1, -5.0, 2.0, -0.3], [4.0, 0.0, -1.0, -3.0]])
    expected = torch.tensor([[0.0, -5.0, 2.0, 0.0], [4.0, 0.0, 0.0, -3.0]])
    assert torch.equal(TopK(0.5).compress(x, []), expected)
    assert TopK.error_feedback and not QSGD.error_feedback and not Cast.error_feedback


def test_error_feedback_conserves_mass():
    topk = TopK(0.05)
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(3, 200, generator=g) for _ in range(20)]
    residuals = [None] * 3
    sent_total = torch.zeros(3, 200)
    for x in inputs:
        sent = x.clone()
        residuals = topk.with_feedback_(sent, residuals)
        assert int((sent != 0).sum(dim=1).max()) <= 10  # k = ceil(0.05 * 200)
        sent_total += sent
    residual = torch.stack(residuals)
    assert torch.allclose(sent_total + residual, torch.stack(inputs).sum(dim=0), atol=1e-5)
    assert residual.abs().sum() > 0  # something was held back


def test_float16_cast_round_trips_within_half_an_ulp():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5)) * 100
    x = torch.where(x.abs() < 2**-14, 1.0, x)  # float16's normal range
    y = Cast(16).compress(x, [])
    assert y.dtype == torch.float32
    assert float(((y - x).abs() / x.abs()).max()) <= 2**-11
    assert float(((y - x).abs() / x.abs()).max()) > 0  # it does lose precision
    assert torch.isinf(Cast(16).compress(torch.tensor([[1e6, -1e6]]), [])).all()


def test_int8_cast_is_within_half_a_step_of_each_buckets_scale():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(6))
    x[1, 64:128] = 0  # a zero bucket
    y = Cast(8, bucket=64).compress(x, [])
    for row in range(2):
        for start in range(0, 1000, 64):  # the last bucket has 40 values
            v, decoded = x[row, start : start + 64], y[row, start : start + 64]
            scale = float(v.abs().max()) / 127
            if scale == 0:
                assert torch.all(decoded == 0)
                continue
            assert float((decoded - v).abs().max()) <= scale / 2 * (1 + 1e-5)
            q = decoded / scale
            assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= 127 + 1e-4


@pytest.mark.parametrize("compressor", [QSGD(bits=2, bucket=64), TopK(0.1), Cast(8, bucket=64)])
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch(compressor):
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g) * 10
    both = compressor.compress(torch.stack([a, b]), generators(2, first_seed=100))
    alone = compressor.compress(a.unsqueeze(0), generators(1, first_seed=100))
    assert torch.equal(both[0], alone[0])
    assert torch.equal(both[1], compressor.compress(b.unsqueeze(0), generators(1, first_seed=101))[0])
    other = compressor.compress(a.unsqueeze(0), generators(1, first_seed=200))
    assert torch.equal(alone, other) != isinstance(compressor, QSGD)  # only QSGD draws anything


@pytest.mark.parametrize(
    "scheme, bits, bucket, fraction, words",
    [
        ("gzip", 8, 512, 0.01, "none, qsgd, topk, cast"),
        ("qsgd", 0, 512, 0.01, "1..16"),
        ("qsgd", 17, 512, 0.01, "1..16"),
        ("cast", 0, 512, 0.01, "1..16"),
        ("cast", 32, 512, 0.01, "1..16"),
        ("qsgd", 4, 0, 0.01, "compression_bucket"),
        ("topk", 8, 512, 0.0, "(0, 1]"),
        ("topk", 8, 512, 1.5, "(0, 1]"),
        ("topk", 8, 512, math.nan, "(0, 1]"),
    ],
)
def test_bad_settings_are_refused_in_one_line(scheme, bits, bucket, fraction, words):
    with pytest.raises(SettingsError) as refused:
        check_compression(scheme, bits, bucket, fraction)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_the_compressor_a_client_config_names():
    assert compressor_of(ClientConfig()) == Uncompressed()
    assert compressor_of(ClientConfig(compression="qsgd", compression_bits=4, compression_bucket=256)) == QSGD(4, 256)
    assert compressor_of(ClientConfig(compression="topk", topk_fraction=0.1)) == TopK(0.1)
    assert compressor_of(ClientConfig(compression="cast", compression_bits=16)) == Cast(16, 512)
    for scheme in ("none", "qsgd", "topk", "cast"):  # every scheme runs with the defaults
        check_compression(scheme, 8, 512, 0.01)
    # A search space gives cast the bits it gives qsgd: 8-bit up to 8, 16-bit above.
    assert compressor_of(ClientConfig(compression="cast", compression_bits=4)) == Cast(8, 512)
    assert compressor_of(ClientConfig(compression="cast", compression_bits=12)) == Cast(16, 512)
    with pytest.raises(SettingsError, match="cast takes 8 or 16 bits"):
        Cast(4)


@pytest.mark.parametrize(
    "rows, size, fraction, ties",
    [
        (7, 1000, 0.01, False),
        (5, 1013, 0.02, False),
        (3, 997, 0.005, True),
        (4, 50_000, 0.001, True),
        (2, 64, 0.1, False),
    ],
)
def test_grouped_selection_keeps_exactly_the_largest_magnitudes(rows, size, fraction, ties):
    """`TopK.largest` (groups, then candidates) picks what torch.topk over all magnitudes picks,
    up to which of equal magnitudes; with many ties, a tail of coordinates outside the groups and
    planted large values in one group."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(rows, size, generator=g)
    if ties:
        x = x.mul(3).round()  # a handful of distinct magnitudes
    x[0, 10:20] = torch.arange(100.0, 110.0) * -1  # ten large ones near each other
    x[-1, -1] = 1000.0  # the largest, in the tail beyond the groups where size % c > 0
    topk = TopK(fraction)
    count = topk.count(size)
    assert math.isqrt(size // count) >= 2  # the grouped path, not plain torch.topk
    picked = topk.largest(x)
    assert picked.shape == (rows, count)
    assert all(len(set(row.tolist())) == count for row in picked)  # no coordinate twice
    expected = x.abs().topk(count, dim=1).values
    assert torch.equal(x.abs().gather(1, picked).sort(dim=1, descending=True).values, expected)


def test_compress_leaves_its_input_and_compress_in_place_overwrites_it():
    x = torch.randn(3, 700, generator=torch.Generator().manual_seed(4))
    original = x.clone()
    for compressor in (QSGD(4, 128), TopK(0.05), Cast(8, 128), Cast(16)):
        decoded = compressor.compress(x, generators(3))
        assert torch.equal(x, original) and not torch.equal(decoded, x)
        work = x.clone()
        assert compressor.compress_(work, generators(3)) is work
        assert torch.equal(work, decoded)  # the same values either way


def test_top_k_residuals_are_one_tensor_per_client():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(8))
    before = x.clone()
    residuals = TopK(0.1).with_feedback_(x, [None] * 4)
    assert len({r.untyped_storage().data_ptr() for r in residuals}) == 4  # none keeps the batch alive
    assert all(r.untyped_storage().nbytes() == 300 * 4 for r in residuals)
    assert torch.equal(x + torch.stack(residuals), before)
