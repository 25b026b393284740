"""Shared + residual (SR) encoding of expert parameters for the in-domain gather.

An expert is sent as the top-k entries (by magnitude) of its residual ``expert - shared``, where
``shared`` is a basis every rank holds identically (the mean of the layer's experts). The receiver
rebuilds ``shared + scatter(residual entries)``.

Byte accounting (honest): each kept entry costs its value (the parameter dtype's size) plus a
4-byte int32 index. For a compression ratio CR over P parameters of ``b`` bytes each, the encoder
keeps ``k = floor(P * b / (CR * (b + 4)))`` entries, so encoded bytes <= dense bytes / CR. When that
would not be smaller than the dense expert (CR <= 1 + 4/b, e.g. CR = 1), the expert is sent dense,
so CR = 1 is exactly uncompressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INDEX_BYTES = 4


def kept_entries(ratio: float, p: int, value_bytes: int) -> int | None:
    """Entries kept per expert of ``p`` parameters at ``ratio``; None = send the expert dense."""
    k = math.floor(p * value_bytes / (ratio * (value_bytes + INDEX_BYTES)))
    if ratio <= 1.0 or k * (value_bytes + INDEX_BYTES) >= p * value_bytes:
        return None
    return max(1, k)


def encoded_bytes(ratio: float, p: int, value_bytes: int, n: int = 1) -> int:
    """Bytes of ``n`` encoded experts (values + int32 indices, or dense)."""
    k = kept_entries(ratio, p, value_bytes)
    return n * (p * value_bytes if k is None else k * (value_bytes + INDEX_BYTES))


@dataclass(frozen=True)
class SRCodec:
    """Top-k residual codec for ``n`` experts of ``p`` parameters each, at ratio ``ratio``."""

    ratio: float
    p: int
    dtype: torch.dtype

    @property
    def value_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def k(self) -> int | None:
        """Entries kept per expert, or None when the expert goes dense."""
        return kept_entries(self.ratio, self.p, self.value_bytes)

    def encoded_bytes(self, n: int) -> int:
        return encoded_bytes(self.ratio, self.p, self.value_bytes, n)

    def encode(self, experts: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """[n, p] experts -> one uint8 buffer (values then int32 indices; dense values if k is None)."""
        if self.k is None:
            return experts.detach().contiguous().view(torch.uint8).reshape(-1)
        residual = experts.detach() - shared
        idx = residual.abs().topk(self.k, dim=1).indices
        vals = residual.gather(1, idx)
        return torch.cat([vals.contiguous().view(torch.uint8).reshape(-1),
                          idx.to(torch.int32).contiguous().view(torch.uint8).reshape(-1)])

    def decode(self, buf: torch.Tensor, n: int, shared: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: [n, p] experts (dense shared + scattered residual entries)."""
        if self.k is None:
            return buf.view(self.dtype).view(n, self.p)
        split = n * self.k * self.value_bytes
        vals = buf[:split].view(self.dtype).view(n, self.k)
        idx = buf[split:].view(torch.int32).view(n, self.k).long()
        out = shared.expand(n, self.p).clone()
        return out.scatter_add_(1, idx, vals)
