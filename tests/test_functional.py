"""The decomposition's math against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.text import Perplexity

import ce_dynamics.functional as functional
from ce_dynamics.functional import (
    KEYS,
    accumulate_state,
    cross_entropy_decomposition,
    decomposition_from_state,
    token_ranks_and_log_scores,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _batch(seed: int = 0, shape: tuple[int, ...] = (3, 17), vocab: int = 61, scale: float = 3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    return logits, target


def _numpy_decomposition(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Re-derivation from the paper's definitions (eqs. 1-8), in plain numpy, float64, probability space."""
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    t = target.reshape(-1)
    z_t = z[np.arange(len(t)), t]
    ranks = (z > z_t[:, None]).sum(axis=1)
    m = z.max(axis=1)
    log_s = z_t - (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
    ranks_seen = np.unique(ranks)
    p = np.array([np.mean(ranks == e) for e in ranks_seen])
    big_q = np.array([np.exp(np.mean(log_s[ranks == e])) for e in ranks_seen])  # geometric mean, eq. 3
    c = big_q.sum()
    q = big_q / c
    return {
        "cross_entropy": float(-log_s.mean()),
        "error_entropy": float(-(p * np.log(p)).sum()),
        "self_alignment": float((p * np.log(p / q)).sum()),
        "confidence": float(np.log(c)),
        "accuracy": float(np.mean(ranks == 0)),
        "mean_reciprocal_rank": float(np.mean(1.0 / (ranks + 1))),
    }


def _assert_identity(result: dict[str, torch.Tensor]) -> None:
    ce = float(result["cross_entropy"])
    rebuilt = float(result["error_entropy"] + result["self_alignment"] - result["confidence"])
    assert math.isclose(ce, rebuilt, rel_tol=1e-12, abs_tol=0.0), (ce, rebuilt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])
def test_identity_holds_to_float64_rounding(dtype, scale):
    logits, target = _batch(seed=1, scale=scale, dtype=dtype)
    _assert_identity(cross_entropy_decomposition(logits, target))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_torch_cross_entropy(dtype):
    logits, target = _batch(seed=2, dtype=dtype)
    result = cross_entropy_decomposition(logits, target)
    # Reference on the very same (quantized) values, in float64.
    reference = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), target.reshape(-1))
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert result["cross_entropy"].dtype == torch.float64
    assert math.isclose(float(result["cross_entropy"]), float(reference), rel_tol=tol)


def test_cross_entropy_matches_torchmetrics_perplexity():
    logits, target = _batch(seed=3, shape=(4, 9), vocab=33)
    target[0, :3] = -100
    perplexity = Perplexity(ignore_index=-100)
    perplexity.update(logits, target)
    result = cross_entropy_decomposition(logits, target)
    assert math.isclose(float(result["cross_entropy"]), math.log(float(perplexity.compute())), rel_tol=1e-5)
    assert int(result["num_tokens"]) == 4 * 9 - 3


@pytest.mark.parametrize("seed", range(4))
def test_matches_numpy_rederivation(seed):
    logits, target = _batch(seed=seed, shape=(5, 40), vocab=29, scale=1.5, dtype=torch.float64)
    result = cross_entropy_decomposition(logits, target)
    expected = _numpy_decomposition(logits.numpy(), target.numpy())
    for key in KEYS:
        assert math.isclose(float(result[key]), expected[key], rel_tol=1e-10, abs_tol=1e-12), key


def test_ranks_are_strict_and_zero_based_with_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    target = torch.tensor([1, 3, 2])
    ranks, _ = token_ranks_and_log_scores(logits, target)
    assert ranks.tolist() == [0, 3, 1]


def test_bf16_ties_match_numpy_strict_count():
    # bf16 has 8 bits of mantissa: logits in [-2, 2] collide a lot.
    logits, target = _batch(seed=4, shape=(64,), vocab=1000, scale=1.0, dtype=torch.bfloat16)
    z = logits.float().numpy()
    assert len(np.unique(z[0])) < z.shape[1]  # the test is only meaningful with ties
    expected = (z > z[np.arange(64), target.numpy()][:, None]).sum(axis=1)
    ranks, _ = token_ranks_and_log_scores(logits, target)
    np.testing.assert_array_equal(ranks.numpy(), expected)


def test_padded_vocabulary_columns_at_minus_inf_change_nothing():
    logits, target = _batch(seed=5, vocab=50, dtype=torch.float64)
    padded = torch.cat([logits, torch.full((*logits.shape[:-1], 14), -math.inf)], dim=-1)
    a = cross_entropy_decomposition(logits, target)
    b = cross_entropy_decomposition(padded, target)
    assert b["p_e"].shape == (64,)
    for key in KEYS:
        assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-12), key


def test_padded_columns_with_real_values_count_in_the_rank():
    # Pythia pads 50277 tokens to 50304 logits; padding columns with finite logits do count.
    logits = torch.tensor([[0.0, 2.0, 5.0]])
    ranks, _ = token_ranks_and_log_scores(logits, torch.tensor([1]))
    assert ranks.tolist() == [1]


def test_single_token_and_zero_dim_target():
    logits = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    result = cross_entropy_decomposition(logits, torch.tensor(1))
    assert int(result["num_tokens"]) == 1
    assert float(result["accuracy"]) == 1.0
    assert float(result["error_entropy"]) == 0.0
    assert math.isclose(float(result["cross_entropy"]), float(F.cross_entropy(logits[None], torch.tensor([1]))))
    _assert_identity(result)


def test_ignore_index_equals_the_kept_subset():
    logits, target = _batch(seed=6)
    masked = target.clone()
    masked[:, ::3] = 7  # a valid token id used as ignore_index
    keep = masked != 7
    a = cross_entropy_decomposition(logits, masked, ignore_index=7)
    b = cross_entropy_decomposition(logits[keep], target[keep])
    assert int(a["num_tokens"]) == int(keep.sum())
    for key in KEYS:
        assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-12), key


def test_non_viewable_logits_are_not_copied_whole_and_agree():
    logits, target = _batch(seed=7, shape=(3, 11))
    shifted = logits[:, :-1]  # the usual causal-LM slice; cannot be viewed as [-1, V]
    assert not shifted.is_contiguous()
    a = cross_entropy_decomposition(shifted, target[:, 1:])
    b = cross_entropy_decomposition(shifted.contiguous(), target[:, 1:])
    for key in KEYS:
        assert float(a[key]) == float(b[key]), key


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
def test_chunk_boundaries_do_not_change_results(monkeypatch, chunk_rows):
    logits, target = _batch(seed=8, shape=(4, 10), vocab=37)
    target[1, 2:5] = -100  # ignored rows inside chunks: the gathered path
    expected_ranks, expected_scores = token_ranks_and_log_scores(logits, target)
    monkeypatch.setattr(functional, "_CPU_CHUNK_ELEMENTS", chunk_rows * 37)
    ranks, scores = token_ranks_and_log_scores(logits, target)
    assert torch.equal(ranks, expected_ranks)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_threads_and_a_single_thread_agree(monkeypatch, dtype):
    logits, target = _batch(seed=11, shape=(6, 20), vocab=97, dtype=dtype)
    monkeypatch.setattr(functional, "_CPU_CHUNK_ELEMENTS", 2 * 97)  # 60 tokens -> 30 chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = token_ranks_and_log_scores(logits, target)
        explicit_threads = token_ranks_and_log_scores(logits, target, num_threads=3)
        torch.set_num_threads(3)
        threaded = token_ranks_and_log_scores(logits, target)
        explicit_serial = token_ranks_and_log_scores(logits, target, num_threads=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for ranks, scores in (threaded, explicit_threads, explicit_serial):
        assert torch.equal(serial[0], ranks)
        torch.testing.assert_close(serial[1], scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["grad", "inference"])
def test_logits_that_require_grad_or_come_from_inference_mode(mode, monkeypatch):
    monkeypatch.setattr(functional, "_CPU_CHUNK_ELEMENTS", 61)  # many chunks: the worker-thread path
    logits, target = _batch(seed=12)
    expected = cross_entropy_decomposition(logits, target)
    if mode == "grad":
        result = cross_entropy_decomposition(logits.clone().requires_grad_(True), target)
    else:
        with torch.inference_mode():
            result = cross_entropy_decomposition(logits.clone(), target)
    assert float(result["cross_entropy"]) == float(expected["cross_entropy"])


def test_log_scores_are_computed_in_float32_for_half_inputs():
    # Every column equal: logsumexp must not overflow/lose precision in fp16 (50k * exp(0) > fp16 max).
    logits = torch.zeros(2, 70000, dtype=torch.float16)
    _, scores = token_ranks_and_log_scores(logits, torch.tensor([0, 5]))
    torch.testing.assert_close(scores, torch.full((2,), -math.log(70000), dtype=torch.float64), rtol=1e-6, atol=0)


def test_all_ignored_gives_empty_and_nan_with_warning():
    logits, _ = _batch(seed=9, shape=(2, 3))
    target = torch.full((2, 3), -100)
    ranks, scores = token_ranks_and_log_scores(logits, target)
    assert ranks.numel() == 0 and scores.numel() == 0
    with pytest.warns(UserWarning, match="No tokens"):
        result = cross_entropy_decomposition(logits, target)
    assert int(result["num_tokens"]) == 0
    assert all(math.isnan(float(result[key])) for key in KEYS)


def test_decomposition_from_state_validates_its_input():
    with pytest.raises(ValueError, match=r"same shape \[V\]"):
        decomposition_from_state(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="integer `rank_counts`"):
        decomposition_from_state(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        decomposition_from_state(torch.tensor([1, -1]), torch.zeros(2))


def test_decomposition_from_numpy_state_and_p_q_are_distributions():
    logits, target = _batch(seed=10)
    counts, sums = torch.zeros(61, dtype=torch.int64), torch.zeros(61, dtype=torch.float64)
    accumulate_state(*token_ranks_and_log_scores(logits, target), counts, sums)
    result = decomposition_from_state(counts.numpy(), sums.numpy())
    assert math.isclose(float(result["p_e"].sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float(result["q_e"].sum()), 1.0, rel_tol=1e-12)
    assert torch.all(result["q_e"][counts == 0] == 0)
    assert math.isclose(float(result["accuracy"]), float(result["p_e"][0]))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(min_value=0.1, max_value=10.0),
    vocab=st.integers(2, 40),
    tokens=st.integers(1, 30),
)
def test_temperature_leaves_ranks_error_entropy_and_accuracy_unchanged(seed, temperature, vocab, tokens):
    gen = torch.Generator().manual_seed(seed)
    # Distinct-enough values (multiples of 1/4) so that T * z keeps a strict order under float rounding.
    logits = torch.randint(-40, 40, (tokens, vocab), generator=gen).double() / 4
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    a = cross_entropy_decomposition(logits, target)
    b = cross_entropy_decomposition(logits * temperature, target)
    assert torch.equal(a["p_e"], b["p_e"])
    assert float(a["error_entropy"]) == float(b["error_entropy"])
    assert float(a["accuracy"]) == float(b["accuracy"])
    _assert_identity(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_path_of_accelerators_equals_the_counted_rows_path(monkeypatch, dtype):
    # Off CPU the torch backend computes every row (ignored ones against column 0) so that no count reaches the
    # host; run that path on CPU, across chunk boundaries and through the gathered (non-viewable) rows.
    logits, target = _batch(seed=13, shape=(3, 12), vocab=37, dtype=dtype)
    target[0, 2:6] = -100
    target[2, 11] = -100
    monkeypatch.setattr(functional, "_CPU_CHUNK_ELEMENTS", 5 * 37)
    for view_logits, view_target in ((logits, target), (logits[:, :-1], target[:, 1:])):
        counted_rows = token_ranks_and_log_scores(view_logits, view_target)
        monkeypatch.setattr(functional, "_COMPACT_DEVICE_TYPES", ())
        tokens = functional.token_pass(view_logits, view_target, validate_args=False)
        monkeypatch.setattr(functional, "_COMPACT_DEVICE_TYPES", ("cpu",))
        assert tokens.counted is not None and tokens.ranks.numel() == view_target.numel()
        assert torch.equal(tokens.counted, view_target.reshape(-1) != -100)
        assert torch.equal(tokens.ranks[tokens.counted], counted_rows[0])
        assert torch.equal(tokens.log_scores[tokens.counted].double(), counted_rows[1])


def test_decomposition_from_state_carries_nonfinite_tokens(tmp_path):
    logits, target = _batch(seed=14)
    counts, sums = torch.zeros(61, dtype=torch.int64), torch.zeros(61, dtype=torch.float64)
    accumulate_state(*token_ranks_and_log_scores(logits, target), counts, sums)
    plain = decomposition_from_state(counts, sums)
    assert plain["nonfinite_tokens"].dtype == torch.int64 and int(plain["nonfinite_tokens"]) == 0
    np.savez(tmp_path / "state.npz", rank_counts=counts.numpy(), rank_log_score_sum=sums.numpy(),
             nonfinite_tokens=np.int64(4))
    with np.load(tmp_path / "state.npz") as saved:
        restored = decomposition_from_state(saved["rank_counts"], saved["rank_log_score_sum"],
                                            saved["nonfinite_tokens"])
    assert restored["nonfinite_tokens"].dtype == torch.int64 and int(restored["nonfinite_tokens"]) == 4
    for key in (*KEYS, "num_tokens", "p_e", "q_e"):
        assert torch.equal(restored[key], plain[key]), key
    with pytest.raises(ValueError, match="non-negative `nonfinite_tokens`, got -1"):
        decomposition_from_state(counts, sums, -1)
    with pytest.raises(TypeError, match="`nonfinite_tokens` to be an integer scalar"):
        decomposition_from_state(counts, sums, 2.0)
    with pytest.raises(TypeError, match="`nonfinite_tokens` to be an integer scalar"):
        decomposition_from_state(counts, sums, torch.tensor([1, 2]))
    with pytest.warns(UserWarning, match=r"No tokens were accumulated \(3 non-finite tokens were left out\)"):
        empty = decomposition_from_state(torch.zeros(4, dtype=torch.int64), torch.zeros(4), 3)
    assert int(empty["nonfinite_tokens"]) == 3
