"""The paper's figures drawn from our own saved results and arrays (shared by the CLI and the notebooks).

- fig. 3 :func:`plot_components_vs_step`: CE and EE, then SA and Conf, against training step (log axis)
- fig. 4 :func:`plot_p_e_steps`: the RBE distribution p_e at several steps
- fig. 6 :func:`plot_p_e_q_e_steps`: p_e against q_e at several steps (one panel each)
- fig. 7 :func:`plot_scaling_law`: each component against non-embedding parameters with its power-law fit
- fig. 8 :func:`plot_component_shares`: each component's share, |M| / (|EE| + |SA| + |Conf|) (or M / CE), against model size

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so they are safe in scripts and show
inline in notebooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ce_dynamics._extras import require

require("matplotlib")

import numpy as np
from matplotlib.figure import Figure

from ce_dynamics.files import atomic_path
from ce_dynamics.analysis.scaling import (
    ALL_GROUP,
    COMPONENTS,
    SHORT_NAMES,
    PowerLawFit,
    component_shares,
    dataset_order,
    family_of,
)

COLORS = {
    "cross_entropy": "black",
    "error_entropy": "tab:blue",
    "self_alignment": "tab:orange",
    "confidence": "tab:green",
}
LONG_NAMES = {
    "cross_entropy": "Cross-Entropy",
    "error_entropy": "Error-Entropy",
    "self_alignment": "Self-Alignment",
    "confidence": "Confidence",
}
_MARKERS = "osD^vP*Xhp<>"


SIGNS = {"cross_entropy": "= EE + SA \u2212 Conf", "error_entropy": "+ in CE", "self_alignment": "+ in CE",
         "confidence": "\u2212 in CE"}


def component_label(comp: str) -> str:
    """A legend label that says the component's sign in CE = EE + SA - Conf, e.g. "Confidence Conf (- in CE)"."""
    return f"{LONG_NAMES[comp]} {SHORT_NAMES[comp]} ({SIGNS[comp]})"


def plot_components_vs_step(numbers: Mapping[str, Mapping[int, Mapping[str, float]]]) -> Figure:
    """Fig. 3: CE, EE, SA and Conf against training step, one column per dataset.

    ``numbers`` is ``{dataset: {step: {component: value}}}`` (e.g. ``scaling.decompose_arrays``). CE and EE
    share the top panel; SA and Conf, an order of magnitude smaller, get the bottom one, so their changes show.
    The step axis is symmetric-log so that step 0 (the untrained model) stays on it.
    """
    datasets = list(numbers)
    fig = Figure(figsize=(4.6 * len(datasets), 5.6), layout="constrained")
    axes = fig.subplots(2, len(datasets), squeeze=False, sharex="col")
    for column, dataset in enumerate(datasets):
        steps = sorted(numbers[dataset])
        for row, comps in enumerate((COMPONENTS[:2], COMPONENTS[2:])):
            ax = axes[row][column]
            for comp in comps:
                values = [float(numbers[dataset][s][comp]) for s in steps]
                ax.plot(steps, values, marker="o", ms=3, color=COLORS[comp], label=component_label(comp))
                if all(f"{comp}_lo" in numbers[dataset][s] for s in steps):  # the bootstrap's 95% band
                    ax.fill_between(steps, [float(numbers[dataset][s][f"{comp}_lo"]) for s in steps],
                                    [float(numbers[dataset][s][f"{comp}_hi"]) for s in steps], color=COLORS[comp],
                                    alpha=0.2, lw=0)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=0)
            ax.set_ylabel("nats per token")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7.5)
        axes[0][column].set_title(dataset)
        axes[1][column].axhline(0.0, color="grey", lw=0.8)
        axes[1][column].set_xlabel("training step (log scale)")
    return fig


def plot_p_e_steps(p_e_by_step: Mapping[int, np.ndarray], ax=None, title: str | None = None, max_buckets: int = 64):
    """Fig. 4: the RBE distribution p_e against rank (e + 1) for several steps, log-log.

    Beyond the first ranks p_e is averaged over log-spaced rank buckets (``plotting.rank_bucket_edges``) so
    the sparse tail reads as a curve; each point is the mean probability of one rank in its bucket.
    """
    from ce_dynamics.plotting import binned_p_e_q_e

    fig, ax = _figure_and_axes(ax, (5.0, 3.8))
    cmap = _step_colors(len(p_e_by_step))
    for color, (step, p_e) in zip(cmap, sorted(p_e_by_step.items())):
        p_e = np.asarray(p_e, dtype=np.float64)
        centre, mean, _ = binned_p_e_q_e(p_e, p_e, max_buckets)
        ax.plot(centre, mean, marker="o", ms=2.5, lw=1.2, color=color, label=f"step {step}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank of the ground-truth token (RBE + 1)")
    ax.set_ylabel("$p_e$ (per-rank mean in log-spaced bins)")
    ax.set_title(title or "RBE distribution $p_e$ during training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_p_e_q_e_steps(numbers: Mapping[int, Mapping[str, np.ndarray]], steps: Sequence[int] | None = None) -> Figure:
    """Fig. 6: p_e against q_e at several steps of one dataset, one panel per step (core's fig. 6 plot).

    ``numbers`` is ``{step: {"p_e", "q_e", ...}}`` for one dataset; ``steps`` picks which (default: all).
    """
    from ce_dynamics.plotting import plot_p_e_q_e

    steps = sorted(numbers) if steps is None else list(steps)
    missing = [s for s in steps if s not in numbers]
    if missing:
        raise KeyError(f"no arrays for step(s) {missing}; available: {sorted(numbers)}")
    fig = Figure(figsize=(4.2 * len(steps), 3.8), layout="constrained")
    axes = fig.subplots(1, len(steps), squeeze=False)[0]
    for ax, step in zip(axes, steps):
        plot_p_e_q_e(np.asarray(numbers[step]["p_e"]), np.asarray(numbers[step]["q_e"]), ax=ax, title=f"step {step}",
                     values=numbers[step])
    return fig


def plot_scaling_law(
    rows: Sequence[Mapping], fits: Mapping[str, Mapping[str, Mapping[str, PowerLawFit]]] | None = None,
    unit: str = "nats",
) -> Figure:
    """Fig. 7: every component against non-embedding parameters (log-log), one row per dataset.

    Points are coloured by model family; the dashed line is the power-law fit of the widest group in
    ``fits`` ("All" when there are several families), labelled with its exponent and R^2. Values are drawn
    as ``|M|`` as they are fitted; a panel whose values are all negative says so in its axis label.
    """
    datasets = dataset_order(rows)
    families = sorted({family_of(r) for r in rows})
    fig = Figure(figsize=(14.0, 3.1 * len(datasets) + 0.6), layout="constrained")
    axes = fig.subplots(len(datasets), len(COMPONENTS), squeeze=False)
    for i, dataset in enumerate(datasets):
        subset = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: r["non_embedding_params"])
        fit_group = _widest_group(fits, dataset)
        for j, comp in enumerate(COMPONENTS):
            ax = axes[i][j]
            for k, family in enumerate(families):
                pts = [r for r in subset if family_of(r) == family]
                if pts:
                    ax.scatter([r["non_embedding_params"] for r in pts], [abs(r[comp]) for r in pts],
                               marker=_MARKERS[k % len(_MARKERS)], s=28, color=f"C{k}",
                               label=f"{family}: {_plotted_as(comp, [r[comp] for r in subset])}", zorder=3)
                    _error_bars(ax, pts, comp, f"C{k}")
            if fit_group is not None:
                fit = fits[fit_group][dataset][comp]
                x = np.geomspace(subset[0]["non_embedding_params"], subset[-1]["non_embedding_params"], 50)
                ax.plot(x, fit.predict(x), "--", color=COLORS[comp], lw=1.5,
                        label=f"fit {fit_group}: $\\alpha$={fit.alpha:.3f}, $R^2$={fit.r2:.3f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            shown = _plotted_as(comp, [r[comp] for r in subset])
            ax.set_ylabel(f"{shown.split(' (')[0]} ({unit})")
            ax.set_xlabel("non-embedding parameters")
            ax.set_title(f"{LONG_NAMES[comp]} - {dataset}\nplotted: {shown}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    return fig


def plot_component_shares(rows: Sequence[Mapping], convention: str = "absolute") -> Figure:
    """Fig. 8: each component's share (in %) against model size, one panel per dataset.

    Shares are :func:`ce_dynamics.analysis.scaling.component_shares`: by default ``|M| / (|EE| + |SA| + |Conf|)``
    (they sum to 100%, as the paper's figure reads); ``convention="signed"``: ``M / CE``, which satisfy
    EE% + SA% - Conf% = 100%. The share axis is logarithmic (symmetric-log for signed shares, which can be
    negative), so SA and Conf at 1-2% read as clearly as EE at 90%; each line ends with its last value.
    """
    datasets = dataset_order(rows)
    families = sorted({family_of(r) for r in rows})
    signed = convention == "signed"
    fig = Figure(figsize=(5.2 * len(datasets), 4.0), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        for k, family in enumerate(families):
            subset = sorted((r for r in rows if r["dataset"] == dataset and family_of(r) == family),
                            key=lambda r: r["non_embedding_params"])
            if not subset:
                continue
            x = [r["non_embedding_params"] for r in subset]
            shares = [component_shares(r, convention) for r in subset]
            for comp in COMPONENTS[1:]:
                y = [100.0 * s[comp] for s in shares]
                label = (f"{SHORT_NAMES[comp]} / CE ({SIGNS[comp]})" if signed
                         else f"|{SHORT_NAMES[comp]}| share ({SIGNS[comp]})")
                ax.plot(x, y, marker=_MARKERS[k % len(_MARKERS)], ms=5, color=COLORS[comp],
                        label=label if k == 0 else None)
                ax.annotate(f"{y[-1]:.1f}%", (x[-1], y[-1]), xytext=(4, 0), textcoords="offset points",
                            fontsize=7, color=COLORS[comp], va="center")
        if len(families) > 1:  # markers tell families apart; colours tell components apart
            for k, family in enumerate(families):
                ax.plot([], [], _MARKERS[k % len(_MARKERS)], color="grey", label=family)
        ax.set_xscale("log")
        if signed:
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(0.0, color="grey", lw=0.8)
        else:
            ax.set_yscale("log")
        _percent_ticks(ax)
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel("share of cross-entropy (%, log scale)" if signed
                      else "share of |EE| + |SA| + |Conf| (%, log scale)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3, which="major")
        ax.margins(x=0.2)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 2.5)  # room above EE's line for the legend
        ax.legend(fontsize=7, loc="upper left", ncols=3)
    return fig


def _plotted_as(comp: str, values: Sequence[float]) -> str:
    """What a log panel of ``|M|`` shows, in words with the sign: "EE", "-Conf" (all negative) or "|Conf|"."""
    name = SHORT_NAMES[comp]
    if all(v < 0 for v in values):
        return f"\u2212{name} (every {name} < 0)"
    if any(v < 0 for v in values):
        return f"|{name}| (signs differ)"
    return name


def _percent_ticks(ax) -> None:
    """Plain percent labels (0.1, 1, 10, 100) on a log or symlog share axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = [0.1, 0.3, 1, 3, 10, 30, 100]
    if ax.get_yscale() == "symlog":  # linear within +-1%: 0.1 and 0.3 would crowd 0
        ticks = [-t for t in ticks[:1:-1]] + [0] + ticks[2:]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def save_scaling_figures(
    rows: Sequence[Mapping], fits: Mapping[str, Mapping[str, Mapping[str, PowerLawFit]]], out_dir: str | Path,
    unit: str = "nats",
) -> list[Path]:
    """Write ``scaling_law.png`` (fig. 7; ``scaling_law_bpb.png`` in bits per byte) and
    ``component_shares.png`` (fig. 8, the same in either unit) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    law = "scaling_law.png" if unit == "nats" else f"scaling_law_{unit}.png"
    for name, fig in ((law, plot_scaling_law(rows, fits, unit=unit)),
                      ("component_shares.png", plot_component_shares(rows))):
        written.append(save_figure(fig, out_dir / name))
    return written


def plot_holdout(results: Sequence, unit: str = "nats") -> Figure:
    """The hold-out test (``ce_dynamics.analysis.holdout``): per fit group and dataset (rows) and component
    (columns), the fitted models, the law fitted to them extended to the held-out sizes, the held-out models'
    values (open circles) and the predictions (crosses; for CE, the direct law and CE assembled from the
    components)."""
    from ce_dynamics.analysis.scaling import fit_power_law

    fig = Figure(figsize=(14.0, 3.1 * len(results) + 0.6), layout="constrained")
    axes = fig.subplots(len(results), len(COMPONENTS), squeeze=False)
    for i, h in enumerate(results):
        x_all = np.geomspace(min(h.train_sizes), max(h.test_sizes), 50)
        for j, comp in enumerate(COMPONENTS):
            ax = axes[i][j]
            ax.scatter(h.train_sizes, np.abs(h.train_values[comp]), color=COLORS[comp], s=24, label="fitted on")
            fit = fit_power_law(h.train_sizes, h.train_values[comp])
            ax.plot(x_all, fit.predict(x_all), "--", color=COLORS[comp], lw=1.2,
                    label=f"law, $\\alpha$={fit.alpha:.3f}")
            ax.scatter(h.test_sizes, np.abs(h.actual[comp]), facecolors="none", edgecolors=COLORS[comp], s=40,
                       label="held out")
            keys = ("ce_direct", "ce_assembled") if comp == "cross_entropy" else (comp,)
            for key, marker in zip(keys, ("x", "+")):
                label = {"ce_direct": "CE direct", "ce_assembled": "EE + SA - Conf"}.get(key, "predicted")
                ax.scatter(h.test_sizes, np.abs(h.predicted[key]), marker=marker, color="red", s=40, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_xlabel("non-embedding parameters")
            ax.set_ylabel(f"|{SHORT_NAMES[comp]}| ({unit})")
            ax.set_title(f"{SHORT_NAMES[comp]} - {h.group} / {h.dataset}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    return fig


def save_holdout_figure(results: Sequence, path: str | Path, unit: str = "nats") -> Path:
    """Write :func:`plot_holdout` as a PNG at ``path``."""
    return save_figure(plot_holdout(results, unit), path)


def _error_bars(ax, rows: Sequence[Mapping], comp: str, color: str) -> None:
    """95% error bars on ``|M|`` for rows that carry the bootstrap's ``<comp>_lo``/``_hi`` (none otherwise)."""
    rows = [r for r in rows if f"{comp}_lo" in r and f"{comp}_hi" in r]
    if not rows:
        return
    bounds = np.abs(np.asarray([[r[f"{comp}_lo"], r[f"{comp}_hi"]] for r in rows], dtype=np.float64))
    low, high = bounds.min(1), bounds.max(1)
    mid = np.abs([float(r[comp]) for r in rows])
    ax.errorbar([r["non_embedding_params"] for r in rows], mid,
                yerr=[np.clip(mid - low, 0, None), np.clip(high - mid, 0, None)], fmt="none", ecolor=color,
                elinewidth=1, capsize=2, zorder=2)


def save_figure(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    """Save a figure as PNG atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _widest_group(fits, dataset: str) -> str | None:
    if not fits:
        return None
    candidates = [g for g, per in fits.items() if dataset in per]
    if ALL_GROUP in candidates:
        return ALL_GROUP
    return max(candidates, key=lambda g: fits[g][dataset]["cross_entropy"].num_points, default=None)


def _plain_log_ticks(ax) -> None:
    """Label a log y axis that spans about a decade or less with plain numbers (2, 3, 0.5), not 2x10^0."""
    from matplotlib.ticker import FuncFormatter

    low, high = ax.get_ylim()
    if high / low < 15:
        fmt = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)


def _figure_and_axes(ax, size: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _step_colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](v) for v in np.linspace(0.0, 0.9, max(n, 1))]
