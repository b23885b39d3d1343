"""Coverage of the instance bootstrap's 95% intervals, by simulation against population values known in closed form.

The synthetic model: each eval document is one of three types (probabilities PI); a type fixes the distribution of
the right token's rank (a truncated geometric law) and shifts every log-score of the document; each document adds a
random offset of its own. Tokens of one document are therefore strongly correlated, as in real text. The population
p_e, Q_e (geometric mean of the scores at rank e), and from them CE, EE, SA, Conf and accuracy, are written out below
in numpy from the paper's definitions, independently of ce_dynamics. Tolerance: with 400 simulated sets the
binomial standard deviation of a coverage rate near 95% is 1.1 points; each key must cover in [0.90, 0.99].
Resampling tokens as if independent on the same data must fail (coverage far below 0.95).
"""

from __future__ import annotations

import numpy as np
import torch

from ce_dynamics.bootstrap import BOOTSTRAP_KEYS, FIXED_POINT, bootstrap_summary, instance_groups

V, SETS, DOCS, TOKENS, GROUPS, REPLICATES = 32, 400, 200, 32, 64, 200
PI = np.array([0.5, 0.3, 0.2])
RATES = np.array([0.6, 0.3, 0.12])
SHIFT = np.array([0.0, -0.4, -0.9])
RANK = np.arange(V)
P_TYPE = (1 - RATES[:, None]) ** RANK * RATES[:, None]
P_TYPE /= P_TYPE.sum(1, keepdims=True)
BASE = -0.2 - 0.15 * RANK  # mean log-score at each rank before the document's shifts (mean-zero offsets added)


def population() -> dict[str, float]:
    """Exact population values: p_e = sum_k PI_k p^k_e; log Q_e = E[log s | rank e] = BASE_e + E[SHIFT | rank e]."""
    p = PI @ P_TYPE
    log_big_q = BASE + (PI[:, None] * P_TYPE * SHIFT[:, None]).sum(0) / p
    conf = np.log(np.exp(log_big_q).sum())
    log_q = log_big_q - conf
    return {"cross_entropy": float(-(p * log_big_q).sum()), "error_entropy": float(-(p * np.log(p)).sum()),
            "self_alignment": float((p * (np.log(p) - log_q)).sum()), "confidence": float(conf),
            "accuracy": float(p[0])}


def coverage(token_level: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    types = rng.choice(3, size=(SETS, DOCS), p=PI)
    cdf = np.cumsum(P_TYPE, 1)
    u = rng.random((SETS, DOCS, TOKENS))
    ranks = (u[..., None] > cdf[types][:, :, None, :]).sum(-1).clip(max=V - 1)
    log_scores = (BASE[ranks] + SHIFT[types][..., None] + 0.5 * rng.standard_normal((SETS, DOCS, 1))
                  + 0.3 * rng.standard_normal((SETS, DOCS, TOKENS)))
    ids = np.arange(DOCS * TOKENS) if token_level else np.repeat(np.arange(DOCS), TOKENS)
    groups = instance_groups(torch.from_numpy(ids), GROUPS).numpy()
    truth = population()
    hits = {key: 0 for key in BOOTSTRAP_KEYS}
    for s in range(SETS):
        flat = groups * V + ranks[s].reshape(-1)
        counts = np.bincount(flat, minlength=GROUPS * V).reshape(GROUPS, V)
        sums = np.bincount(flat, weights=np.round(log_scores[s].reshape(-1) * FIXED_POINT),
                           minlength=GROUPS * V).reshape(GROUPS, V).astype(np.int64)
        out = bootstrap_summary(torch.from_numpy(counts), torch.from_numpy(sums), REPLICATES, seed=s)
        for key in BOOTSTRAP_KEYS:
            hits[key] += float(out[f"{key}_lo"]) <= truth[key] <= float(out[f"{key}_hi"])
    return {key: n / SETS for key, n in hits.items()}


def test_intervals_resampling_documents_cover_the_population_values_95_percent_of_the_time() -> None:
    rates = coverage(token_level=False)
    assert all(0.90 <= rate <= 0.99 for rate in rates.values()), rates


def test_intervals_resampling_tokens_as_independent_fail_on_correlated_documents() -> None:
    rates = coverage(token_level=True)
    assert all(rate < 0.80 for rate in rates.values()), rates
