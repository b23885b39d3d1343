"""Both analysis notebooks execute end to end (nbclient) on what a real tiny training run (arrays/) and a real
tiny replay of three model sizes (results.jsonl) write; the `tiny_scaling` sweep's results feed the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import nbformat
import pytest
from hub_cache import build_hub_cache, offline_hub
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # training runs, a sweep and two notebooks executed (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DYNAMICS_STEPS = (0, 2, 4, 6)
SCALING_SIZES = ((32, 1), (48, 1), (64, 2))  # (hidden, layers) of the tiny_scaling sweep
REPLAY_HIDDEN = (16, 32, 64)  # hub models replayed for the scaling notebook


def _tiny_overrides(tmp: Path) -> list[str]:
    """A seconds-long CPU run: tiny vocabulary, model and data; no W&B."""
    return [
        f"output_dir={tmp}", f"data.cache_dir={tmp.parent / 'tokenizers'}", "model.vocab_size=384",
        "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=128",
        "model.max_position_embeddings=64", "data.seq_len=32", "data.eval_sequences=8", "data.batch_size=8",
        "data.tokenizer_train_chars=100000", "data.train.max_chars=200000", "trainer.max_steps=6",
        "trainer.val_check_interval=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger.wandb.mode=disabled", "optim.warmup_steps=2",
    ]


@pytest.fixture(scope="session")
def dynamics_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny training run (`run_training`), validated at steps 0, 2, 4, 6 on the code and prose sets."""
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.training import run_training

    run = tmp_path_factory.mktemp("dynamics") / "run"
    assert run_training(load_config(_tiny_overrides(run))) == 0
    return run


@pytest.fixture(scope="session")
def replay_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.jsonl of a real replay (`run_replay`) of three tiny hub models of different width, steps 0 and 4."""
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.replay import run_replay

    root = tmp_path_factory.mktemp("replay")
    ids = [f"ce-dynamics-test/tiny-neox-h{h}" for h in REPLAY_HIDDEN]
    for hub_id, hidden in zip(ids, REPLAY_HIDDEN):
        build_hub_cache(root / "hub", hub_id=hub_id, steps=(0, 4), hidden_size=hidden)
    cfg = load_config([
        "mode=replay", f"output_dir={root / 'out'}", f"data.cache_dir={root / 'tokenizers'}", "data.seq_len=32",
        "data.eval_sequences=8", "data.batch_size=8", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger.wandb.mode=disabled", f"replay.models=[{','.join(ids)}]",
        "replay.revisions=[0,4]",
    ])
    with offline_hub(root / "hub"):
        assert run_replay(cfg) == 0
    return root / "out" / "results.jsonl"


@pytest.fixture(scope="session")
def scaling_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.jsonl of a real tiny `tiny_scaling` sweep: three model sizes, final rows per eval set."""
    from ce_dynamics.runs.sweep import run_sweep_rows

    out = tmp_path_factory.mktemp("scaling") / "sweep"
    argv = [a for a in _tiny_overrides(out) if not a.startswith(("model.hidden_size", "model.num_hidden_layers",
                                                                  "model.intermediate_size"))]
    return run_sweep_rows(argv, sizes=SCALING_SIZES)


def _execute(name: str, **parameters) -> nbformat.NotebookNode:
    """Run a notebook with its `parameters` cell overridden by a cell injected after it (as papermill does)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _images(nb: nbformat.NotebookNode) -> int:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("name", ["training_dynamics.ipynb", "scaling_law.ipynb"])
def test_notebooks_are_stored_without_outputs_and_with_a_parameters_cell(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_training_dynamics_notebook(dynamics_run: Path) -> None:
    nb = _execute("training_dynamics.ipynb", run_dir=str(dynamics_run), dataset="code")
    text = _text(nb)
    assert f"identity holds on all {2 * len(DYNAMICS_STEPS)} states" in text
    table = [w for w in (line.split() for line in text.splitlines()) if len(w) == 9 and w[1].isdigit()]
    printed = {(w[0], int(w[1])): w[3:7] for w in table}  # CE, EE, SA, Conf recomputed from the arrays
    assert set(printed) == {(d, s) for d in ("code", "prose") for s in DYNAMICS_STEPS}
    # ... and they are the numbers the callback logged during training (CSV logger), to the printed digits.
    with open(next(dynamics_run.glob("csv/version_*/metrics.csv")), newline="") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("decomp/code/cross_entropy")]
    for r in logged:
        for d in ("code", "prose"):
            keys = [f"decomp/{d}/{k}" for k in ("cross_entropy", "error_entropy", "self_alignment", "confidence")]
            assert printed[(d, int(r["step"]))] == [f"{float(r[k]):.4f}" for k in keys]
    assert {int(r["step"]) for r in logged} == set(DYNAMICS_STEPS)
    assert _images(nb) == 3  # figs. 3, 4, 6


def test_tiny_scaling_sweep_feeds_the_cli(scaling_results: Path, capsys) -> None:
    from ce_dynamics.analysis import report, scaling

    rows = scaling.load_results(scaling_results)
    assert len(rows) == 2 * len(SCALING_SIZES)
    assert {(r["family"], r["step"], r["dataset"]) for r in rows} == {("tiny-neox", 6, d) for d in ("code", "prose")}
    sizes = [r["non_embedding_params"] for r in rows if r["dataset"] == "code"]
    assert sizes == sorted(set(sizes))
    for r in rows:
        assert r["cross_entropy"] == pytest.approx(r["error_entropy"] + r["self_alignment"] - r["confidence"], abs=1e-9)
    assert report.main([str(scaling_results), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[0] == "tiny-neox"
    # the bootstrap's paired replicates reach the rows, and the table says which law is better and if beyond noise
    assert all(len(r["replicates"]["error_entropy"]) == 200 and r["error_entropy_lo"] < r["error_entropy_hi"]
               for r in rows)
    verdicts = [line for line in out.splitlines() if line.strip().startswith("R^2(EE) - R^2(CE) =")]
    assert len(verdicts) == 2 and all(v.endswith(("within the noise", "outside the noise")) for v in verdicts)
    assert out.count("best law by R^2:") == 2
    assert report.main([str(scaling_results), "--no-figures", "--holdout", "1"]) == 0
    assert "error(CE direct) - error(CE assembled)" in capsys.readouterr().out


def test_scaling_law_notebook(replay_results: Path) -> None:
    """Its tables and exponents are numpy's least-squares fits of log|M| on log N over the replay's last rows."""
    import numpy as np

    from ce_dynamics.analysis.scaling import COMPONENTS, load_results

    rows = [r for r in load_results(replay_results) if r["step"] == 4]  # each model's last revision
    assert len(rows) == 2 * len(REPLAY_HIDDEN)
    nb = _execute("scaling_law.ipynb", results_path=str(replay_results))
    text = _text(nb)
    lines = text.splitlines()
    table = lines.index(next(line for line in lines if line.split()[:3] == ["R^2", "code", "prose"]))
    family_row = lines[table + 2].split()
    assert family_row[0] == "tiny"  # ce-dynamics-test/tiny-neox-h16 ... : one family, so no "All" row
    expected_r2, alphas = [], {}
    for dataset in ("code", "prose"):
        subset = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: r["non_embedding_params"])
        log_n = np.log([r["non_embedding_params"] for r in subset])
        for comp in COMPONENTS:
            log_m = np.log(np.abs([r[comp] for r in subset]))
            expected_r2.append(f"{np.corrcoef(log_n, log_m)[0, 1] ** 2:.4f}")
            alphas[(dataset, comp)] = np.polyfit(log_n, log_m, 1)[0]
    assert [cell.rstrip("*") for cell in family_row[1:]] == expected_r2
    for dataset in ("code", "prose"):
        printed = ", ".join(f"{c}={alphas[(dataset, c)]:+.4f}" for c in COMPONENTS)
        assert f"tiny/{dataset}: alpha {printed}" in text
    assert "|Delta|" in text
    assert _images(nb) == 2  # figs. 7, 8


def test_notebook_reports_a_missing_run_clearly(tmp_path: Path) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="no arrays/<dataset>/step_<N>.npz files"):
        _execute("training_dynamics.ipynb", run_dir=str(tmp_path))
