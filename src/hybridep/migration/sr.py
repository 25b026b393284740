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

Gradients of the gathered copies return to their owners dense (``grads="dense"``, exact) or as the
top-k of each expert's gradient with error feedback (``grads="topk"``, :class:`ErrorFeedback`):
what one iteration's message leaves out is added to the next one's, so every gradient entry reaches
its owner eventually (sparsified SGD with memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SR_BASES = ("shared", "delta", "zero")
SR_DECODES = ("layer", "expert")
SR_GRADS = ("dense", "topk")


@dataclass(frozen=True)
class SRSettings:
    """How a HybridEP run compresses its in-domain expert traffic.

    ``ratio``: compression ratio of the gather (bytes, indices counted); ``basis``: what residuals
    are taken against -- ``shared`` (the mean expert, the paper's), ``delta`` (each receiver's
    synchronised copy of the expert, so only changes travel) or ``zero`` (ablation: top-k of the raw
    expert); ``values``: the residual values' precision on the wire (a key of :data:`VALUE_DTYPES`);
    ``decode``: ``layer`` (decode the domain's experts when the layer takes them) or ``expert``
    (keep them encoded, decode one at a time inside the expert computation, recomputed in backward);
    ``grads``: ``dense`` (the gathered copies' gradients return dense, straight-through) or ``topk``
    (top-k at the same ratio with error feedback, :class:`ErrorFeedback`)."""

    ratio: float
    basis: str = "delta"
    values: str = "float16"
    decode: str = "layer"
    grads: str = "dense"

    def __post_init__(self) -> None:
        for name, value, allowed in (("basis", self.basis, SR_BASES), ("values", self.values, tuple(VALUE_DTYPES)),
                                     ("decode", self.decode, SR_DECODES), ("grads", self.grads, SR_GRADS)):
            if value not in allowed:
                raise ValueError(f"sr {name} must be one of {list(allowed)}, got {value!r}")
        if self.decode == "expert" and self.basis == "delta":
            raise ValueError("sr decode 'expert' needs sr basis 'shared' or 'zero': the 'delta' basis keeps "
                             "dense copies of the domain's experts by design")


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
    from hybridep.compute_probe import median_seconds

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


class ErrorFeedback:
    """Top-k compression of gradient rows with error feedback, for one sender and one set of
    receivers (one reduce-scatter stage of one layer).

    :meth:`encode` sends, per receiver, the top-k entries of each row of (gradient + memory) and keeps
    the rest -- including the rounding of the kept values to the wire precision -- as the new memory,
    so that the sum of everything sent plus the memory equals the sum of every gradient given: no
    gradient mass is lost, only delayed. The codec's basis is zero (gradients have no shared part).
    """

    def __init__(self, codec: SRCodec):
        self.codec = codec
        self.zero = torch.zeros(codec.p, dtype=codec.dtype)
        self.memory: torch.Tensor | None = None

    def encode(self, rows: torch.Tensor, skip: int | None = None) -> list[torch.Tensor]:
        """``rows`` [receivers, n, p] -> one encoded buffer per receiver (empty for ``skip``: the
        sender's own share, which stays local and dense)."""
        if self.memory is None:
            self.memory = torch.zeros_like(rows)
        total = rows + self.memory
        out = []
        n = rows.shape[1]
        for i in range(rows.shape[0]):
            if i == skip:  # (its memory stays zero)
                out.append(torch.empty(0, dtype=torch.uint8))
                continue
            buf = self.codec.encode(total[i], self.zero)
            self.memory[i] = total[i] - self.codec.decode(buf, n, self.zero)
            out.append(buf)
        return out

    def decode(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """One received buffer -> its [n, p] (sparse) gradient rows."""
        return self.codec.decode(buf, n, self.zero)
