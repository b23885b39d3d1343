"""Scaling analysis behaviours checked against hand-solved fits (tests/closed_form_scaling.py): a rerun's row
replaces the older one, the CLI's --step, --min-models and --out, the figures' plotted data, and load_arrays
on an incomplete npz."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import closed_form_scaling as cf
from ce_dynamics.analysis import figures, report, scaling
from ce_dynamics.analysis.scaling import ResultsError, fit_groups, load_arrays, select_final


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_select_final_a_rerun_at_the_same_step_replaces_the_older_row():
    chosen = select_final(cf.history())
    assert sorted((r["model"], r["step"], r["cross_entropy"]) for r in chosen) == \
        sorted((r["model"], 100, r["cross_entropy"]) for r in cf.rows())
    at_100 = select_final(cf.history(), step=100)
    assert sorted(r["cross_entropy"] for r in at_100) == sorted(r["cross_entropy"] for r in cf.rows())
    at_50 = select_final(cf.history(), step=50)
    assert sorted(r["cross_entropy"] for r in at_50) == sorted(r["cross_entropy"] for r in cf.rows(-0.3, 50))


def _no_star(cells: dict[str, str]) -> dict[str, str]:
    return {k: v.rstrip("*") for k, v in cells.items()}


def test_cli_tables_are_the_closed_form_fits_and_step_picks_the_rows(tmp_path: Path, capsys) -> None:
    results = _write(tmp_path / "results.jsonl", cf.history())
    assert report.main([str(results), "--no-figures"]) == 0
    out = capsys.readouterr().out
    r2 = cf.table_cells(out, "R^2")
    # R^2: three components tie at 1 up to rounding, so only say that EE (0.75) is not the best
    assert _no_star(r2) == _no_star(cf.cells(cf.R2, best=""))
    assert sum(v.endswith("*") for v in r2.values()) == 1 and not r2["EE"].endswith("*")
    assert cf.table_cells(out, "|Delta|") == cf.cells(cf.DELTA, best="Conf")
    assert not list(tmp_path.glob("*.png"))  # --no-figures

    assert report.main([str(results), "--no-figures", "--step", "50"]) == 0
    assert cf.table_cells(capsys.readouterr().out, "|Delta|") == cf.cells(cf.DELTA_STEP_50, best="Conf")


@pytest.mark.parametrize(("args", "message"), [
    (["--min-models", "4"], "need at least 4 models of distinct size in a family (models per family: toy: 3)"),
    (["--min-models", "1"], "min_models must be >= 2"),
    (["--step", "7"], "no result rows at step 7"),
])
def test_cli_min_models_and_a_missing_step_exit_2_with_a_message(tmp_path: Path, capsys, args, message) -> None:
    results = _write(tmp_path / "results.jsonl", cf.history())
    assert report.main([str(results), "--no-figures", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_cli_min_models_2_fits_a_two_model_family(tmp_path: Path, capsys) -> None:
    # two models: the line through both points is exact, R^2 = 1 for every component, EE's slope is 0 (log 2, log 2)
    results = _write(tmp_path / "results.jsonl", cf.rows()[:2])
    assert report.main([str(results), "--no-figures", "--min-models", "2"]) == 0
    delta = cf.table_cells(capsys.readouterr().out, "|Delta|")
    assert _no_star(delta) == {"EE": "0.1000", "SA": "0.4000", "Conf": "0.0500"}


def test_cli_out_puts_the_figures_there(tmp_path: Path, capsys) -> None:
    from matplotlib.image import imread

    results = _write(tmp_path / "results.jsonl", cf.history())
    out = tmp_path / "figs"
    assert report.main([str(results), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["component_shares.png", "scaling_law.png"]
    assert not list(tmp_path.glob("*.png"))  # not next to the results
    for name in names:
        assert f"wrote {out / name}" in printed
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something was drawn


def test_scaling_law_figure_plots_the_rows_and_the_closed_form_fit() -> None:
    rows = select_final(cf.history())
    fig = figures.plot_scaling_law(rows, fit_groups(rows))
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 4  # CE, EE, SA, Conf of the one dataset
    x_line = None
    for ax, comp in zip(panels, scaling.COMPONENTS):
        points = ax.collections[0].get_offsets()
        np.testing.assert_allclose(points[:, 0], cf.SIZES)
        np.testing.assert_allclose(points[:, 1], [abs(r[comp]) for r in cf.rows()])
        (line,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        x_line, y_line = (np.asarray(v, dtype=float) for v in line.get_data())
        k = np.log(x_line) - math.log(1e4)
        if comp == "error_entropy":  # least squares through (0, 0, 0.2) + log 2: slope 0.1, mean 0.2/3 at k = 1
            expected = cf.EE_SCALE * np.exp(cf.EE_KINK / 3 + 0.1 * (k - 1))
        else:
            scale, slope = cf.LAST[comp]
            expected = abs(scale) * np.exp(slope * k)
        np.testing.assert_allclose(y_line, expected, rtol=1e-9)
    assert x_line[0] == pytest.approx(cf.SIZES[0]) and x_line[-1] == pytest.approx(cf.SIZES[-1])

    def drawn(fig) -> set:
        return {tuple(np.round(ln.get_ydata(), 9)) for ax in fig.axes for ln in ax.lines if len(ln.get_ydata())}

    absolute = drawn(figures.plot_component_shares(rows))  # default: |M| / (|EE| + |SA| + |Conf|), sums to 100%
    signed = drawn(figures.plot_component_shares(rows, convention="signed"))  # M / CE
    for comp in scaling.COMPONENTS[1:]:
        total = [abs(r["error_entropy"]) + abs(r["self_alignment"]) + abs(r["confidence"]) for r in cf.rows()]
        assert tuple(np.round([100 * abs(r[comp]) / t for r, t in zip(cf.rows(), total)], 9)) in absolute, comp
        assert tuple(np.round([100 * r[comp] / r["cross_entropy"] for r in cf.rows()], 9)) in signed, comp


def test_load_arrays_names_a_npz_missing_an_array(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "arrays" / "code"
    folder.mkdir(parents=True)
    np.savez(folder / "step_4.npz", rank_counts=np.array([3, 1, 0]))
    with pytest.raises(ResultsError, match=r"step_4\.npz is damaged \(missing array\(s\) \['rank_log_score_sum'\]\)"):
        load_arrays(tmp_path / "run")
