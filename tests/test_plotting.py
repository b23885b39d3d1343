"""The p_e/q_e figure (metric.plot, the callback's image): binned on log-spaced ranks, with markers, and the
decomposition's values in the panel; checked against a numpy re-derivation of the bins and of the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.plotting import PEQERenderer, plot_p_e_q_e
import numpy_reference as ref

V = 3000


def _zipf_logits(seed: int, tokens: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (tokens,), generator=gen)
    logits = torch.randn(tokens, V, generator=gen) * 2
    logits[torch.arange(tokens), target] += torch.rand(tokens, generator=gen) * 12
    return logits, target


def test_metric_plot_bins_log_spaced_ranks_and_shows_the_values():
    logits, target = _zipf_logits(0)
    metric = CrossEntropyDecomposition(V)
    metric.update(logits, target)
    fig = metric.plot(title="t")
    ax = fig.axes[0]
    p_line, q_line = ax.get_lines()[:2]
    assert p_line.get_marker() == "o" and q_line.get_marker() == "s"
    x, p_bin = (np.asarray(v, dtype=float) for v in p_line.get_data())
    _, q_bin = (np.asarray(v, dtype=float) for v in q_line.get_data())
    assert len(x) <= 40 < int((metric.rank_counts > 0).sum())  # binned, not one point per observed rank
    assert np.all(np.diff(np.log(x)) > 0)
    # Re-derive every bin from the numpy reference's per-token ranks and log-scores: a bin [lo, hi) of ranks,
    # centred at sqrt((lo + 1) * hi), holds the mean per rank of p_e (and q_e) over its ranks.
    ranks, log_scores = ref.ranks_and_log_scores(logits.numpy(), target.numpy())
    p = np.bincount(ranks, minlength=V) / len(ranks)
    sums = np.bincount(ranks, weights=log_scores, minlength=V)
    seen = p > 0
    log_q = np.full(V, -np.inf)
    log_q[seen] = sums[seen] / np.bincount(ranks, minlength=V)[seen]
    q = np.exp(log_q - np.logaddexp.reduce(log_q[seen]))
    start = 0
    for xi, pi, qi in zip(x, p_bin, q_bin):
        lo = hi = None
        for a in range(start, V):  # the next bucket whose geometric centre is xi (buckets are contiguous)
            for b in (a + 1, *range(a + 2, V + 1)):
                if abs(np.sqrt((a + 1.0) * b) - xi) < 1e-9 * xi:
                    lo, hi = a, b
                    break
            if lo is not None:
                break
        assert lo is not None, xi
        start = hi
        assert pi == pytest.approx(p[lo:hi].mean(), rel=1e-12)
        assert qi == pytest.approx(q[lo:hi].mean(), rel=1e-6)  # the metric's log-scores are float32
    assert p_bin.sum() < 1  # means per rank, not sums
    expected = ref.decompose(logits.numpy(), target.numpy())
    text = ax.texts[0].get_text()
    assert "CE = EE + SA \u2212 Conf" in text
    numbers = [float(t.strip("()")) for t in text.splitlines()[1].replace("\u2212", "").split() if t not in "=+"]
    for got, key in zip(numbers, ("cross_entropy", "error_entropy", "self_alignment", "confidence")):
        assert got == pytest.approx(expected[key], abs=6e-4), key


def test_without_values_the_panel_shows_ee_and_sa_derived_from_p_and_q():
    p = np.array([0.5, 0.25, 0.25, 0.0])
    q = np.array([0.25, 0.25, 0.5, 0.0])
    ax = plot_p_e_q_e(p, q).axes[0]
    ee = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    sa = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    assert ax.texts[0].get_text() == f"EE = {ee:.3f}\nSA = {sa:.3f}"


def test_renderer_draws_the_values_each_call_over_its_cached_background():
    logits, target = _zipf_logits(1, tokens=500)
    metric = CrossEntropyDecomposition(V)
    metric.update(logits, target)
    out = metric.compute()
    p, q = out["p_e"].numpy(), out["q_e"].numpy()
    renderer = PEQERenderer()
    first = renderer.render(p, q, "a", values=out)
    other = renderer.render(p, q, "a", values={**out, "confidence": torch.tensor(9.0)})
    again = renderer.render(p, q, "a", values=out)
    assert first.shape[2] == 3 and not np.array_equal(first, other)  # the text changed the pixels
    np.testing.assert_array_equal(first, again)  # and nothing of the previous call stays behind
    fresh = PEQERenderer().render(p, q, "a", values=out)
    np.testing.assert_array_equal(first, fresh)
