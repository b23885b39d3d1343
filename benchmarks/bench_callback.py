"""Validation time during training with CEDecompositionCallback against without it, on the tiny experiment.

    python benchmarks/bench_callback.py              # 5 rounds
    python benchmarks/bench_callback.py --rounds 3

One process, the tiny experiment's model and its two eval dataloaders. Every variant runs the same short
`trainer.fit` from the same initial weights (`--steps` training steps, validating every `--every`), and a timing
callback measures each validation from `on_validation_start` to `on_validation_end`: the time the training loop
stands still. Each round runs every variant once, in turn, so machine noise hits all alike; the median of the
per-round ratios is printed. Each logger is measured with and without the callback, so a ratio charges the
callback only for its own work:

* csv: scalars and npz arrays;
* wandb: W&B offline as `python train.py` uses it (adds the p_e/q_e histograms and the image);
* wandb_serial: the same with all the work inside the validation (`background_media=False`,
  `overlap_updates=False`), the callback's behaviour before it learned to work in the background.

By default the callback updates its metric in a background thread while the next batch's forward runs (the
tiny experiment runs torch on one thread, so a core is spare) and builds the W&B media in that thread after the
validation. The whole `fit` time ratio is printed too: it also charges the background work that overlaps the
training steps after a validation. Target: validation ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ce_dynamics import CEDecompositionCallback
from ce_dynamics.runs.config import load_config
from ce_dynamics.runs.training import build_datamodule, build_module, build_tokenizer

TARGET = 1.10


class ValidationTimer(Callback):
    """Wall time of every validation of a fit (the training loop is paused for it)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="training steps per fit")
    parser.add_argument("--every", type=int, default=2, help="validate every N training steps")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner per fit
    warnings.filterwarnings("ignore", message=".*LeafSpec")  # lightning's own, repeated per fit
    cfg = load_config([])
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    datamodule = build_datamodule(cfg, build_tokenizer(cfg))
    module = build_module(cfg)
    initial = copy.deepcopy(module.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix="bench_callback_"))
    wandb_logger = WandbLogger(project="bench", save_dir=str(tmp), mode="offline")
    variants = {  # name: (logger, callback or None)
        "none+csv": (CSVLogger(tmp, name="none"), None),
        "callback+csv": (CSVLogger(tmp, name="csv"), CEDecompositionCallback(output_dir=tmp / "csv")),
        "none+wandb": (wandb_logger, None),
        "callback+wandb": (wandb_logger, CEDecompositionCallback(output_dir=tmp / "wandb")),
        "callback+wandb_serial": (wandb_logger, CEDecompositionCallback(output_dir=tmp / "serial", background_media=False,
                                                                        overlap_updates=False)),
    }

    def fit(logger, callback) -> tuple[list[float], float]:
        module.load_state_dict(initial)
        timer = ValidationTimer()
        callbacks = [timer] + ([callback] if callback is not None else [])
        if callback is not None:
            callback.load_state_dict({"last_logged_step": None})  # every fit restarts at step 0
        trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=logger, default_root_dir=tmp,
                            max_steps=args.steps, val_check_interval=args.every, num_sanity_val_steps=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        return timer.times, time.perf_counter() - start

    for logger, callback in variants.values():  # warm-up: imports, W&B start, first allocations, figure caches
        fit(logger, callback)
    val_times: dict[str, list[float]] = {name: [] for name in variants}
    fit_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (logger, callback) in variants.items():
            validations, total = fit(logger, callback)
            val_times[name].append(sum(validations) / len(validations))
            fit_times[name].append(total)
    import wandb

    wandb.finish()
    tokens = sum(len(ds) for ds in datamodule.eval_sets.values()) * (cfg.data.seq_len - 1)
    print(f"tiny experiment: {len(datamodule.eval_sets)} eval sets, {tokens} scored tokens, vocab "
          f"{cfg.model.vocab_size}, {torch.get_num_threads()} thread(s), {args.rounds} rounds of fit "
          f"({args.steps} steps, validating every {args.every})")
    print(f"{'variant':<22} {'val s':>6} {'base s':>6} {'val ratio':>9} {'(min-max)':>13} {'fit ratio':>9}")
    for name in variants:
        if name.startswith("none"):
            continue
        base = "none+" + name.split("+")[1].removesuffix("_serial")
        val_ratios = [v / b for v, b in zip(val_times[name], val_times[base])]
        fit_ratio = statistics.median(v / b for v, b in zip(fit_times[name], fit_times[base]))
        val_ratio = statistics.median(val_ratios)
        verdict = "ok" if val_ratio <= TARGET else f"above target {TARGET}"
        print(f"{name:<22} {statistics.median(val_times[name]):6.3f} {statistics.median(val_times[base]):6.3f} "
              f"{val_ratio:9.3f} {min(val_ratios):6.3f}-{max(val_ratios):.3f} {fit_ratio:9.3f}  {verdict}")


if __name__ == "__main__":
    main()
