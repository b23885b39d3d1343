"""Validation time with CEDecompositionCallback against without it, on the tiny experiment's model and eval sets.

    python benchmarks/bench_callback.py              # 7 rounds
    python benchmarks/bench_callback.py --rounds 3

One process, one model (untrained; the time does not depend on the weights), the same two eval dataloaders.
Each round runs `trainer.validate` once per variant, in turn, so machine noise hits all alike; the median of
per-round ratios is printed. Each logger is measured with and without the callback, so a ratio charges the
callback only for its own work: CSV (scalars + npz arrays) and W&B offline as `python train.py` uses it (adds
the p_e/q_e histograms and the image). Target: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ce_dynamics import CEDecompositionCallback
from ce_dynamics.config import load_config
from ce_dynamics.training import build_datamodule, build_module, build_tokenizer

TARGET = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg = load_config([])
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    datamodule = build_datamodule(cfg, build_tokenizer(cfg))
    module = build_module(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench_callback_"))

    def trainer(callbacks: list, logger) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=logger, default_root_dir=tmp,
                         enable_progress_bar=False, enable_model_summary=False)

    wandb_logger = WandbLogger(project="bench", save_dir=str(tmp), mode="offline")
    variants = {
        "none+csv": trainer([], CSVLogger(tmp, name="none")),
        "callback+csv": trainer([CEDecompositionCallback(output_dir=tmp / "csv")], CSVLogger(tmp, name="csv")),
        "none+wandb": trainer([], wandb_logger),
        "callback+wandb": trainer([CEDecompositionCallback(output_dir=tmp / "wandb")], wandb_logger),
    }
    for t in variants.values():  # warm-up: imports, W&B start, first allocations
        t.validate(module, datamodule=datamodule, verbose=False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_idx in range(args.rounds):
        for name, t in variants.items():
            for callback in t.callbacks:
                if isinstance(callback, CEDecompositionCallback):
                    callback.step = round_idx + 1  # a new step each round, so every round logs and saves
            start = time.perf_counter()
            t.validate(module, datamodule=datamodule, verbose=False)
            times[name].append(time.perf_counter() - start)
    import wandb

    wandb.finish()
    tokens = sum(len(ds) for ds in datamodule.eval_sets.values()) * (cfg.data.seq_len - 1)
    print(f"tiny experiment: {len(datamodule.eval_sets)} eval sets, {tokens} scored tokens, vocab "
          f"{cfg.model.vocab_size}, {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    print(f"{'logger':<8} {'without s':>10} {'with s':>8} {'ratio':>7}")
    for logger in ("csv", "wandb"):
        base, with_callback = times[f"none+{logger}"], times[f"callback+{logger}"]
        ratio = statistics.median(v / b for v, b in zip(with_callback, base))
        verdict = "ok" if ratio <= TARGET else f"above target {TARGET}"
        print(f"{logger:<8} {statistics.median(base):10.3f} {statistics.median(with_callback):8.3f} {ratio:7.3f}  {verdict}")


if __name__ == "__main__":
    main()
