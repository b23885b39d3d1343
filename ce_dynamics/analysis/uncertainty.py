"""Scaling fits with uncertainty: the paired instance bootstrap carried through the power-law fits.

Every model of a comparison was scored on the same eval instances, and a results row carries the bootstrap
replicates of its components (``row["replicates"][component]``, B values; ``ce_dynamics.bootstrap``): replicate
``b`` of every model drew the same groups of instances. Refitting the power law on replicate ``b`` of every model
at once gives one draw of (alpha, intercept, R^2) per component, with the models' sampling errors correlated as
they really are (paired). Intervals are the 2.5% and 97.5% percentiles of the B refits; a difference (R^2(EE) -
R^2(CE), |alpha_M - alpha_CE|) is computed within each replicate, so its interval keeps the pairing. A difference
whose interval excludes 0 is "outside the noise" of the eval sample (not of the choice of models or training).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ce_dynamics.analysis.scaling import COMPONENTS, SHORT_NAMES, PowerLawFit, ResultsError, fit_power_law, group_rows

LEVEL = 0.95
REPLICATES_FIELD = "replicates"


@dataclass(frozen=True)
class Interval:
    """A point value with its bootstrap standard error and percentile interval."""

    value: float
    se: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def verdict(self, positive: str, negative: str) -> str:
        """Which side a difference is on, if the interval says so: ``positive`` / ``negative`` + ", outside the
        noise", else "within the noise" ("no replicates" without an interval)."""
        if math.isnan(self.lo):
            return "no replicates"
        if not self.excludes_zero:
            return "within the noise"
        return f"{positive if self.value > 0 else negative}, outside the noise"

    def format(self, digits: int = 4, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.value:{sign}.{digits}f} [{self.lo:{sign}.{digits}f}, {self.hi:{sign}.{digits}f}]"


def interval(value: float, draws: np.ndarray) -> Interval:
    """``value`` with the standard deviation and the central 95% of the finite ``draws`` (NaN with < 2)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size < 2:
        return Interval(float(value), math.nan, math.nan, math.nan)
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(value), float(draws.std(ddof=1)), float(lo), float(hi))


def replicate_matrix(rows: Sequence[Mapping], component: str) -> np.ndarray | None:
    """``[B, models]`` replicates of ``component`` for ``rows`` in order; None when any row has none. Refuses
    rows whose replicate counts differ (they were not drawn together, so they cannot be paired)."""
    columns = []
    for row in rows:
        reps = (row.get(REPLICATES_FIELD) or {}).get(component)
        if reps is None:
            return None
        columns.append(np.asarray(reps, dtype=np.float64))
    sizes = {c.size for c in columns}
    if len(sizes) != 1:
        raise ResultsError(f"rows of one fit carry different numbers of bootstrap replicates ({sorted(sizes)}): "
                           "evaluate every model with the same eval.bootstrap so that their replicates pair up")
    return np.stack(columns, axis=1)


def fit_lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha, intercept, R^2) of ``log|y| = c + alpha log x`` for each row of ``y`` ``[B, n]`` at once (the
    formulas of :func:`ce_dynamics.analysis.scaling.fit_power_law`); NaN for a row with a zero or non-finite y."""
    lx = np.log(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ly = np.log(np.abs(np.asarray(y, dtype=np.float64)))
        dx = lx - lx.mean()
        alpha = (ly - ly.mean(1, keepdims=True)) @ dx / (dx @ dx)
        intercept = ly.mean(1) - alpha * lx.mean()
        residual = ly - (intercept[:, None] + alpha[:, None] * lx)
        ss_tot = ((ly - ly.mean(1, keepdims=True)) ** 2).sum(1)
        r2 = np.where(ss_tot > 0, 1 - (residual**2).sum(1) / ss_tot, 1.0)
    bad = ~np.isfinite(ly).all(1)
    return tuple(np.where(bad, np.nan, v) for v in (alpha, intercept, r2))  # type: ignore[return-value]


@dataclass(frozen=True)
class FitWithIntervals:
    """A power-law fit and the paired bootstrap's view of it; ``*_draws`` are the per-replicate refits."""

    fit: PowerLawFit
    alpha: Interval
    intercept: Interval
    r2: Interval
    alpha_draws: np.ndarray
    r2_draws: np.ndarray


def fit_with_intervals(x: Sequence[float], y: Sequence[float], replicates: np.ndarray) -> FitWithIntervals:
    """:func:`fit_power_law` of ``(x, y)`` with 95% intervals from refitting every replicate row of
    ``replicates`` ``[B, len(x)]`` (paired: replicate b of every model drew the same instances)."""
    fit = fit_power_law(x, y)
    xs = np.asarray(x, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    if replicates.ndim != 2 or replicates.shape[1] != xs.size:
        raise ValueError(f"Expected replicates of shape [B, {xs.size}], got {replicates.shape}.")
    alpha, intercept, r2 = fit_lines(xs, replicates)
    return FitWithIntervals(fit, interval(fit.alpha, alpha), interval(fit.intercept, intercept),
                            interval(fit.r2, r2), alpha, r2)


@dataclass(frozen=True)
class Comparison:
    """What the paper argues from, for one (group, dataset), with paired intervals."""

    group: str
    dataset: str
    fits: dict[str, FitWithIntervals]
    r2_gain: Interval  # R^2(EE) - R^2(CE)
    delta_alpha: dict[str, Interval]  # |alpha_M - alpha_CE| per component M

    def best_law(self) -> str:
        """The component whose law fits best (highest R^2)."""
        return max(self.fits, key=lambda c: self.fits[c].fit.r2)

    def verdict(self) -> str:
        return self.r2_gain.verdict("EE better", "CE better")


def compare(rows: Iterable[Mapping], min_models: int = 3) -> list[Comparison]:
    """Per fit group and dataset: every component's fit with intervals, R^2(EE) - R^2(CE) and the exponent
    gaps with paired intervals. Rows without replicates give NaN intervals (the point values stay)."""
    out = []
    for group, per_dataset in group_rows(rows, min_models).items():
        for dataset, subset in per_dataset.items():
            x = [r["non_embedding_params"] for r in subset]
            fits = {}
            for c in COMPONENTS:
                reps = replicate_matrix(subset, c)
                fits[c] = fit_with_intervals(x, [r[c] for r in subset],
                                             reps if reps is not None else np.full((0, len(x)), np.nan))
            ce, ee = fits["cross_entropy"], fits["error_entropy"]
            gain = interval(ee.fit.r2 - ce.fit.r2, ee.r2_draws - ce.r2_draws)
            gaps = {c: interval(abs(f.fit.alpha - ce.fit.alpha), np.abs(f.alpha_draws - ce.alpha_draws))
                    for c, f in fits.items() if c != "cross_entropy"}
            out.append(Comparison(group, dataset, fits, gain, gaps))
    return out


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    """Text: per group and dataset, R^2 and alpha of each law with 95% intervals, R^2(EE) - R^2(CE) and
    whether it is outside the noise, and the exponent gaps."""
    lines = ["Power laws with 95% intervals (paired bootstrap over eval instances):"]
    for comp in comparisons:
        lines.append(f"\n{comp.group} / {comp.dataset}   best law by R^2: {SHORT_NAMES[comp.best_law()]}")
        lines.append(f"  {'':<5} {'R^2':>30} {'alpha':>30}")
        for c, f in comp.fits.items():
            lines.append(f"  {SHORT_NAMES[c]:<5} {f.r2.format():>30} {f.alpha.format(signed=True):>30}")
        lines.append(f"  R^2(EE) - R^2(CE) = {comp.r2_gain.format(signed=True)}: {comp.verdict()}")
        gaps = ", ".join(f"{SHORT_NAMES[c]} {g.format()}" for c, g in comp.delta_alpha.items())
        lines.append(f"  |alpha_M - alpha_CE|: {gaps}")
    return "\n".join(lines)
