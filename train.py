"""Train a language model and watch its cross-entropy decomposition, or replay released checkpoints.

    python train.py                                  # the `tiny` experiment, a few minutes on CPU
    python train.py experiment=pythia160m trainer.devices=8
    python train.py experiment=pythia160m mode=replay
    python train.py experiment=tiny_scaling          # a family of sizes, then the scaling tables and figures
    python train.py trainer.max_steps=400 data.batch_size=8 logger.wandb.mode=online
    python train.py ckpt_path=last                   # resume from output_dir/checkpoints/last.ckpt

Configs: configs/default.yaml <- configs/experiment/<name>.yaml <- command line `key=value`.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from ce_dynamics.config import ConfigError, load_config, preflight


def main(argv: list[str] | None = None) -> int:
    """Run train.py with `argv` (default: the command line); return the exit code.

    A config error (bad key or value, missing ckpt_path, unwritable output_dir, a fresh run into a directory
    holding a run) prints one line and returns 2, before torch or lightning is imported.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = load_config(argv)
        preflight(cfg)
        return _dispatch(cfg, argv)
    except ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2


def _dispatch(cfg: DictConfig, argv: list[str]) -> int:
    """Run the mode `cfg.mode` names."""
    if cfg.mode == "replay":
        from ce_dynamics.replay import run_replay

        return run_replay(cfg)
    if cfg.mode == "sweep":
        from ce_dynamics.sweep import run_sweep

        return run_sweep(argv)
    from ce_dynamics.training import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
