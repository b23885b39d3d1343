"""Rank buckets and the p_e vs q_e figure (paper fig. 6), shared by the metric, the callback and notebooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def rank_bucket_edges(vocab_size: int, max_buckets: int = 512) -> np.ndarray:
    """Bucket edges over ranks ``[0, vocab_size)``: one bucket per rank at the head, then geometric.

    Returns int64 edges ``e_0 = 0 < e_1 < ... < e_k = vocab_size`` with ``k <= max_buckets``; bucket ``i``
    holds ranks ``[e_i, e_{i+1})``.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"Expected `vocab_size` to be a positive int, got {vocab_size!r}.")
    if not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"Expected `max_buckets` to be a positive int, got {max_buckets!r}.")
    if vocab_size <= max_buckets:
        return np.arange(vocab_size + 1, dtype=np.int64)

    def edges_for(points: int) -> np.ndarray:
        geometric = np.rint(np.geomspace(1, vocab_size, points)).astype(np.int64)
        return np.unique(np.concatenate([[0], geometric, [vocab_size]]))

    lo, hi = 2, 16 * max_buckets  # rounding merges head points, so ask for more, then binary-search the count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(edges_for(mid)) - 1 <= max_buckets:
            lo = mid
        else:
            hi = mid - 1
    return edges_for(lo)


def bucket_sums(values_per_rank: Any, edges: np.ndarray) -> np.ndarray:
    """Sum a per-rank array ``[V]`` within the buckets given by :func:`rank_bucket_edges`."""
    values = np.asarray(values_per_rank, dtype=np.float64)
    if values.ndim != 1 or int(edges[-1]) != values.shape[0]:
        raise ValueError(f"Expected a [V] array with V = edges[-1] = {int(edges[-1])}, got shape {values.shape}.")
    return np.add.reduceat(values, edges[:-1])


def plot_p_e_q_e(p_e: Any, q_e: Any, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Log-log plot of the rank distribution ``p_e`` and the score distribution ``q_e`` against rank.

    Only ranks that occurred (``p_e > 0``) are drawn; the x axis is ``e + 1`` so rank 0 sits at 1.
    """
    import matplotlib.pyplot as plt

    p = np.asarray(p_e, dtype=np.float64)
    q = np.asarray(q_e, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"Expected `p_e` and `q_e` of the same shape [V], got {p.shape} and {q.shape}.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
    else:
        fig = ax.figure
    seen = np.flatnonzero(p > 0)
    x = seen + 1
    ax.plot(x, p[seen], "o-", ms=2.5, lw=0.8, alpha=0.85, label="$p_e$ (rank distribution)")
    ax.plot(x, q[seen], "s-", ms=2.5, lw=0.8, alpha=0.85, label="$q_e$ (normalized score)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank-based error $e$ + 1")
    ax.set_ylabel("probability")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return fig
