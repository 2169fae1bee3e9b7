"""Compression of the clients' uploads and the bytes each one takes on the wire.

A `Compressor` overwrites k clients' flat update vectors (k, P) with the decoded values the
server sums (`compress_`, in place; `compress` on a copy); `payload_bytes` is the exact size of
one encoded vector (values, indices, scales), what a communication budget counts. The schemes (notes: `../shared/papers/
personalized-fidelity-compression-notes.md`, section 3): QSGD's unbiased stochastic quantization
(Alistarh et al. 2017), top-k sparsification with error feedback (Stich et al. 2018; Karimireddy
et al. 2019), and FederatedScope's casts to float16 or symmetric int8.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedhpo_core.errors import SettingsError

SCHEMES = ("none", "qsgd", "topk", "cast")
FLOAT_BYTES = 4  # a float32 value or scale
INDEX_BYTES = 4  # an int32 coordinate index


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _buckets(x: torch.Tensor, bucket: int) -> list[torch.Tensor]:
    """Views of x (k, P) as (k, buckets, bucket) over its whole buckets and (k, 1, rest) over the
    shorter last one (if any): in-place work on them is work on x, without a padded copy."""
    whole = x.shape[1] // bucket * bucket
    views = [x[:, :whole].unflatten(1, (-1, bucket))] if whole else []
    return views + ([x[:, whole:].unsqueeze(1)] if whole < x.shape[1] else [])


def _only(x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """x (k, P) zero except at each row's `picked` coordinates (k, count), in place."""
    values = x.gather(1, picked)
    return x.zero_().scatter_(1, picked, values)


class Compressor(ABC):
    """One upload compression scheme; subclasses are frozen dataclasses. The schemes work in place
    on a round's batch of updates (at 100 clients about 10^7 values), so a round allocates no
    extra batch for them (`bench/compression_round.py`)."""

    error_feedback: ClassVar[bool] = False  # whether the client keeps what it did not send (TopK)

    @abstractmethod
    def payload_bytes(self, size: int) -> int:
        """The exact bytes one vector of `size` floats needs on the wire (values, indices, scales)."""

    @abstractmethod
    def compress_(self, x: torch.Tensor, generators: Sequence[np.random.Generator]) -> torch.Tensor:
        """x (k, P), k clients' vectors that the caller owns, overwritten with the decoded values
        the server sums; returns x. Row i's randomness comes only from generators[i] (so a client's
        result does not depend on who else is in the batch); deterministic schemes ignore them."""

    def compress(self, x: torch.Tensor, generators: Sequence[np.random.Generator]) -> torch.Tensor:
        """The decoded values (k, P) for x (k, P), x left as it is."""
        return self.compress_(x.clone(), generators)


@dataclass(frozen=True)
class Uncompressed(Compressor):
    """float32 values as they are."""

    def payload_bytes(self, size):
        return FLOAT_BYTES * size

    def compress_(self, x, generators):
        return x


@dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017, eq. 1) on buckets of `bucket` consecutive coordinates (the last
    one may be shorter), s = 2^bits - 1 levels: Q(v)_i = ||v||_2 sign(v_i) xi_i / s, where xi_i is
    l + 1 with probability s|v_i|/||v|| - l, else l = floor(s|v_i|/||v||). Drawn as the signed
    level floor(a_i + u_i), a_i = s v_i/||v|| and u_i uniform on [0, 1) from the row's generator:
    it is the one unbiased rounding of a_i to its two neighbouring integers, which is eq. 1's
    sign(v_i) xi_i (for a_i < 0 too), with one pass fewer than rounding |a_i| and restoring the
    sign. Unbiased, with E||Q(v) - v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2 for a bucket of n
    (Lemma 3.1). A bucket of norm 0 sends zeros. On the wire: a sign and a level index per value,
    a float32 norm per bucket."""

    bits: int
    bucket: int = 512

    def __post_init__(self):
        check_compression("qsgd", self.bits, self.bucket, 1.0)

    def payload_bytes(self, size):
        return _ceil_div(size * (1 + self.bits), 8) + FLOAT_BYTES * _ceil_div(size, self.bucket)

    def compress_(self, x, generators):
        levels = 2**self.bits - 1
        views = _buckets(x, self.bucket)
        norms = [torch.linalg.vector_norm(v, dim=2, keepdim=True) for v in views]
        for v, norm in zip(views, norms, strict=True):  # a = s v/||v|| (0 in a zero bucket), |a| <= s
            v.mul_(levels / torch.where(norm > 0, norm, 1.0)).clamp_(-levels, levels)
        u = torch.empty(x.shape[1], dtype=torch.float32)  # one client's draws at a time, on the CPU
        for row, generator in zip(x, generators, strict=True):
            generator.random(out=u.numpy(), dtype=np.float32)  # PCG64: 0.02 s for 10^7, torch's 0.03
            row.add_(u.to(row.device))
        x.floor_()
        for v, norm in zip(views, norms, strict=True):
            v.mul_(norm / levels)
        return x


@dataclass(frozen=True)
class TopK(Compressor):
    """The k = max(1, ceil(fraction * size)) coordinates of largest magnitude, zeros elsewhere; on
    the wire a float32 value and an int32 index each. Biased: `with_feedback_` is error feedback
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

    def largest(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (k, count) of each row's largest magnitudes. A row's first c n coordinates form
        n strided groups {j, j + n, ..., j + (c - 1) n}, c about sqrt(P / count); the largest are
        among the count groups of largest maximum and the last P - c n coordinates, since any
        other coordinate has count group maxima at least as large. So torch.topk runs over n
        maxima and about count x c candidates instead of all P magnitudes (at 100 clients, 0.06 s
        a round)."""
        size, count = x.shape[1], self.count(x.shape[1])
        c = math.isqrt(size // count)
        if c < 2:
            return x.abs().topk(count, dim=1, sorted=False).indices
        n = size // c
        groups = x[:, : c * n].unflatten(1, (c, n))
        maxima = torch.maximum(groups.amax(dim=1), groups.amin(dim=1).neg_())
        chosen = maxima.topk(count, dim=1, sorted=False).indices
        offsets = torch.arange(0, c * n, n, device=x.device)
        candidates = (chosen.unsqueeze(2) + offsets).flatten(1)
        tail = torch.arange(c * n, size, device=x.device).expand(x.shape[0], -1)
        candidates = torch.cat([candidates, tail], dim=1)
        best = x.gather(1, candidates).abs_().topk(count, dim=1, sorted=False).indices
        return candidates.gather(1, best)

    def compress_(self, x, generators):
        return _only(x, self.largest(x))

    def with_feedback_(self, x: torch.Tensor, residuals: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """x (k, P) becomes what is sent, v = x + residual chosen from; returns the new residuals,
        v - sent, a tensor per row (so sent + residual = x + old residual; a row's residual holds
        no other client's memory). None is a client with nothing held back."""
        for row, residual in zip(x, residuals, strict=True):
            if residual is not None:
                row.add_(residual.to(row.device))
        picked = self.largest(x)
        unsent = [row.clone().index_fill_(0, chosen, 0.0) for row, chosen in zip(x, picked, strict=True)]
        _only(x, picked)
        return unsent


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

    def compress_(self, x, generators):
        if self.bits == 16:
            return x.copy_(x.to(torch.float16))
        for v in _buckets(x, self.bucket):
            scale = torch.maximum(v.amax(dim=2, keepdim=True), v.amin(dim=2, keepdim=True).neg_()) / 127
            v.div_(torch.where(scale > 0, scale, 1.0)).round_().clamp_(-127, 127).mul_(scale)
        return x


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
