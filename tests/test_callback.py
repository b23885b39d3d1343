"""CEDecompositionCallback on a minimal user LightningModule: W&B offline read back with the real CLI, CSV,
npz arrays that recompute the logged values, sanity check skipped, step override, resume state."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from numpy_reference import decompose
from torch.utils.data import DataLoader, TensorDataset

from ce_dynamics import CEDecompositionCallback
from ce_dynamics.functional import KEYS, decomposition_from_state

V = 37  # vocab width (> 32 so the histograms use more than one bucket per rank only at the head)
NAMES = ["alpha", "beta"]


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline W&B run, read with `wandb leet inspect --json` (the real CLI)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                          text=True, check=True, timeout=60)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


class BigramLM(L.LightningModule):
    """A user's own module: the contract is only that validation_step returns aligned logits and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(V, V)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return torch.nn.functional.cross_entropy(self.table(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        (x,) = batch
        labels = x[:, 1:].clone()
        labels[:, :2] = -100  # positions the user chose not to score
        return {"logits": self.table(x[:, :-1]), "labels": labels}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=5.0)


def _tokens(seed: int, n: int, length: int = 12) -> torch.Tensor:
    # a noisy cycle, so a bigram table can learn it and the decomposition moves
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    x = (start + torch.arange(length)) % V
    noise = torch.rand(n, length, generator=g) < 0.3
    return torch.where(noise, torch.randint(0, V, (n, length), generator=g), x)


VAL = {"alpha": _tokens(1, 10), "beta": _tokens(2, 7)}


def _val_loaders() -> list[DataLoader]:
    return [DataLoader(TensorDataset(VAL[name]), batch_size=3) for name in NAMES]


def _trainer(tmp: Path, callback: CEDecompositionCallback, loggers, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=loggers, callbacks=[callback], default_root_dir=tmp,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """fit 6 steps validating every 3 (after a 2-batch sanity check), with W&B offline and CSV loggers."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("callback")
    callback = CEDecompositionCallback(output_dir=tmp / "out", dataset_names=NAMES)
    wandb_logger = WandbLogger(project="test", save_dir=str(tmp), mode="offline")
    csv_logger = CSVLogger(save_dir=str(tmp), name="csv")
    model = BigramLM()
    trainer = _trainer(tmp, callback, [wandb_logger, csv_logger], max_steps=6, val_check_interval=3,
                       num_sanity_val_steps=2, log_every_n_steps=1)
    import wandb

    try:
        trainer.fit(model, DataLoader(TensorDataset(_tokens(3, 48)), batch_size=8), _val_loaders())
    finally:
        wandb.finish()  # also when fit fails: no W&B run leaks into later tests
    run_dir = next((tmp / "wandb").glob("offline-run-*"))
    return {"tmp": tmp, "callback": callback, "model": model, "history": wandb_history(run_dir),
            "csv": Path(csv_logger.log_dir) / "metrics.csv"}


def _numpy_expected(model: BigramLM, name: str) -> dict:
    """The decomposition of eval set `name` under `model`, by tests/numpy_reference.py."""
    x = VAL[name]
    labels = x[:, 1:].clone()
    labels[:, :2] = -100
    with torch.no_grad():
        return decompose(model.table(x[:, :-1]).numpy(), labels.numpy())


def _decomp_rows(history: list[dict]) -> dict[int, dict]:
    rows = [r for r in history if "decomp/alpha/error_entropy" in r]
    steps = [r["trainer/global_step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    assert steps == sorted(steps), f"rows out of step order: {steps}"
    return {int(r["trainer/global_step"]): r for r in rows}


def test_wandb_rows_carry_scalars_histograms_and_image_at_each_validation_step(fitted):
    rows = _decomp_rows(fitted["history"])
    assert sorted(rows) == [3, 6]  # validation after 3 and 6 steps; the sanity check is not logged
    for name in NAMES:  # the last validation ran on the final weights
        expected = _numpy_expected(fitted["model"], name)
        for key in KEYS:
            assert rows[6][f"decomp/{name}/{key}"] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    for row in rows.values():
        for name in NAMES:
            for key in KEYS:
                assert math.isfinite(row[f"decomp/{name}/{key}"])
            for key in ("p_e", "q_e"):
                assert row[f"decomp/{name}/{key}._type"] == "histogram"
                bins = row[f"decomp/{name}/{key}.bins"]  # on log10(rank + 1): rank 0 alone is [0, log10 2)
                assert bins[0] == 0 and bins[1] == pytest.approx(math.log10(2))
                assert bins[-1] == pytest.approx(math.log10(V + 1))
            assert row[f"decomp/{name}/p_e_vs_q_e._type"] == "image-file"
    # training lowered the error entropy on both sets
    for name in NAMES:
        assert rows[6][f"decomp/{name}/error_entropy"] < rows[3][f"decomp/{name}/error_entropy"]


def test_npz_arrays_recompute_the_logged_values_exactly(fitted):
    rows = _decomp_rows(fitted["history"])
    for step, row in rows.items():
        for name in NAMES:
            state = np.load(fitted["tmp"] / "out" / "arrays" / name / f"step_{step}.npz")
            out = decomposition_from_state(torch.from_numpy(state["rank_counts"]),
                                           torch.from_numpy(state["rank_log_score_sum"]))
            assert int(out["num_tokens"]) == VAL[name][:, 3:].numel()  # sanity batches not counted
            for key in KEYS:
                assert float(out[key]) == row[f"decomp/{name}/{key}"], (step, name, key)
            hist = np.asarray(row[f"decomp/{name}/p_e.values"], dtype=float)
            assert hist.sum() == pytest.approx(1.0)
    assert not list(fitted["tmp"].glob("out/arrays/*/.*.tmp"))  # atomic writes leave no temporaries


def test_last_results_match_an_independent_full_pass(fitted):
    for name in NAMES:
        expected = _numpy_expected(fitted["model"], name)
        got = fitted["callback"].last_results[name]
        assert got["num_tokens"] == expected["num_tokens"]
        for key in KEYS:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def test_scalars_also_reach_the_csv_logger(fitted):
    with open(fitted["csv"]) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("decomp/beta/confidence")]
    assert sorted(int(r["step"]) for r in rows) == [3, 6]


def test_step_override_names_fallback_and_each_step_logged_once_per_logger(tmp_path):
    from ce_dynamics.lightning.csv_logger import DurableCSVLogger, read_metrics_csv

    def logged_steps() -> list[int]:
        _, rows = read_metrics_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
        return [int(r["step"]) for r in rows if r.get("decomp/val_0/cross_entropy")]

    callback = CEDecompositionCallback(log_histograms=False)  # no datamodule, no names: val_<idx>
    trainer = _trainer(tmp_path, callback, [DurableCSVLogger(tmp_path)])
    model = BigramLM()
    callback.step = 1000
    trainer.validate(model, _val_loaders(), verbose=False)
    assert sorted(callback.last_results) == ["val_0", "val_1"]
    assert (tmp_path / "arrays" / "val_1" / "step_1000.npz").exists()  # default_root_dir when no output_dir
    callback.step = None
    trainer.validate(model, _val_loaders(), verbose=False)  # global_step 0
    trainer.validate(model, _val_loaders(), verbose=False)  # step 0 again: the logger already holds it
    assert logged_steps() == [1000, 0]
    # a new process on the same run: a fresh logger reads the file back, a fresh callback logs nothing twice
    again = CEDecompositionCallback(log_histograms=False)
    _trainer(tmp_path, again, [DurableCSVLogger(tmp_path)]).validate(model, _val_loaders(), verbose=False)
    assert logged_steps() == [1000, 0]
    assert again.last_results["val_0"] == callback.last_results["val_0"]


def test_two_validations_at_one_step_the_first_wins_in_every_sink(tmp_path):
    """Manual `trainer.validate` calls at one global_step with different weights: W&B, the CSV and the npz all keep
    the first validation's numbers, once; `last_results` reports what is recorded."""
    import wandb

    from ce_dynamics.lightning.csv_logger import DurableCSVLogger, read_metrics_csv

    torch.manual_seed(0)
    model = BigramLM()
    first = _numpy_expected(model, "alpha")
    callback = CEDecompositionCallback(output_dir=tmp_path, dataset_names=NAMES)
    loggers = [WandbLogger(project="test", save_dir=str(tmp_path), mode="offline"), DurableCSVLogger(tmp_path)]
    try:
        trainer = _trainer(tmp_path, callback, loggers)
        trainer.validate(model, _val_loaders(), verbose=False)
        with torch.no_grad():
            model.table.weight.mul_(3.0)  # the second validation at step 0 sees other logits
        assert _numpy_expected(model, "alpha")["cross_entropy"] != pytest.approx(first["cross_entropy"])
        trainer.validate(model, _val_loaders(), verbose=False)
    finally:
        wandb.finish()
    assert callback.last_results["alpha"]["cross_entropy"] == pytest.approx(first["cross_entropy"], rel=1e-6)
    rows = _decomp_rows(wandb_history(next((tmp_path / "wandb").glob("offline-run-*"))))
    assert list(rows) == [0] and rows[0]["decomp/alpha/cross_entropy"] == pytest.approx(first["cross_entropy"],
                                                                                         rel=1e-6)
    _, csv_rows = read_metrics_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    values = [float(r["decomp/alpha/cross_entropy"]) for r in csv_rows if r.get("decomp/alpha/cross_entropy")]
    assert values == [pytest.approx(first["cross_entropy"], rel=1e-6)]
    state = np.load(tmp_path / "arrays" / "alpha" / "step_0.npz")
    assert np.array_equal(state["rank_counts"], first["rank_counts"])


def test_bad_validation_outputs_raise_a_clear_error(tmp_path):
    class NoLogits(BigramLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return torch.tensor(0.0)

    trainer = _trainer(tmp_path, CEDecompositionCallback(), False)
    with pytest.raises(ValueError, match="'logits'.*'labels'"):
        trainer.validate(NoLogits(), _val_loaders(), verbose=False)


@pytest.mark.parametrize("overlap", [True, False], ids=["background_updates", "updates_in_the_hook"])
def test_overlapped_updates_give_the_state_and_raise_bad_targets(tmp_path, overlap):
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=NAMES, overlap_updates=overlap)
    model = BigramLM()
    _trainer(tmp_path, callback, False).validate(model, _val_loaders(), verbose=False)
    for name in NAMES:
        expected = _numpy_expected(model, name)
        got = np.load(tmp_path / "out" / "arrays" / name / "step_0.npz")
        assert np.array_equal(got["rank_counts"], expected["rank_counts"])
        np.testing.assert_allclose(got["rank_log_score_sum"], expected["rank_log_score_sum"], rtol=1e-6, atol=1e-6)
        for key in KEYS:
            assert callback.last_results[name][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    assert all(m.num_threads == (1 if overlap else None) for m in callback._metrics.values())

    class OutOfRange(BigramLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            out = super().validation_step(batch, batch_idx, dataloader_idx)
            out["labels"][0, -1] = V + 5
            return out

    with pytest.raises(ValueError, match=rf"target values in \[0, {V}\)"):
        _trainer(tmp_path, callback, False).validate(OutOfRange(), _val_loaders(), verbose=False)


@pytest.mark.parametrize("background", [True, False], ids=["background_media", "media_before_validation_ends"])
def test_wandb_media_rows_with_or_without_the_background_thread(tmp_path, background):
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=NAMES, background_media=background)
    trainer = _trainer(tmp_path, callback, [WandbLogger(project="test", save_dir=str(tmp_path), mode="offline")])
    model = BigramLM()
    import wandb

    try:
        for step in (10, 20):
            callback.step = step
            trainer.validate(model, _val_loaders(), verbose=False)
        assert callback._pending_row is None  # teardown logged the row
        clone = copy.deepcopy(callback)  # a copy (ddp_spawn pickles callbacks) carries no thread or W&B handle
        assert clone.last_results == callback.last_results
    finally:
        wandb.finish()  # also when an assertion fails: no W&B run leaks into later tests
    rows = _decomp_rows(wandb_history(next((tmp_path / "wandb").glob("offline-run-*"))))
    assert sorted(rows) == [10, 20]
    for step, row in rows.items():
        for name in NAMES:
            assert row[f"decomp/{name}/p_e._type"] == "histogram"
            assert row[f"decomp/{name}/p_e_vs_q_e._type"] == "image-file"
            assert row[f"decomp/{name}/error_entropy"] == callback.last_results[name]["error_entropy"]
