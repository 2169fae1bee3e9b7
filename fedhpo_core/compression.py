"""Compression of the clients' uploads and the bytes each one takes on the wire.

A `Compressor` takes k clients' flat update vectors (k, P) and returns the decoded values the
server sums; `payload_bytes` is the exact size of one encoded vector (values, indices, scales),
what a communication budget counts. The schemes (notes: `../shared/papers/
personalized-fidelity-compression-notes.md`, section 3): QSGD's unbiased stochastic quantization
(Alistarh et al. 2017), top-k sparsification with error feedback (Stich et al. 2018; Karimireddy
et al. 2019), and FederatedScope's casts to float16 or symmetric int8.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedhpo_core.errors import SettingsError

SCHEMES = ("none", "qsgd", "topk", "cast")
FLOAT_BYTES = 4  # a float32 value or scale
INDEX_BYTES = 4  # an int32 coordinate index


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _buckets(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """x (k, P) zero-padded to a multiple of `bucket` (a copy) and viewed as (k, buckets, bucket)."""
    pad = _ceil_div(x.shape[1], bucket) * bucket - x.shape[1]
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(x.shape[0], -1, bucket)


def _unbucket(buckets: torch.Tensor, size: int) -> torch.Tensor:
    return buckets.reshape(buckets.shape[0], -1)[:, :size]


class Compressor(ABC):
    """One upload compression scheme; subclasses are frozen dataclasses."""

    error_feedback: ClassVar[bool] = False  # whether the client keeps what it did not send (TopK)

    @abstractmethod
    def payload_bytes(self, size: int) -> int:
        """The exact bytes one vector of `size` floats needs on the wire (values, indices, scales)."""

    @abstractmethod
    def compress(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The decoded values (k, P) the server sums for k clients' vectors x (k, P), same dtype and
        device. Row i's randomness comes only from generators[i] (so a client's result does not
        depend on who else is in the batch); deterministic schemes ignore them."""


@dataclass(frozen=True)
class Uncompressed(Compressor):
    """float32 values as they are."""

    def payload_bytes(self, size):
        return FLOAT_BYTES * size

    def compress(self, x, generators):
        return x


@dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017, eq. 1) on buckets of `bucket` consecutive coordinates (the last
    one may be shorter), s = 2^bits - 1 levels: Q(v)_i = ||v||_2 sign(v_i) xi_i / s, where xi_i is
    l + 1 with probability s|v_i|/||v|| - l, else l = floor(s|v_i|/||v||) (drawn as
    floor(s|v_i|/||v|| + u_i), u_i uniform on [0, 1), the row's generator's). Unbiased, with
    E||Q(v) - v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2 for a bucket of n (Lemma 3.1). A bucket of norm
    0 sends zeros. On the wire: a sign and a level index per value, a float32 norm per bucket."""

    bits: int
    bucket: int = 512

    def __post_init__(self):
        check_compression("qsgd", self.bits, self.bucket, 1.0)

    def payload_bytes(self, size):
        return _ceil_div(size * (1 + self.bits), 8) + FLOAT_BYTES * _ceil_div(size, self.bucket)

    def compress(self, x, generators):
        levels, size = 2**self.bits - 1, x.shape[1]
        v = _buckets(x, self.bucket)
        u = torch.zeros(v.shape[0], v.shape[1] * v.shape[2], dtype=x.dtype)  # drawn on the CPU
        for row, generator in zip(u, generators, strict=True):
            row[:size].uniform_(generator=generator)
        norms = torch.linalg.vector_norm(v, dim=2, keepdim=True)
        # s|v_i|/||v|| (0 in a zero bucket), at most s even where float rounding says otherwise;
        # in place from here on (a batch is often 10^7 values)
        scaled = v.abs().mul_(levels / torch.where(norms > 0, norms, 1.0)).clamp_max_(levels)
        xi = u.to(x.device).view(v.shape).add_(scaled).floor_()
        return _unbucket(xi.copysign_(v).mul_(norms / levels), size)


@dataclass(frozen=True)
class TopK(Compressor):
    """The k = max(1, ceil(fraction * size)) coordinates of largest magnitude, zeros elsewhere; on
    the wire a float32 value and an int32 index each. Biased: `with_feedback` is error feedback
    (Stich et al. 2018; Karimireddy et al. 2019, EF-SGD Algorithm 2), the client adds what it did
    not send to its next update."""

    fraction: float
    error_feedback: ClassVar[bool] = True

    def __post_init__(self):
        check_compression("topk", 8, 1, self.fraction)

    def count(self, size: int) -> int:
        """k for a vector of `size` (the product rounded to 9 places first, so 0.07 * 100 is 7)."""
        return min(size, max(1, math.ceil(round(self.fraction * size, 9))))

    def payload_bytes(self, size):
        return (FLOAT_BYTES + INDEX_BYTES) * self.count(size)

    def compress(self, x, generators):
        picked = x.abs().topk(self.count(x.shape[1]), dim=1, sorted=False).indices
        return torch.zeros_like(x).scatter_(1, picked, x.gather(1, picked))

    def with_feedback(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sent, new residual) for updates x and the residuals (k, P) kept from earlier rounds:
        v = x + residual, sent = topk(v), residual = v - sent (so sent + residual = x + old residual)."""
        v = x + residual
        picked = v.abs().topk(self.count(v.shape[1]), dim=1, sorted=False).indices
        sent = torch.zeros_like(v).scatter_(1, picked, v.gather(1, picked))
        return sent, v.scatter_(1, picked, 0.0)  # what was not sent, in place of v


@dataclass(frozen=True)
class Cast(Compressor):
    """FederatedScope's reduced precision. 16 bits: a round trip through float16 (2 bytes a value);
    a value beyond float16's range (|v| >= 65520) becomes inf, and the federation then leaves that
    upload out as non-finite. 8 bits: symmetric uniform int8 per bucket, scale = max|v| / 127,
    q = round(v / scale) in [-127, 127], decoded q * scale (a byte a value and a float32 scale per
    bucket); a zero bucket sends zeros."""

    bits: int
    bucket: int = 512

    def __post_init__(self):
        check_compression("cast", self.bits, self.bucket, 1.0)
        if self.bits not in (8, 16):
            raise SettingsError(f"cast takes 8 or 16 bits, got {self.bits}")

    def payload_bytes(self, size):
        if self.bits == 16:
            return 2 * size
        return size + FLOAT_BYTES * _ceil_div(size, self.bucket)

    def compress(self, x, generators):
        if self.bits == 16:
            return x.to(torch.float16).to(x.dtype)
        v = _buckets(x, self.bucket)
        scale = torch.linalg.vector_norm(v, ord=math.inf, dim=2, keepdim=True) / 127
        q = (v / torch.where(scale > 0, scale, 1.0)).round_().clamp_(-127, 127)
        return _unbucket(q.mul_(scale), x.shape[1])


def check_compression(scheme: str, bits: int, bucket: int, fraction: float) -> None:
    """Refuse settings no compressor can run with (SettingsError, a one-line message)."""
    if scheme not in SCHEMES:
        raise SettingsError(f"unknown compression {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme in ("qsgd", "cast") and not 1 <= bits <= 16:
        raise SettingsError(f"{scheme} compression_bits must be in 1..16, got {bits}")
    if bucket < 1:
        raise SettingsError(f"compression_bucket must be >= 1, got {bucket}")
    if not 0 < fraction <= 1:
        raise SettingsError(f"topk_fraction must be in (0, 1], got {fraction}")


def compressor_of(config) -> Compressor:
    """The compressor a ClientConfig (or anything with fields compression, compression_bits,
    compression_bucket, topk_fraction) names."""
    scheme, bits, bucket = config.compression, config.compression_bits, config.compression_bucket
    check_compression(scheme, bits, bucket, config.topk_fraction)
    if scheme == "qsgd":
        return QSGD(bits, bucket)
    if scheme == "topk":
        return TopK(config.topk_fraction)
    if scheme == "cast":  # any bits a search space gives qsgd: 8-bit up to 8, else 16-bit
        return Cast(8 if bits <= 8 else 16, bucket)
    return Uncompressed()
