"""The language model's batches: the same in every process and run for the same (seed, step, rank)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hybridep.lm.data import batch, load_corpus

_PRINT = ("from hybridep.lm.data import batch, load_corpus; "
          "x, y = batch(load_corpus(), 3, 16, 7, 5, 2); print(x.flatten().tolist()); print(y.flatten().tolist())")


def test_batch_is_the_same_in_another_process():
    """A fresh interpreter with another string-hash salt draws the same batch (string hashes are
    salted per process: a seed built from ``hash`` of a tuple holding the split name would differ)."""
    x, y = batch(load_corpus(), 3, 16, 7, 5, 2)
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        out = subprocess.run([sys.executable, "-c", _PRINT], env=env, capture_output=True, text=True, check=True)
        xs, ys = out.stdout.splitlines()
        assert xs == str(x.flatten().tolist())
        assert ys == str(y.flatten().tolist())


def test_batch_targets_are_next_bytes_and_keys_matter():
    corpus = load_corpus()
    x, y = batch(corpus, 4, 32, 0, 0, 0)
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    others = [batch(corpus, 4, 32, *key)[0] for key in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    assert all(not torch.equal(x, o) for o in others)
    assert not torch.equal(x, batch(corpus, 4, 32, 0, 0, 0, split="val")[0])


def test_batch_rejects_an_unknown_split():
    with pytest.raises(ValueError, match=r"split.*'test'.*train, val"):
        batch(load_corpus(), 1, 8, 0, 0, 0, split="test")
