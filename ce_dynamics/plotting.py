"""Rank buckets and the p_e vs q_e figure (paper fig. 6), shared by the metric, the callback and notebooks."""

from __future__ import annotations

from collections.abc import Mapping
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


def log_rank_edges(edges: np.ndarray) -> np.ndarray:
    """Bucket edges on the ``log10(rank + 1)`` axis: bucket ``[e_i, e_{i+1})`` spans
    ``[log10(e_i + 1), log10(e_{i+1} + 1))``, so the first bucket, rank 0 alone, is ``[0, log10 2)``.

    W&B draws a histogram's bins on a linear axis: on raw rank edges the head, which holds most of the mass,
    is a sliver next to a tail reaching the vocabulary size; on this axis the geometric buckets are evenly wide.
    """
    edges = np.asarray(edges)
    if edges.ndim != 1 or len(edges) < 2 or edges[0] != 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"Expected increasing rank edges starting at 0 (rank_bucket_edges), got {edges!r}.")
    return np.log10(edges.astype(np.float64) + 1.0)


def wandb_rank_histograms(p_e: Any, q_e: Any, max_buckets: int = 512) -> dict[str, Any]:
    """``{"p_e": wandb.Histogram, "q_e": wandb.Histogram}``: the per-rank mass summed in
    :func:`rank_bucket_edges` buckets, drawn on the ``log10(rank + 1)`` axis (:func:`log_rank_edges`)."""
    import wandb

    p, q = _checked_pair(p_e, q_e)
    edges = rank_bucket_edges(len(p), max_buckets)
    x = log_rank_edges(edges)
    return {key: wandb.Histogram(np_histogram=(bucket_sums(values, edges), x)) for key, values in (("p_e", p), ("q_e", q))}


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value: float, _position: int) -> str:
    exponent = round(float(np.log10(value))) if value > 0 else 0
    return "1" if exponent == 0 else "10" + str(exponent).translate(_SUPERSCRIPT)


def _checked_pair(p_e: Any, q_e: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p_e, dtype=np.float64)
    q = np.asarray(q_e, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"Expected `p_e` and `q_e` of the same shape [V], got {p.shape} and {q.shape}.")
    return p, q


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot state, nothing to close) with fixed margins: automatic layouts redraw.
    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.9)
    return fig, fig.subplots()


PLOT_BUCKETS = 40  # log-spaced rank buckets of the p_e/q_e figure: one point per rank at the head, then geometric


def binned_p_e_q_e(p: np.ndarray, q: np.ndarray, max_buckets: int = PLOT_BUCKETS) -> tuple[np.ndarray, ...]:
    """``(x, p, q)``: ``p_e`` and ``q_e`` averaged per rank within log-spaced rank buckets
    (:func:`rank_bucket_edges`), at each bucket's geometric centre on the ``e + 1`` axis; only buckets where
    some token fell. A raw per-rank curve is a comb in the sparse tail (most ranks there hold no token)."""
    edges = rank_bucket_edges(len(p), max_buckets)
    width = np.diff(edges).astype(np.float64)
    p_mean, q_mean = bucket_sums(p, edges) / width, bucket_sums(q, edges) / width
    centre = np.sqrt((edges[:-1] + 1.0) * edges[1:])  # geometric centre of the ranks e + 1 in the bucket
    keep = p_mean > 0
    return centre[keep], p_mean[keep], q_mean[keep]


def decomposition_text(p: np.ndarray, q: np.ndarray, values: Mapping[str, Any] | None = None) -> str:
    """The panel's legend of numbers: CE, EE, SA and Conf with their signs in CE = EE + SA - Conf.

    ``values`` (the metric's ``compute()`` output or a row) gives all four; without it EE and SA are derived
    from ``p_e`` and ``q_e`` themselves (Confidence needs the unnormalized scores, so it and CE are left out).
    """
    if values is not None and all(k in values for k in _TEXT_KEYS):
        ce, ee, sa, conf = (float(values[k]) for k in _TEXT_KEYS)
        return (f"CE = EE + SA \u2212 Conf\n{ce:.3f} = {ee:.3f} + {sa:.3f} \u2212 ({conf:.3f})")
    seen = p > 0
    ee = float(-(p[seen] * np.log(p[seen])).sum())
    sa = float((p[seen] * (np.log(p[seen]) - np.log(q[seen]))).sum())
    return f"EE = {ee:.3f}\nSA = {sa:.3f}"


_TEXT_KEYS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")


def _draw_p_e_q_e(ax: Axes, p: np.ndarray, q: np.ndarray) -> list:
    """The two binned curves, the values' text box and the axes' styling; returns [p curve, q curve, text]."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    x, p_bin, q_bin = binned_p_e_q_e(p, q)
    artists = [
        ax.plot(x, p_bin, "o-", ms=3.5, lw=1.0, color="tab:blue", label="$p_e$: share of tokens at rank e")[0],
        ax.plot(x, q_bin, "s--", ms=3.5, lw=1.0, mfc="none", color="tab:orange",
                label="$q_e$: normalized score at rank e")[0],
        ax.text(0.97, 0.96, "", transform=ax.transAxes, ha="right", va="top", fontsize=7.5, family="monospace",
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.8", "alpha": 0.9}),
    ]
    ax.set_xscale("log")
    ax.set_yscale("log")
    # No minor ticks and plain-text labels: log axes' dozens of minor-tick artists and mathtext labels cost more
    # than the rest of the figure, and the callback draws it at every validation.
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, numticks=7))
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(_power_of_ten))
    ax.set_xlabel("rank of the right token, e + 1 (log-spaced bins)")
    ax.set_ylabel("per-rank mass (bin mean)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=False, fontsize=7.5, loc="lower left")
    return artists


def plot_p_e_q_e(p_e: Any, q_e: Any, ax: Axes | None = None, title: str | None = None,
                 values: Mapping[str, Any] | None = None) -> Figure:
    """Log-log plot of the rank distribution ``p_e`` and the score distribution ``q_e`` against rank (paper
    fig. 6), binned on log-spaced ranks (:func:`binned_p_e_q_e`), with CE, EE, SA and Conf in the panel
    (:func:`decomposition_text`; ``values`` is the metric's ``compute()`` output, else EE and SA are derived).

    The x axis is ``e + 1`` so rank 0 sits at 1.
    """
    p, q = _checked_pair(p_e, q_e)
    fig, ax = _new_figure() if ax is None else (ax.figure, ax)
    *_, text = _draw_p_e_q_e(ax, p, q)
    text.set_text(decomposition_text(p, q, values))
    if title:
        ax.set_title(title)
    return fig


class PEQERenderer:
    """Renders :func:`plot_p_e_q_e` images repeatedly, fast: for the callback, at every validation.

    Axis limits snap to powers of ten, so the axes, ticks, labels and legend rarely change: they are drawn once
    into a cached background, and each call only draws the two curves, the values' text and the title over it
    (blitting).
    """

    def __init__(self) -> None:
        self._limits: tuple | None = None

    def render(self, p_e: Any, q_e: Any, title: str = "", values: Mapping[str, Any] | None = None) -> np.ndarray:
        """An ``[H, W, 3]`` uint8 image of ``p_e`` and ``q_e`` (``values``: as for :func:`plot_p_e_q_e`)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        p, q = _checked_pair(p_e, q_e)
        x, p_bin, q_bin = binned_p_e_q_e(p, q)
        low = min(p_bin.min(), q_bin[q_bin > 0].min(initial=1.0)) if len(x) else 1e-3
        limits = (10 ** np.ceil(np.log10(max(len(p), 10))), 10 ** np.floor(np.log10(low)))
        if self._limits is not None and limits[0] == self._limits[0]:
            limits = (limits[0], min(limits[1], self._limits[1]))  # only ever extend: no flip-flopping redraws
        if limits != self._limits:
            self._fig, self._ax = _new_figure()
            self._artists = _draw_p_e_q_e(self._ax, p, q)
            self._ax.set_xlim(0.8, limits[0] * 1.25)
            self._ax.set_ylim(limits[1] / 1.25, 1.25)
            self._title = self._ax.set_title(" ")
            for artist in (*self._artists, self._title):
                artist.set_animated(True)
            self._canvas = FigureCanvasAgg(self._fig)
            self._canvas.draw()
            self._background = self._canvas.copy_from_bbox(self._fig.bbox)
            self._limits = limits
        self._canvas.restore_region(self._background)
        p_line, q_line, text = self._artists
        for line, values_binned in ((p_line, p_bin), (q_line, q_bin)):
            line.set_data(x, values_binned)
            self._ax.draw_artist(line)
        text.set_text(decomposition_text(p, q, values))
        self._ax.draw_artist(text)
        self._title.set_text(title)
        self._fig.draw_artist(self._title)
        return np.array(self._canvas.buffer_rgba())[..., :3]
