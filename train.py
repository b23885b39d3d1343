"""Train a language model and watch its cross-entropy decomposition, or replay released checkpoints.

    python train.py                                  # the `tiny` experiment, a few minutes on CPU
    python train.py experiment=pythia160m trainer.devices=8
    python train.py experiment=pythia160m mode=replay
    python train.py experiment=tiny_scaling          # a family of sizes, then the scaling tables and figures
    python train.py trainer.max_steps=400 data.batch_size=8 logger.wandb.mode=online
    python train.py ckpt_path=last                   # resume from output_dir/checkpoints/last.ckpt
    python train.py experiment=paper_fig3 mode=prepare   # draw and pin the eval sets (network), print where

Configs: configs/default.yaml <- configs/experiment/<name>.yaml <- command line `key=value`.
"""

from __future__ import annotations

import sys

try:
    from ce_dynamics.runs.cli import run_config
except ModuleNotFoundError as err:  # torch (or the package) missing: this Python is not the one make installed into
    sys.exit(f"train.py: {err.name!r} is not installed in this Python ({sys.executable}). From this clone: "
             f"`make run` (creates .venv and installs everything), then `.venv/bin/python train.py ...`; or "
             f"pip install -e '.[all]' into the Python you want to use.")


def main(argv: list[str] | None = None) -> int:
    """Run train.py with `argv` (default: the command line); return the exit code (2 for config errors).
    The same as the installed `ce-dynamics train|replay|sweep` command (ce_dynamics/runs/cli.py)."""
    return run_config(sys.argv[1:] if argv is None else argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
