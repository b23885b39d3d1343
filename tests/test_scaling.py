"""Power-law fits, tables, readers, non-embedding parameter counts and the scaling CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ce_dynamics.analysis import report, scaling
from ce_dynamics.analysis.scaling import (
    PowerLawFit,
    ResultsError,
    component_shares,
    delta_table,
    exponent_gaps,
    family_of,
    fit_groups,
    fit_power_law,
    load_results,
    non_embedding_params,
    r2_table,
    select_final,
)

ROOT = Path(__file__).resolve().parents[1]
PYTHIA_SIZES = [1_189_888, 4_739_072, 18_915_328, 85_056_000, 302_311_424]
EXPONENTS = {"cross_entropy": -0.08, "error_entropy": -0.11, "self_alignment": 0.05, "confidence": -0.02}


# ----------------------------------------------------------------------------------------------- fits


@pytest.mark.parametrize("alpha", [-0.3, -0.07, 0.0, 0.5])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fit_recovers_exponent_on_noiseless_data(alpha: float, sign: float) -> None:
    x = np.geomspace(1e6, 7e10, 9)
    fit = fit_power_law(x, sign * 2.5 * x**alpha)
    assert fit.alpha == pytest.approx(alpha, abs=1e-12)
    assert fit.intercept == pytest.approx(np.log(2.5), abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.num_points == 9
    np.testing.assert_allclose(fit.predict(x), 2.5 * x**alpha, rtol=1e-10)


def test_fit_matches_numpy_least_squares_on_noisy_data() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(3, 30))
        x = np.exp(rng.uniform(10, 25, n))
        y = 3.0 * x ** rng.uniform(-0.5, 0.5) * np.exp(rng.normal(0, 0.4, n))
        fit = fit_power_law(x, y)
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        design = np.stack([np.ones(n), np.log(x)], axis=1)
        coef, res, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
        assert fit.alpha == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert fit.intercept == pytest.approx(intercept, rel=1e-9, abs=1e-12)
        assert fit.alpha == pytest.approx(coef[1], rel=1e-9, abs=1e-12)
        # R^2 of a simple regression is the squared correlation of log x and log y.
        assert fit.r2 == pytest.approx(np.corrcoef(np.log(x), np.log(y))[0, 1] ** 2, rel=1e-9)
        assert 0.0 <= fit.r2 <= 1.0


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([1.0], [1.0], "at least 2 points"),
        ([], [], "at least 2 points"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([1.0, 0.0, 3.0], [1.0, 2.0, 3.0], "x must be positive"),
        ([1.0, -2.0, 3.0], [1.0, 2.0, 3.0], "x must be positive"),
        ([1.0, 2.0, 3.0], [1.0, 0.0, 3.0], "non-zero"),
        ([1.0, 2.0, np.nan], [1.0, 2.0, 3.0], "finite"),
        ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], "distinct"),
    ],
)
def test_fit_rejects_bad_input(x, y, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_exponent_gaps_are_absolute_differences_to_cross_entropy() -> None:
    fits = {name: PowerLawFit(alpha=a, intercept=0.0, r2=1.0, num_points=3) for name, a in EXPONENTS.items()}
    gaps = exponent_gaps(fits)
    assert gaps == pytest.approx({"error_entropy": 0.03, "self_alignment": 0.13, "confidence": 0.06})
    with pytest.raises(ValueError, match="cross_entropy"):
        exponent_gaps({"error_entropy": fits["error_entropy"]})


def test_component_shares_follow_the_signed_identity() -> None:
    row = {"cross_entropy": 3.0, "error_entropy": 2.7, "self_alignment": 0.5, "confidence": 0.2}
    shares = component_shares(row, "signed")
    assert shares == pytest.approx({"error_entropy": 0.9, "self_alignment": 0.5 / 3, "confidence": 0.2 / 3})
    assert shares["error_entropy"] + shares["self_alignment"] - shares["confidence"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cross_entropy is 0"):
        component_shares({**row, "cross_entropy": 0.0}, "signed")


def test_component_shares_default_to_absolute_values_summing_to_one() -> None:
    # Confidence negative (C < 1), as in the paper's tables: |EE| + |SA| + |Conf| = 2.7 + 0.5 + 0.8 = 4.0
    row = {"cross_entropy": 4.0, "error_entropy": 2.7, "self_alignment": 0.5, "confidence": -0.8}
    shares = component_shares(row)
    assert shares == pytest.approx({"error_entropy": 2.7 / 4, "self_alignment": 0.5 / 4, "confidence": 0.8 / 4})
    assert sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="convention must be one of"):
        component_shares(row, "percent")


def test_a_component_changing_sign_is_fitted_with_a_warning() -> None:
    rows = [{"model": f"fam-{n}", "dataset": "d", "non_embedding_params": n, "cross_entropy": 4.0 / n ** 0.1,
             "error_entropy": 3.0 / n ** 0.1, "self_alignment": 1.0 / n ** 0.2, "confidence": c}
            for n, c in ((1e6, -0.3), (1e7, -0.1), (1e8, 0.2))]
    with pytest.warns(UserWarning, match=r"confidence changes sign across the models of fam/d \(from -0.3 to 0.2\)"):
        fits = fit_groups(rows, min_models=3)
    assert set(fits["fam"]["d"]) == {"cross_entropy", "error_entropy", "self_alignment", "confidence"}


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("EleutherAI/pythia-160m", "pythia"),
        ("EleutherAI/pythia-1.4b-deduped", "pythia"),
        ("gpt2-xl", "gpt-1/2"),
        ("openai-community/openai-gpt", "gpt-1/2"),
        ("distilbert/distilgpt2", "others"),
        ("EleutherAI/pythia-12b", "pythia"),
        ("Qwen/Qwen2.5-0.5B", "qwen"),
        ("facebook/opt-1.3b", "opt"),
        ("meta-llama/Meta-Llama-3-8B", "llama"),
        ("mistralai/Mistral-7B-v0.1", "mistral"),
    ],
)
def test_family_from_hub_id(model: str, family: str) -> None:
    assert family_of(model) == family
    assert family_of({"model": model}) == family
    assert family_of({"model": model, "family": "mine"}) == "mine"


# ------------------------------------------------------------------------------ non-embedding params


def _pythia_on_meta(hidden: int, layers: int, heads: int) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize(
    ("hidden", "layers", "heads", "expected"),
    [(128, 6, 4, 1_189_888), (512, 6, 8, 18_915_328), (768, 12, 12, 85_056_000)],
    ids=["pythia-14m", "pythia-70m", "pythia-160m"],
)
def test_non_embedding_params_match_table_4_for_pythia(hidden: int, layers: int, heads: int, expected: int) -> None:
    model = _pythia_on_meta(hidden, layers, heads)
    assert next(model.parameters()).is_meta
    assert non_embedding_params(model) == expected
    assert sum(p.numel() for p in model.parameters()) - 2 * 50304 * hidden == expected


def test_non_embedding_params_tied_and_position_embeddings_match_table_4() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config())  # tied wte/lm_head plus learned wpe
        llama = LlamaForCausalLM(
            LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
        )
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert non_embedding_params(gpt2) == 85_056_000  # Table 4: gpt2
    assert non_embedding_params(llama) == 973_146_112  # Table 4: llama-3.2-1b


# ---------------------------------------------------------------------------------- rows and tables


def _rows(families: dict[str, list[int]], datasets=("wiki", "code"), noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for family, sizes in families.items():
        for n in sizes:
            for dataset in datasets:
                row = {"model": f"org/{family}-{n}", "revision": "step100", "step": 100, "dataset": dataset,
                       "num_tokens": 4096, "non_embedding_params": n, "accuracy": 0.3, "mean_reciprocal_rank": 0.4}
                for name, alpha in EXPONENTS.items():
                    row[name] = 4.0 * n**alpha * float(np.exp(rng.normal(0.0, noise)))
                rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fit_groups_and_tables_on_exact_power_laws() -> None:
    rows = _rows({"pythia": PYTHIA_SIZES, "toy": [10**k for k in range(4, 8)]})
    fits = fit_groups(rows, min_models=3)
    assert list(fits) == ["pythia", "toy", "All"]
    assert list(fits["pythia"]) == ["wiki", "code"]
    for per_dataset in fits.values():
        for per_component in per_dataset.values():
            for name, fit in per_component.items():
                assert fit.alpha == pytest.approx(EXPONENTS[name], abs=1e-12)
    r2, delta = r2_table(fits), delta_table(fits)
    assert r2.values["All"]["code"]["EE"] == pytest.approx(1.0)
    assert delta.values["pythia"]["wiki"] == pytest.approx({"EE": 0.03, "SA": 0.13, "Conf": 0.06})
    assert delta.best("pythia", "wiki") == "EE"
    text = delta.format()
    assert text.splitlines()[0].split()[1:] == ["wiki", "code"]
    assert "0.0300*" in text and "0.1300*" not in text


def test_fit_groups_skips_small_families_and_says_why_when_none_fits() -> None:
    rows = _rows({"pythia": PYTHIA_SIZES, "pair": [10**4, 10**5]})
    assert list(fit_groups(rows, min_models=3)) == ["pythia", "All"]
    with pytest.raises(ResultsError, match=r"too few models.*pair: 2"):
        fit_groups(_rows({"pair": [10**4, 10**5]}), min_models=3)


def test_select_final_takes_the_last_step_per_model_and_dataset() -> None:
    early = _rows({"pythia": PYTHIA_SIZES[:3]})
    late = [{**r, "step": 1000, "cross_entropy": 1.0} for r in early]
    chosen = select_final(early + late)
    assert len(chosen) == len(early) and all(r["step"] == 1000 for r in chosen)
    assert all(r["step"] == 100 for r in select_final(late + early, step=100))
    with pytest.raises(ResultsError, match="step 5"):
        select_final(early, step=5)


def test_load_results_reads_rows_and_points_at_bad_lines(tmp_path: Path) -> None:
    rows = _rows({"pythia": PYTHIA_SIZES})
    good = _write(tmp_path / "results.jsonl", rows)
    assert load_results(good) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ResultsError, match=r"bad.jsonl:2: not a JSON line"):
        load_results(bad)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_tables_and_writes_figures(tmp_path: Path) -> None:
    """Through `python -m`, on rows whose fits are solved by hand (tests/closed_form_scaling.py)."""
    import closed_form_scaling as cf
    from matplotlib.image import imread

    results = _write(tmp_path / "results.jsonl", cf.history())
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "ce_dynamics.analysis", str(results)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["R^2", cf.DATASET]
    assert lines[1].split() == ["CE", "EE", "SA", "Conf"]
    assert lines[2].split()[0] == cf.FAMILY
    r2 = cf.table_cells(proc.stdout, "R^2")
    assert {k: v.rstrip("*") for k, v in r2.items()} == cf.cells(cf.R2, best="")
    assert cf.table_cells(proc.stdout, "|Delta|") == cf.cells(cf.DELTA, best="Conf")
    for name in ("scaling_law.png", "component_shares.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert imread(png)[..., :3].std() > 0.05, name  # not a blank canvas


def _bad_results(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rows = _rows({"pythia": PYTHIA_SIZES})
    missing = [dict(r) for r in rows]
    del missing[2]["error_entropy"]
    zero = [dict(r) for r in rows]
    zero[1]["non_embedding_params"] = 0
    return {
        "too_few": (_write(tmp_path / "few.jsonl", rows[:4]), "too few models"),
        "missing": (_write(tmp_path / "missing.jsonl", missing), "missing field(s) ['error_entropy']"),
        "non_positive": (_write(tmp_path / "zero.jsonl", zero), "non_embedding_params must be a positive number"),
        "not_json": (_write(tmp_path / "text.jsonl", rows[:1]).parent / "text.jsonl", "not a JSON line"),
        "absent": (tmp_path / "nope.jsonl", "results file not found"),
        "empty": (_write(tmp_path / "empty.jsonl", []), "no result rows"),
    }


@pytest.mark.parametrize("case", ["too_few", "missing", "non_positive", "not_json", "absent", "empty"])
def test_cli_bad_input_exits_2_with_a_message(tmp_path: Path, case: str, capsys) -> None:
    path, message = _bad_results(tmp_path)[case]
    if case == "not_json":
        path.write_text(path.read_text() + "oops, not json\n")
    assert report.main([str(path), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_cli_bad_input_through_python_m(tmp_path: Path) -> None:
    path, message = _bad_results(tmp_path)["missing"]
    proc = subprocess.run([sys.executable, "-m", "ce_dynamics.analysis", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "scaling_law.png").exists()
