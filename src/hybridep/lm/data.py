"""Real text available offline: the Python standard library's own source files, byte-level.

The corpus is the concatenation of the ``.py`` files under the running interpreter's stdlib
directory, in sorted path order, capped at ``max_bytes``. Nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val")


@lru_cache(maxsize=4)
def load_corpus(max_bytes: int = 8_000_000) -> torch.Tensor:
    """The corpus as a uint8 tensor (deterministic for a given Python installation)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"the standard library sources under {root} are missing or too small ({total} bytes)")
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def batch(corpus: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int, rank: int,
          split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of (inputs, next-byte targets), int64 [batch_size, seq_len].

    The first 95 % of the corpus is for training, the rest for validation. The batch depends only
    on (seed, step, rank, split): the same in every process and run (no salted ``hash``).
    """
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed: {', '.join(SPLITS)}")
    cut = int(len(corpus) * 0.95)
    lo, hi = (0, cut) if split == "train" else (cut, len(corpus))
    entropy = np.random.SeedSequence([seed % 2**64, step, rank, SPLITS.index(split)]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(entropy))
    starts = torch.randint(lo, hi - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    tokens = corpus[idx].long()
    return tokens[:, :-1], tokens[:, 1:]
