"""CEDecompositionCallback behaviours users rely on, against numpy (tests/numpy_reference.py) and the W&B run
read back with the real CLI: histograms at Pythia's 50304 logits, a crash right after a validation, and the
options (save_arrays, log_histograms, max_buckets, ignore_index, dataset names and their fallback)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from numpy_reference import decompose, ranks_and_log_scores
from torch.utils.data import DataLoader, TensorDataset

from ce_dynamics import CEDecompositionCallback
from ce_dynamics.functional import KEYS
from test_callback import wandb_history

TOKENS = 37  # input token ids; the logit width is the module's own


def _run_dir(tmp: Path) -> Path:
    return next((tmp / "wandb").glob("offline-run-*"))


def _finish_wandb() -> None:
    import wandb

    wandb.finish()


def _tokens(seed: int, n: int, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TOKENS, (n, length), generator=g)


class LinearLM(L.LightningModule):
    """Token embedding -> linear head of any width; the first two labels of a row are `ignore`."""

    def __init__(self, width: int, ignore: int = -100, fail_at_batch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(TOKENS, 8)
        self.head = torch.nn.Linear(8, width)
        self.ignore = ignore
        self.fail_at_batch = fail_at_batch

    def logits_and_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = x[:, 1:].clone()
        labels[:, :2] = self.ignore
        return self.head(self.embed(x[:, :-1])), labels

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("boom in training_step")
        logits, labels = self.logits_and_labels(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        logits, labels = self.logits_and_labels(batch[0])
        return {"logits": logits, "labels": labels}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _expected(model: LinearLM, x: torch.Tensor, ignore_index: int = -100) -> dict:
    with torch.no_grad():
        logits, labels = model.logits_and_labels(x)
    return decompose(logits.numpy(), labels.numpy(), ignore_index)


def _trainer(tmp: Path, callback: CEDecompositionCallback, loggers, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=loggers, callbacks=[callback], default_root_dir=tmp,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


def _assert_numbers(got: dict, expected: dict) -> None:
    assert int(got["num_tokens"]) == expected["num_tokens"]
    for key in KEYS:
        assert float(got[key]) == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key


def _rank_edges(bins: list, vocab: int) -> np.ndarray:
    """Bucket edges in ranks, whether the histogram's bins are ranks or log10(rank + 1) (a log-scaled x axis)."""
    bins = np.asarray(bins, dtype=float)
    if vocab > 9 and bins[-1] == pytest.approx(np.log10(vocab + 1), rel=1e-6):
        return np.rint(10.0**bins - 1.0)
    return bins


def _assert_histograms(row: dict, name: str, expected: dict, ranks: np.ndarray, max_buckets: int) -> np.ndarray:
    """The logged p_e/q_e histograms are numpy's histograms of the ranks over the logged edges."""
    vocab = len(expected["rank_counts"])
    edges = _rank_edges(row[f"decomp/{name}/p_e.bins"], vocab)
    assert edges[0] == 0 and edges[1] == 1 and edges[-1] == vocab  # rank 0 alone in the first bucket
    assert np.all(np.diff(edges) > 0) and len(edges) - 1 <= max_buckets
    assert np.array_equal(edges, np.round(edges))  # whole ranks
    p_values = np.asarray(row[f"decomp/{name}/p_e.values"], dtype=float)
    np.testing.assert_allclose(p_values, np.histogram(ranks, bins=edges)[0] / len(ranks), rtol=1e-6, atol=1e-12)
    assert p_values.sum() == pytest.approx(1.0, abs=1e-9)  # mass conserved
    counts, sums = expected["rank_counts"], expected["rank_log_score_sum"]
    seen = np.flatnonzero(counts)
    big_q = np.exp(sums[seen] / counts[seen])
    q_values = np.asarray(row[f"decomp/{name}/q_e.values"], dtype=float)
    assert np.array_equal(_rank_edges(row[f"decomp/{name}/q_e.bins"], vocab), edges)
    np.testing.assert_allclose(q_values, np.histogram(seen, bins=edges, weights=big_q / big_q.sum())[0],
                               rtol=1e-5, atol=1e-12)  # float32 log-softmax against numpy's float64
    assert q_values.sum() == pytest.approx(1.0, abs=1e-9)
    return edges


# ----------------------------------------------------------------------------------------- W&B media


def test_wandb_histograms_and_image_at_pythia_width(tmp_path: Path) -> None:
    """50304 logits: the rank buckets' geometric branch, the histograms' mass and the p_e/q_e image."""
    from matplotlib.image import imread

    width = 50304
    model = LinearLM(width)
    x = _tokens(1, 12)
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=["wide"])
    callback.step = 7
    trainer = _trainer(tmp_path, callback, [WandbLogger(project="test", save_dir=str(tmp_path), mode="offline")])
    try:
        trainer.validate(model, DataLoader(TensorDataset(x), batch_size=4), verbose=False)
    finally:
        _finish_wandb()
    (row,) = [r for r in wandb_history(_run_dir(tmp_path)) if "decomp/wide/p_e.bins" in r]
    assert row["trainer/global_step"] == 7
    expected = _expected(model, x)
    _assert_numbers({k: row[f"decomp/wide/{k}"] for k in KEYS} | {"num_tokens": expected["num_tokens"]}, expected)
    with torch.no_grad():
        ranks, _ = ranks_and_log_scores(*(t.numpy() for t in model.logits_and_labels(x)))
    assert ranks.max() > 1000  # a random head: ranks far out in the tail
    edges = _assert_histograms(row, "wide", expected, ranks, max_buckets=512)
    assert len(edges) - 1 > 256  # the buckets are used, not collapsed
    images = list(_run_dir(tmp_path).glob("files/media/images/**/*.png"))
    assert len(images) == 1
    assert imread(images[0])[..., :3].std() > 0.05


@pytest.mark.parametrize("option", ["log_histograms_false", "max_buckets_5"])
def test_log_histograms_false_and_a_small_max_buckets(tmp_path: Path, option: str) -> None:
    model = LinearLM(TOKENS)
    x = _tokens(2, 9)
    kwargs = {"log_histograms": False} if option == "log_histograms_false" else {"max_buckets": 5}
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=["small"], **kwargs)
    trainer = _trainer(tmp_path, callback, [WandbLogger(project="test", save_dir=str(tmp_path), mode="offline")])
    try:
        trainer.validate(model, DataLoader(TensorDataset(x), batch_size=4), verbose=False)
    finally:
        _finish_wandb()
    (row,) = [r for r in wandb_history(_run_dir(tmp_path)) if "decomp/small/cross_entropy" in r]
    expected = _expected(model, x)
    _assert_numbers({k: row[f"decomp/small/{k}"] for k in KEYS} | {"num_tokens": expected["num_tokens"]}, expected)
    if option == "log_histograms_false":
        assert not [k for k in row if "p_e" in k or "q_e" in k]
        assert not list(_run_dir(tmp_path).glob("files/media/**/*.png"))
    else:
        with torch.no_grad():
            ranks, _ = ranks_and_log_scores(*(t.numpy() for t in model.logits_and_labels(x)))
        edges = _assert_histograms(row, "small", expected, ranks, max_buckets=5)
        assert len(edges) - 1 >= 3


@pytest.mark.parametrize("max_buckets", [0, 513, -1])
def test_max_buckets_outside_the_wandb_limit_is_refused(max_buckets: int) -> None:
    with pytest.raises(ValueError, match=r"max_buckets must be in \[1, 512\]"):
        CEDecompositionCallback(max_buckets=max_buckets)


# ---------------------------------------------------------------------------------------- a crash


@pytest.mark.parametrize("media", ["built", "failing"])
def test_a_crash_right_after_a_validation_keeps_its_row_and_raises_the_original_error(tmp_path: Path,
                                                                                       media: str) -> None:
    """Validation at step 2 (its W&B row still pending in the background), then training_step raises."""
    model = LinearLM(TOKENS, fail_at_batch=2)
    val = _tokens(3, 7)
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=["alpha"])
    if media == "failing":
        callback.max_buckets = 0  # a bad setting slipped past __init__: building the histograms raises
    trainer = _trainer(tmp_path, callback, [WandbLogger(project="test", save_dir=str(tmp_path), mode="offline")],
                       max_steps=10, val_check_interval=2, num_sanity_val_steps=0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match="boom in training_step"):
                trainer.fit(model, DataLoader(TensorDataset(_tokens(4, 40)), batch_size=4),
                            DataLoader(TensorDataset(val), batch_size=4))
    finally:
        _finish_wandb()
    expected = _expected(model, val)  # the crash came before the third update: the weights validated at step 2
    assert callback.last_results["alpha"]["num_tokens"] == expected["num_tokens"]
    rows = [r for r in wandb_history(_run_dir(tmp_path)) if "decomp/alpha/cross_entropy" in r]
    if media == "built":
        (row,) = rows
        assert row["trainer/global_step"] == 2
        assert row["decomp/alpha/p_e._type"] == "histogram"
        _assert_numbers({k: row[f"decomp/alpha/{k}"] for k in KEYS} | {"num_tokens": expected["num_tokens"]},
                        expected)
    else:
        assert any("CEDecompositionCallback" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert (tmp_path / "out" / "arrays" / "alpha" / "step_2.npz").exists()


# ------------------------------------------------------------------------------------------ options


class NamedEvalSets(L.LightningDataModule):
    """A user's datamodule naming its validation dataloaders (the callback's fallback for dataset_names)."""

    eval_names = ["wiki", "code"]

    def __init__(self, sets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.sets = sets

    def val_dataloader(self):
        return [DataLoader(TensorDataset(self.sets[name]), batch_size=3) for name in self.eval_names]


def test_ignore_index_names_from_the_datamodule_and_no_arrays(tmp_path: Path) -> None:
    sets = {"wiki": _tokens(5, 8), "code": _tokens(6, 5)}
    model = LinearLM(TOKENS, ignore=7)  # token 7 is never scored, wherever it occurs
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", ignore_index=7, save_arrays=False)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    _trainer(tmp_path, callback, [logger]).validate(model, datamodule=NamedEvalSets(sets), verbose=False)
    assert sorted(callback.last_results) == ["code", "wiki"]
    for name, x in sets.items():
        expected = _expected(model, x, ignore_index=7)
        assert expected["num_tokens"] < x[:, 3:].numel()  # some 7s past the first two positions are skipped too
        _assert_numbers(callback.last_results[name], expected)
    assert not (tmp_path / "out").exists() and not (tmp_path / "arrays").exists()  # save_arrays=False
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("decomp/code/confidence")]
    assert len(logged) == 1
    assert float(logged[0]["decomp/code/confidence"]) == pytest.approx(
        _expected(model, sets["code"], ignore_index=7)["confidence"], rel=1e-6)


def test_too_few_dataset_names_is_a_clear_error(tmp_path: Path) -> None:
    loaders = [DataLoader(TensorDataset(_tokens(s, 3)), batch_size=3) for s in (7, 8)]
    callback = CEDecompositionCallback(output_dir=tmp_path / "out", dataset_names=["only_one"])
    with pytest.raises(ValueError, match=r"one dataset name per validation dataloader.*got 1: \['only_one'\]"):
        _trainer(tmp_path, callback, False).validate(LinearLM(TOKENS), loaders, verbose=False)
