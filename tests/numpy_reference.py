"""An independent re-derivation of the decomposition in numpy (paper eqs. 1-8), for tests' expected values.

Written from the paper's definitions, not from ce_dynamics: float64 throughout, ranks by direct comparison,
log-scores by a max-shifted logsumexp, and Confidence as the log of the sum of the geometric means.
"""

from __future__ import annotations

import numpy as np


def ranks_and_log_scores(logits, labels, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """Rank (how many logits beat the right one, strictly) and log-probability of the right token, per
    non-ignored position."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, np.shape(logits)[-1])
    y = np.asarray(labels).reshape(-1)
    keep = y != ignore_index
    z, y = z[keep], y[keep].astype(np.int64)
    right = z[np.arange(len(y)), y]
    ranks = (z > right[:, None]).sum(axis=1)
    shift = z.max(axis=1)
    log_scores = right - shift - np.log(np.exp(z - shift[:, None]).sum(axis=1))
    return ranks, log_scores


def decomposition(ranks: np.ndarray, log_scores: np.ndarray, vocab_size: int) -> dict[str, float]:
    """CE, EE, SA, Conf, accuracy, MRR and the counts, from per-token ranks and log-scores."""
    ranks = np.asarray(ranks, dtype=np.int64)
    log_scores = np.asarray(log_scores, dtype=np.float64)
    n = len(ranks)
    counts = np.bincount(ranks, minlength=vocab_size)
    sums = np.bincount(ranks, weights=log_scores, minlength=vocab_size)
    seen = np.flatnonzero(counts)
    p = counts[seen] / n
    big_q = np.exp(sums[seen] / counts[seen])  # geometric mean of the scores at each rank
    c = big_q.sum()
    q = big_q / c
    return {
        "cross_entropy": float(-log_scores.mean()),
        "error_entropy": float(-(p * np.log(p)).sum()),
        "self_alignment": float((p * np.log(p / q)).sum()),
        "confidence": float(np.log(c)),
        "accuracy": float((ranks == 0).mean()),
        "mean_reciprocal_rank": float((1.0 / (ranks + 1)).mean()),
        "num_tokens": n,
        "rank_counts": counts,
        "rank_log_score_sum": sums,
    }


def decompose(logits, labels, ignore_index: int = -100) -> dict[str, float]:
    """The decomposition of a batch of logits and aligned labels."""
    ranks, log_scores = ranks_and_log_scores(logits, labels, ignore_index)
    return decomposition(ranks, log_scores, np.shape(logits)[-1])
