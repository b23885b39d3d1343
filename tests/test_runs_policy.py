"""What a run guarantees besides crash safety: the callback never kills a fit (errors become warnings, non-finite
logits are counted), a diverging train.py run exits 0 with every validation logged, the module's val/loss shares
the decomposition's row and step, and sweeps evaluate and reuse final models whatever the schedule."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ce_dynamics import CEDecompositionCallback
from ce_dynamics.lightning.csv_logger import DurableCSVLogger, read_metrics_csv
from test_callback import NAMES, VAL, V, BigramLM, _tokens, _val_loaders
from crash_helpers import config, finish, launch
from test_notebooks import _tiny_overrides


def _fit(tmp: Path, module: L.LightningModule, callback: CEDecompositionCallback, **kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=[DurableCSVLogger(tmp)], callbacks=[callback],
                        default_root_dir=tmp, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, max_steps=6, val_check_interval=3,
                        **kwargs)
    trainer.fit(module, DataLoader(TensorDataset(_tokens(3, 48)), batch_size=8), _val_loaders())
    return trainer


def _csv_steps(tmp: Path, name: str = "alpha") -> list[int]:
    _, rows = read_metrics_csv(tmp / "csv" / "version_0" / "metrics.csv")
    return [int(r["step"]) for r in rows if r.get(f"decomp/{name}/cross_entropy")]


def test_a_failing_validation_is_a_warning_and_the_fit_goes_on(tmp_path):
    class BadOnce(BigramLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            out = super().validation_step(batch, batch_idx, dataloader_idx)
            if self.global_step == 3 and dataloader_idx == 1:
                out["labels"] = out["labels"][:, :-1]  # misaligned: the metric refuses it
            return out

    callback = CEDecompositionCallback(output_dir=tmp_path, dataset_names=NAMES)
    with pytest.warns(RuntimeWarning, match=r"the metric update failed: ValueError: Expected `logits.shape\[:-1\]"):
        trainer = _fit(tmp_path, BadOnce(), callback)
    assert trainer.global_step == 6  # the fit went on
    assert _csv_steps(tmp_path) == [6]  # the spoiled validation is not recorded, the next one is
    assert sorted(p.name for p in (tmp_path / "arrays" / "alpha").iterdir()) == ["step_6.npz"]


def test_an_unwritable_output_dir_is_a_warning_in_fit_and_an_error_in_validate(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    callback = CEDecompositionCallback(output_dir=blocked / "out", dataset_names=NAMES)
    with pytest.warns(RuntimeWarning, match="recording the validation failed"):
        assert _fit(tmp_path, BigramLM(), callback).global_step == 6
    with pytest.raises(OSError):
        L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                  enable_model_summary=False).validate(BigramLM(), _val_loaders(), verbose=False)


def test_nonfinite_logits_are_counted_and_left_out(tmp_path):
    """NaN/+inf rows of the logits: counted per set, the decomposition is over the other tokens (checked against
    F.cross_entropy on those tokens), one warning per validation, and the fit goes on."""
    poisoned = {name: torch.zeros_like(VAL[name][:, 1:], dtype=torch.bool) for name in NAMES}
    poisoned["alpha"][0, 3] = poisoned["alpha"][4, 7] = True
    poisoned["beta"][2, 5] = True

    class Diverging(BigramLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            out = super().validation_step(batch, batch_idx, dataloader_idx)
            rows = poisoned[NAMES[dataloader_idx]][batch_idx * 3: batch_idx * 3 + len(batch[0])]
            logits = out["logits"].clone()
            logits[rows] = torch.where(torch.arange(V) % 2 == 0, math.nan, math.inf)
            return {**out, "logits": logits}

    callback = CEDecompositionCallback(output_dir=tmp_path, dataset_names=NAMES)
    model = Diverging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, model, callback)
    nonfinite_warnings = [w for w in caught if "non-finite logits" in str(w.message)]
    assert len(nonfinite_warnings) == 2  # one per validation (steps 3 and 6), both sets in one message
    for name in NAMES:
        labels = VAL[name][:, 1:].clone()
        labels[:, :2] = -100
        counted = poisoned[name] & (labels != -100)
        got = callback.last_results[name]
        assert got["nonfinite_tokens"] == int(counted.sum()) > 0
        keep = (labels != -100) & ~counted
        with torch.no_grad():
            logits = model.table(VAL[name][:, :-1])
        expected = torch.nn.functional.cross_entropy(logits[keep].double(), labels[keep])
        assert got["num_tokens"] == int(keep.sum())
        assert got["cross_entropy"] == pytest.approx(float(expected), rel=1e-6)
        _, rows = read_metrics_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
        logged = [int(r[f"decomp/{name}/nonfinite_tokens"]) for r in rows if r.get(f"decomp/{name}/nonfinite_tokens")]
        assert logged == [int(counted.sum())] * 2


def test_val_loss_and_the_decomposition_share_one_row_and_step(tmp_path):
    class WithLoss(BigramLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            out = super().validation_step(batch, batch_idx, dataloader_idx)
            valid = out["labels"] != -100
            out["loss"] = torch.nn.functional.cross_entropy(out["logits"][valid], out["labels"][valid])
            return out

    callback = CEDecompositionCallback(output_dir=tmp_path, dataset_names=NAMES)
    _fit(tmp_path, WithLoss(), callback)
    _, rows = read_metrics_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    for name in NAMES:
        with_loss = [r for r in rows if r.get(f"val/loss/{name}")]
        assert [int(r["step"]) for r in with_loss] == [3, 6]
        for row in with_loss:  # same row: same step; the token-weighted mean loss is the cross-entropy
            assert float(row[f"val/loss/{name}"]) == pytest.approx(float(row[f"decomp/{name}/cross_entropy"]),
                                                                   rel=1e-6)


@pytest.mark.slow
def test_train_py_val_loss_at_the_decomposition_step(tmp_path):
    out = tmp_path / "out"
    finish(launch([*config(out, tmp_path / "tok"), "trainer.max_steps=6", "trainer.val_check_interval=3",
                   "logger.wandb.mode=disabled"]))
    with open(out / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for name in ("code", "prose"):
        assert [int(r["step"]) for r in rows if r.get(f"val/loss/{name}")] == [0, 3, 6]
        assert [int(r["step"]) for r in rows if r.get(f"decomp/{name}/cross_entropy")] == [0, 3, 6]


@pytest.mark.slow
def test_a_diverging_train_py_run_exits_0_with_every_validation_logged(tmp_path):
    out = tmp_path / "out"
    finish(launch([*config(out, tmp_path / "tok"), "trainer.max_steps=8", "optim.lr=10000",
                   "trainer.gradient_clip_val=null", "logger.wandb.mode=disabled"]))
    with open(out / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("decomp/code/cross_entropy")]
    assert [int(r["step"]) for r in rows] == [0, 4, 8]
    assert int(rows[-1]["decomp/code/nonfinite_tokens"]) > 0
    assert int(rows[0]["decomp/code/nonfinite_tokens"]) == 0


def test_sweep_evaluates_final_models_and_a_rerun_reuses_them(tmp_path):
    from ce_dynamics.files import read_results
    from ce_dynamics.runs.sweep import run_sweep_rows

    out = tmp_path / "sweep"
    argv = [a for a in _tiny_overrides(out) if not a.startswith(("model.hidden_size", "model.num_hidden_layers",
                                                                  "model.intermediate_size", "trainer.max_steps",
                                                                  "trainer.val_check_interval"))]
    argv += ["trainer.max_steps=5"]  # tiny_scaling validates every 200 steps: never, before the end
    sizes = ((32, 1), (48, 1))
    path = run_sweep_rows(argv, sizes=sizes)
    rows = read_results(path)
    assert sorted((r["model"], r["dataset"], r["step"]) for r in rows) == sorted(
        (f"tiny-neox-h{h}-l{l}", d, 5) for h, l in sizes for d in ("code", "prose"))
    members = [out / f"tiny-neox-h{h}-l{l}" for h, l in sizes]
    stamps = {p: p.stat().st_mtime_ns for m in members for p in m.rglob("*") if p.is_file()}
    before = path.read_bytes()
    assert run_sweep_rows(argv, sizes=sizes) == path
    assert path.read_bytes() == before  # no row written twice
    assert {p: p.stat().st_mtime_ns for m in members for p in m.rglob("*") if p.is_file()} == stamps  # none retrained
