"""Shared + residual (SR) encoding of expert parameters for the in-domain gather.

An expert is sent as the top-k entries (by magnitude) of its residual ``expert - shared``, where
``shared`` is a basis every rank holds identically (the mean of the layer's experts). The receiver
rebuilds ``shared + scatter(residual entries)``.

Byte accounting (honest): each kept entry costs its value (``value_bytes``: the parameter dtype's
size, or 2 when the values travel as float16/bfloat16) plus its index: 2 bytes (uint16) when the
expert has at most 65 536 parameters, else 4 (int32). For a compression ratio CR over P parameters
of ``b`` bytes each, the encoder keeps ``k = floor(P * b / (CR * (value_bytes + index_bytes)))``
entries, so encoded bytes <= dense bytes / CR. When that would not be smaller than the dense
expert (e.g. CR = 1), the expert is sent dense in its own dtype, so CR = 1 is exactly uncompressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VALUE_DTYPES = {"param": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Names of the residual value precisions (``param``: the parameters' own dtype)."""


def value_bytes(name: str, param_bytes: int) -> int:
    """Bytes of one residual value sent in precision ``name`` (a key of :data:`VALUE_DTYPES`)."""
    dtype = VALUE_DTYPES[name]
    return param_bytes if dtype is None else dtype.itemsize


def index_bytes(p: int) -> int:
    """Bytes of one entry index into an expert of ``p`` parameters: 2 (uint16) or 4 (int32)."""
    return 2 if p <= 1 << 16 else 4


def kept_entries(ratio: float, p: int, param_bytes: int, value_bytes: int | None = None) -> int | None:
    """Entries kept per expert of ``p`` parameters of ``param_bytes`` each at ``ratio`` (values
    sent with ``value_bytes``, default ``param_bytes``); None = send the expert dense."""
    entry = (value_bytes or param_bytes) + index_bytes(p)
    k = math.floor(p * param_bytes / (ratio * entry))
    if ratio <= 1.0 or k * entry >= p * param_bytes:
        return None
    return max(1, k)


def encoded_bytes(ratio: float, p: int, param_bytes: int, n: int = 1, value_bytes: int | None = None) -> int:
    """Bytes of ``n`` encoded experts (values + indices, or dense)."""
    k = kept_entries(ratio, p, param_bytes, value_bytes)
    return n * (p * param_bytes if k is None else k * ((value_bytes or param_bytes) + index_bytes(p)))


def measure_codec_expert_s(codec: SRCodec, n: int, reps: int = 9) -> float:
    """Seconds to encode or decode one expert with ``codec`` on this process: the median over
    ``reps`` of (encode ``n`` experts + decode them) / (2 n), on random experts."""
    from hybridep.probe import median_seconds

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(codec.p, generator=g, dtype=codec.dtype)
    experts = shared + 0.01 * torch.randn(n, codec.p, generator=g, dtype=codec.dtype)
    return median_seconds(lambda: codec.decode(codec.encode(experts, shared), n, shared), reps) / (2 * n)


@dataclass(frozen=True)
class SRCodec:
    """Top-k residual codec for ``n`` experts of ``p`` parameters each, at ratio ``ratio``;
    residual values travel as ``value_dtype`` (None: the parameters' ``dtype``)."""

    ratio: float
    p: int
    dtype: torch.dtype
    value_dtype: torch.dtype | None = None

    @property
    def value_bytes(self) -> int:
        """Bytes of one parameter (the dense unit the ratio is counted against)."""
        return self.dtype.itemsize

    @property
    def _vdtype(self) -> torch.dtype:
        return self.value_dtype or self.dtype

    @property
    def sent_value_bytes(self) -> int:
        return self._vdtype.itemsize

    @property
    def k(self) -> int | None:
        """Entries kept per expert, or None when the expert goes dense."""
        return kept_entries(self.ratio, self.p, self.value_bytes, self.sent_value_bytes)

    def encoded_bytes(self, n: int) -> int:
        return encoded_bytes(self.ratio, self.p, self.value_bytes, n, self.sent_value_bytes)

    def _index_dtype(self) -> torch.dtype:
        return torch.uint16 if index_bytes(self.p) == 2 else torch.int32

    def encode(self, experts: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """[n, p] experts -> one uint8 buffer (values then indices; dense values if k is None)."""
        if self.k is None:
            return experts.detach().contiguous().view(torch.uint8).reshape(-1)
        residual = experts.detach() - shared
        idx = residual.abs().topk(self.k, dim=1).indices
        vals = residual.gather(1, idx).to(self._vdtype)
        return torch.cat([vals.contiguous().view(torch.uint8).reshape(-1),
                          idx.to(self._index_dtype()).contiguous().view(torch.uint8).reshape(-1)])

    def _entries(self, buf: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of an encoded buffer of ``n`` experts: values [n, k] (sent precision), indices [n, k]."""
        split = n * self.k * self.sent_value_bytes
        return (buf[:split].view(self._vdtype).view(n, self.k),
                buf[split:].view(self._index_dtype()).view(n, self.k))

    def decode(self, buf: torch.Tensor, n: int, shared: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: [n, p] experts (dense shared + scattered residual entries)."""
        if self.k is None:
            return buf.view(self.dtype).view(n, self.p)
        vals, idx = self._entries(buf, n)
        out = shared.expand(n, self.p).clone()
        return out.scatter_add_(1, idx.to(torch.int64), vals.to(self.dtype))

    def decode_one(self, buf: torch.Tensor, n: int, i: int, shared: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` [p] of an encoded buffer of ``n`` experts, the only dense tensor it creates
        (equal to ``decode(buf, n, shared)[i]``)."""
        if self.k is None:
            return buf.view(self.dtype).view(n, self.p)[i]
        vals, idx = self._entries(buf, n)
        return shared.clone().scatter_add_(0, idx[i].to(torch.int64), vals[i].to(self.dtype))
