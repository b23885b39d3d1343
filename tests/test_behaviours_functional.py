"""Paths of the per-token kernel that ordinary widths never take, forced on CPU and checked against numpy:
float64 counting at V >= 2**24 (a float32 count cannot hold 2**24 + 1) and the accelerator's chunk size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy_reference import decompose, ranks_and_log_scores

from ce_dynamics import functional
from ce_dynamics.functional import KEYS, cross_entropy_decomposition, token_ranks_and_log_scores


def test_ranks_past_2_pow_24_are_counted_exactly():
    """One row of 2**24 + 3 logits with 2**24 + 1 of them above the target's: the rank is 16777217, which
    float32 cannot represent (it rounds to 16777216)."""
    vocab = 2**24 + 3
    logits = torch.zeros(1, vocab)
    logits[0, : 2**24 + 1] = 1.0  # beat the target
    logits[0, -1] = 0.5  # the target; the other column ties with nothing above it
    target = torch.tensor([vocab - 1])
    ranks, log_scores = token_ranks_and_log_scores(logits, target)
    assert int(ranks[0]) == 2**24 + 1  # by construction
    # log s = 0.5 - log((2**24 + 1) e + e**0.5 + 1), in float64 by hand
    expected = 0.5 - np.log((2**24 + 1) * np.e + np.exp(0.5) + 1.0)
    assert float(log_scores[0]) == pytest.approx(expected, abs=1e-5)


def test_accelerator_chunk_size_on_cpu_matches_numpy(monkeypatch):
    """The accelerator's chunk (2**26 elements: every row of this batch in one chunk) and a one-row chunk give
    numpy's ranks and log-scores, with ignored positions and ties."""
    g = torch.Generator().manual_seed(3)
    vocab = 4096
    logits = torch.randn(3, 50, vocab, generator=g).mul(3).round().div(3)  # coarse values: many exact ties
    target = torch.randint(0, vocab, (3, 50), generator=g)
    target[1, 5:40] = -100
    expected_ranks, expected_scores = ranks_and_log_scores(logits.numpy(), target.numpy())
    for elements in (functional._ACCEL_CHUNK_ELEMENTS, vocab):
        monkeypatch.setattr(functional, "_CPU_CHUNK_ELEMENTS", elements)
        ranks, scores = token_ranks_and_log_scores(logits, target, num_threads=2)
        np.testing.assert_array_equal(ranks.numpy(), expected_ranks)
        np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=0, atol=2e-5)
    expected = decompose(logits.numpy(), target.numpy())
    got = cross_entropy_decomposition(logits, target)
    for key in KEYS:
        assert float(got[key]) == pytest.approx(expected[key], rel=1e-6, abs=1e-6), key
