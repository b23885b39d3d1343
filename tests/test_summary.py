"""The end-of-run summary read from an output_dir, and the terminal output of training: a bar over optimizer
steps (not "Epoch 0/-2") and a model summary without "Total FLOPs: 0"."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ce_dynamics.lightning.progress import CompactModelSummary, StepProgressBar, console_callbacks
from ce_dynamics.runs.summary import summary_text


def _state(seed: int, vocab: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, vocab)
    counts[0] = 40
    sums = -rng.uniform(0.1, 6.0, vocab) * counts
    return counts.astype(np.int64), sums


def _row_numbers(text: str, name: str) -> list[float]:
    line = next(s for s in text.splitlines() if s.startswith(name))
    return [float(x.replace(",", "")) for x in line[len(name):].split()]


def test_training_summary_reads_the_last_arrays_and_lists_outputs_and_commands(tmp_path: Path):
    out = tmp_path / "run"
    for name, seed in (("code", 1), ("prose", 2)):
        folder = out / "arrays" / name
        folder.mkdir(parents=True)
        for step in (0, 20, 100):  # step 100, not 20 (string order would pick step_20)
            counts, sums = _state(seed + step)
            np.savez(folder / f"step_{step}.npz", rank_counts=counts, rank_log_score_sum=sums)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"")
    (out / "csv" / "version_0").mkdir(parents=True)
    (out / "csv" / "version_0" / "metrics.csv").write_text("step\n")
    run = out / "wandb" / "offline-run-20260101_000000-abc"
    run.mkdir(parents=True)
    text = summary_text("train", out, ["experiment=tiny", "trainer.max_steps=100"])
    for name, seed in (("code", 101), ("prose", 102)):
        counts, sums = _state(seed)
        ce, ee, sa, conf, acc, tokens = _row_numbers(text, f"{name} step 100")
        assert ce == pytest.approx(-sums.sum() / counts.sum(), abs=5e-5)  # CE is the mean of -log-scores
        assert acc == pytest.approx(counts[0] / counts.sum(), abs=5e-5)
        assert tokens == counts.sum()
        assert ce == pytest.approx(ee + sa - conf, abs=2e-4)
    assert re.search(rf"^  W&B run +{re.escape(str(run))}$", text, re.M)
    assert re.search(rf"^  CSV log +{re.escape(str(out / 'csv/version_0/metrics.csv'))}$", text, re.M)
    assert re.search(rf"^  checkpoints +{re.escape(str(out / 'checkpoints'))}$", text, re.M)
    assert "ckpt_path=last" not in text  # a finished run has nothing to resume
    assert f"wandb sync {run}" in text and f"wandb leet {out / 'wandb'}" in text
    assert "notebooks/training_dynamics.ipynb" in text
    failed = summary_text("train", out, ["experiment=tiny", "trainer.max_steps=100"], exit_code=1,
                          prog="ce-dynamics train")
    assert re.search(r"resume: +\S*ce-dynamics train experiment=tiny trainer.max_steps=100 ckpt_path=last$", failed,
                     re.M), failed
    assert "wandb" not in failed.split("next:")[1] and "notebook" not in failed  # only the rerun, after a failure


def test_replay_summary_takes_the_last_step_per_model_and_dataset(tmp_path: Path):
    rows = [{"model": "org/m", "revision": f"step{s}", "step": s, "dataset": d, "cross_entropy": 5.0 - s / 1000,
             "error_entropy": 1.0, "self_alignment": 2.0, "confidence": -1.0, "accuracy": 0.5,
             "mean_reciprocal_rank": 0.6, "num_tokens": 1000, "non_embedding_params": 10}
            for s in (2000, 1000) for d in ("code", "prose")]
    tmp_path.joinpath("results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summary_text("replay", tmp_path, [], exit_code=1, prog="ce-dynamics replay")
    assert "ended with exit code 1" in text
    assert _row_numbers(text, "org/m step2000 code")[0] == pytest.approx(3.0)
    assert "step1000" not in text
    assert re.search(r"rerun: +\S*ce-dynamics replay ", text), text
    text = summary_text("replay", tmp_path, [], exit_code=0, prog="ce-dynamics replay")
    assert f"ce-dynamics scaling {tmp_path / 'results.jsonl'}" in text


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_progress_bar_counts_optimizer_steps_and_summary_drops_zero_flops(tmp_path: Path, caplog):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4)), batch_size=2)
    callbacks = console_callbacks({"enable_progress_bar": True, "enable_model_summary": True})
    bar = next(c for c in callbacks if isinstance(c, StepProgressBar))
    assert any(isinstance(c, CompactModelSummary) for c in callbacks)
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, callbacks=callbacks, default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        trainer.fit(_Tiny(), data)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)  # steps, over 4 epochs of 3 batches
    assert bar.train_progress_bar.desc.startswith("train")
    summary = "\n".join(r.getMessage() for r in caplog.records if "Trainable params" in r.getMessage())
    assert "Trainable params" in summary and "flops" not in summary.lower()
    assert console_callbacks({"enable_progress_bar": False, "enable_model_summary": False}) == []


def test_quiet_filters_drop_only_the_exact_third_party_messages(caplog):
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from ce_dynamics.runs.quiet import quiet_third_party

    quiet_third_party()
    with caplog.at_level(logging.INFO):
        rank_zero_info("\U0001f4a1 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
                       "(https://pypi.org/project/litlogger/) to enable LitLogger")
        rank_zero_info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()  # its filter goes in front of "always"
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("ckpt_path is deprecated", FutureWarning)  # any other message still shows
    assert [str(w.message) for w in seen] == ["ckpt_path is deprecated"]
