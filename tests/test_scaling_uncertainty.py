"""Fits with uncertainty and the hold-out test, on closed-form rows whose replicates are exact power laws
perturbed by known amounts: every interval and prediction error is re-derived here with np.polyfit and
np.quantile, independently of ce_dynamics.analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from closed_form_scaling import SIZES, rows as closed_rows

from ce_dynamics.analysis import report
from ce_dynamics.analysis.holdout import holdout
from ce_dynamics.analysis.scaling import COMPONENTS
from ce_dynamics.analysis.uncertainty import compare, fit_with_intervals

B = 60


def perturbations(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per component: a level shift d_b and a slope shift e_b per replicate (replicate b: y_k exp(d_b + e_b k))."""
    rng = np.random.default_rng(seed)
    return {c: (rng.normal(0, 0.02, B), rng.normal(0, 0.01, B)) for c in COMPONENTS}


def with_replicates(rows: list[dict], shifts: dict) -> list[dict]:
    out = []
    for k, row in enumerate(rows):
        reps = {c: (row[c] * np.exp(d + e * k)).tolist() for c, (d, e) in shifts.items()}
        out.append({**row, "replicates": reps})
    return out


def polyfit_r2(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    slope, icpt = np.polyfit(lx, ly, 1)
    res = ly - (icpt + slope * lx)
    return float(slope), 1.0 - float(res @ res) / float(((ly - ly.mean()) ** 2).sum())


def q(values) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(values), [0.025, 0.975])
    return float(lo), float(hi)


def test_fit_intervals_and_paired_differences_match_an_independent_refit_of_every_replicate() -> None:
    shifts = perturbations(0)
    rows = with_replicates(closed_rows(), shifts)
    (comp,) = compare(rows)
    lx = np.log(SIZES)
    slopes, r2s = {}, {}
    for c in COMPONENTS:
        reps = np.asarray([r["replicates"][c] for r in rows]).T  # [B, models]
        fitted = [polyfit_r2(lx, np.log(np.abs(y))) for y in reps]
        slopes[c] = np.asarray([f[0] for f in fitted])
        r2s[c] = np.asarray([f[1] for f in fitted])
        got = comp.fits[c]
        assert (got.alpha.lo, got.alpha.hi) == pytest.approx(q(slopes[c]), abs=1e-10), c
        assert got.alpha.se == pytest.approx(slopes[c].std(ddof=1), abs=1e-10)
        if c != "error_entropy":  # exact power laws: the slope shifts by e_b exactly, R^2 stays 1
            np.testing.assert_allclose(slopes[c] - got.fit.alpha, shifts[c][1], atol=1e-10)
            assert got.r2.lo == pytest.approx(1.0) and got.r2.hi == pytest.approx(1.0)
    assert (comp.fits["error_entropy"].r2.lo, comp.fits["error_entropy"].r2.hi) == pytest.approx(
        q(r2s["error_entropy"]), abs=1e-10)
    gain = r2s["error_entropy"] - r2s["cross_entropy"]
    assert comp.r2_gain.value == pytest.approx(0.75 - 1.0)
    assert (comp.r2_gain.lo, comp.r2_gain.hi) == pytest.approx(q(gain), abs=1e-10)
    assert comp.verdict() == "CE better, outside the noise"  # the kinked EE law is worse in every replicate
    for c in ("error_entropy", "self_alignment", "confidence"):
        gap = np.abs(slopes[c] - slopes["cross_entropy"])
        assert (comp.delta_alpha[c].lo, comp.delta_alpha[c].hi) == pytest.approx(q(gap), abs=1e-10), c


def test_a_difference_inside_the_noise_is_reported_as_such() -> None:
    x, y = SIZES, [2.0 * math.exp(-0.1 * k) for k in range(3)]
    a = fit_with_intervals(x, y, np.asarray([[v * math.exp(0.3 * s * k) for k, v in enumerate(y)]
                                             for s in np.linspace(-1, 1, 41)]))
    assert a.alpha.lo < a.fit.alpha < a.alpha.hi
    assert a.alpha.lo == pytest.approx(-0.1 - 0.3 * 0.95, abs=1e-9)  # the 2.5% quantile of 41 evenly spaced shifts


def four_models(shifts: dict | None = None) -> list[dict]:
    """Components exact power laws in size; CE = EE + SA - Conf (so CE itself is not a power law)."""
    sizes = [1e4 * math.exp(k) for k in range(4)]
    laws = {"error_entropy": (2.0, -0.05), "self_alignment": (0.5, 0.3), "confidence": (-0.7, -0.05)}
    rows = []
    for k, size in enumerate(sizes):
        row = {"model": f"org/toy-{k}", "family": "toy", "dataset": "wiki", "step": 1, "revision": "step1",
               "num_tokens": 100, "non_embedding_params": size}
        row.update({c: a * math.exp(s * k) for c, (a, s) in laws.items()})
        if shifts is not None:
            row["replicates"] = {c: (row[c] * np.exp(shifts[c][0] + shifts[c][1] * k)).tolist() for c in laws}
        rows.append(row)
    for row in rows:
        row["cross_entropy"] = row["error_entropy"] + row["self_alignment"] - row["confidence"]
        if shifts is not None:
            r = {c: np.asarray(v) for c, v in row["replicates"].items()}
            row["replicates"]["cross_entropy"] = (r["error_entropy"] + r["self_alignment"] - r["confidence"]).tolist()
    return rows


def direct_error(sizes: np.ndarray, ce: np.ndarray) -> float:
    slope, icpt = np.polyfit(np.log(sizes[:3]), np.log(ce[:3]), 1)
    return abs(math.exp(icpt + slope * math.log(sizes[3])) - ce[3])


def test_holdout_predictions_and_errors_match_an_independent_extrapolation() -> None:
    shifts = perturbations(1)
    rows = four_models(shifts)
    (h,) = holdout(rows, 1)
    sizes = np.asarray([r["non_embedding_params"] for r in rows])
    assert h.test_sizes == [sizes[3]] and len(h.train_sizes) == 3
    for c in ("ce_assembled", "error_entropy", "self_alignment", "confidence"):
        assert h.errors[c].value == pytest.approx(0.0, abs=1e-12), c  # exact power laws extrapolate exactly
        assert h.errors[c].hi == pytest.approx(0.0, abs=1e-12), c
    ce = np.asarray([r["cross_entropy"] for r in rows])
    assert h.errors["ce_direct"].value == pytest.approx(direct_error(sizes, ce), rel=1e-9)
    draws = [direct_error(sizes, np.asarray([r["replicates"]["cross_entropy"][b] for r in rows])) for b in range(B)]
    assert (h.errors["ce_direct"].lo, h.errors["ce_direct"].hi) == pytest.approx(q(draws), rel=1e-9)
    assert h.assembled_gain.lo > 0 and h.verdict() == "assembled better, outside the noise"


def test_the_cli_prints_the_verdicts_and_draws_the_extrapolation(tmp_path, capsys) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in four_models(perturbations(2))))
    assert report.main([str(path), "--holdout", "1", "--out", str(tmp_path / "figs")]) == 0
    text = capsys.readouterr().out
    assert "R^2(EE) - R^2(CE) =" in text and "best law by R^2:" in text
    assert "error(CE direct) - error(CE assembled)" in text and "assembled better, outside the noise" in text
    assert (tmp_path / "figs" / "holdout.png").stat().st_size > 10_000
    assert report.main([str(path), "--holdout", "3", "--no-figures"]) == 2  # 4 models cannot hold out 3
    assert "--holdout 3" in capsys.readouterr().err


def test_figures_draw_bands_and_error_bars_only_where_the_numbers_have_intervals() -> None:
    from matplotlib.collections import PolyCollection

    from ce_dynamics.analysis.figures import plot_components_vs_step, plot_scaling_law

    def numbers(with_band: bool) -> dict:
        steps = {}
        for i, s in enumerate((0, 4, 16)):
            values = {c: 1.0 + i + j for j, c in enumerate(COMPONENTS)}
            band = {f"{c}{sfx}": v + d for c, v in values.items() for sfx, d in (("_lo", -0.1), ("_hi", 0.1))}
            steps[s] = {**values, **(band if with_band else {})}
        return {"code": steps}

    for with_band, bands in ((True, len(COMPONENTS)), (False, 0)):
        fig = plot_components_vs_step(numbers(with_band))  # CE/EE on top, SA/Conf below: one band per line
        assert sum(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections) == bands
    rows = four_models()
    with_bars = [{**r, **{f"{c}_lo": r[c] - 0.01 for c in COMPONENTS}, **{f"{c}_hi": r[c] + 0.01 for c in COMPONENTS}}
                 for r in rows]
    assert all(len(ax.containers) == 1 for ax in plot_scaling_law(with_bars).axes)
    assert all(len(ax.containers) == 0 for ax in plot_scaling_law(rows).axes)
