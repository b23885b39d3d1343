"""train.py end to end on a very small config: W&B offline read back with the real CLI, npz arrays, resume
with no step logged twice, and 2-process DDP (gloo) logging the same decomposition as 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ce_dynamics.functional import KEYS, decomposition_from_state
from test_callback import wandb_history

pytestmark = pytest.mark.slow  # end-to-end train.py runs, DDP included (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["code", "prose"]


def small(tmp: Path, cache: Path) -> list[str]:
    return [
        f"output_dir={tmp}", f"data.cache_dir={cache}", "model.vocab_size=384", "model.hidden_size=32",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "data.seq_len=24", "data.eval_sequences=9", "data.batch_size=4", "data.train.max_chars=100000",
        "data.tokenizer_train_chars=100000", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim.warmup_steps=1",
    ]


def train_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def decomp_rows(out: Path) -> list[dict]:
    rows = []
    for run_dir in sorted((out / "wandb").glob("offline-run-*")):
        rows += [r for r in wandb_history(run_dir) if "decomp/code/error_entropy" in r]
    return rows


def from_npz(path: Path) -> dict[str, torch.Tensor]:
    state = np.load(path)
    return decomposition_from_state(torch.from_numpy(state["rank_counts"]), torch.from_numpy(state["rank_log_score_sum"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run validating at 0, 2, 4, then resumed to step 6 from `last`."""
    tmp = tmp_path_factory.mktemp("e2e")
    out, cache = tmp / "out", tmp / "cache"
    train_py(*small(out, cache), "trainer.max_steps=4")
    first = decomp_rows(out)
    train_py(*small(out, cache), "trainer.max_steps=6", "ckpt_path=last")
    return {"out": out, "cache": cache, "first": first, "all": decomp_rows(out)}


def test_run_logs_both_eval_sets_at_step_0_and_every_validation(run):
    steps = [int(r["trainer/global_step"]) for r in run["first"]]
    assert steps == [0, 2, 4]
    for row in run["first"]:
        for name in NAMES:
            for key in KEYS:
                assert np.isfinite(row[f"decomp/{name}/{key}"])
            assert row[f"decomp/{name}/p_e._type"] == "histogram"
            assert row[f"decomp/{name}/p_e_vs_q_e._type"] == "image-file"
    assert (run["out"] / "checkpoints" / "last.ckpt").exists()
    assert len(list((run["cache"] / "tokenizers").glob("bpe-384-*.json"))) == 1


def test_npz_arrays_recompute_the_logged_values_exactly(run):
    for row in run["all"]:
        step = int(row["trainer/global_step"])
        for name in NAMES:
            out = from_npz(run["out"] / "arrays" / name / f"step_{step}.npz")
            assert int(out["num_tokens"]) == 9 * 23
            for key in KEYS:
                assert float(out[key]) == row[f"decomp/{name}/{key}"], (step, name, key)


def test_resume_continues_the_charts_without_logging_a_step_twice(run):
    steps = [int(r["trainer/global_step"]) for r in run["all"]]
    assert steps == [0, 2, 4, 6]
    ids = {p.name.rsplit("-", 1)[1] for p in (run["out"] / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # the same W&B run id: the charts continue
    # training went on from the checkpoint rather than from scratch: step 6 improves on step 4
    assert run["all"][3]["decomp/code/cross_entropy"] < run["all"][2]["decomp/code/cross_entropy"]


def test_ddp_two_processes_log_the_same_decomposition_as_one(run, tmp_path):
    """9 eval instances on 2 gloo ranks (5 + 4, no padding repeats): the summed state equals 1 process's."""
    out = tmp_path / "ddp"
    train_py(*small(out, run["cache"]), "trainer.max_steps=0", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.strategy=ddp", "logger.wandb.mode=disabled")
    for name in NAMES:
        single = np.load(run["out"] / "arrays" / name / "step_0.npz")
        double = np.load(out / "arrays" / name / "step_0.npz")
        np.testing.assert_array_equal(double["rank_counts"], single["rank_counts"])
        np.testing.assert_allclose(double["rank_log_score_sum"], single["rank_log_score_sum"], rtol=1e-12)
        a, b = from_npz(run["out"] / "arrays" / name / "step_0.npz"), from_npz(out / "arrays" / name / "step_0.npz")
        for key in KEYS:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-12)


def test_online_without_api_key_falls_back_to_offline(tmp_path, monkeypatch):
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.training import build_loggers

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = load_config([f"output_dir={tmp_path}", "logger.wandb.mode=online"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = build_loggers(cfg, "no-key")
    import wandb

    try:
        assert any("logging offline instead" in str(w.message) for w in caught)
        assert loggers[-1].experiment.settings.mode == "offline"
    finally:
        wandb.finish()


def test_wandb_run_ids_are_stable_per_run_name(tmp_path):
    from ce_dynamics.runs.training import _wandb_run_id

    first = _wandb_run_id(tmp_path, "tiny")
    assert _wandb_run_id(tmp_path, "tiny") == first  # a resumed run continues the same charts
    assert _wandb_run_id(tmp_path, "replay EleutherAI/pythia-70m") != first  # other runs stay apart
