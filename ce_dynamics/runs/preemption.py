"""Preemption: SIGTERM or SIGINT end a training run at a point it can be resumed from exactly, with exit code
128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the convention schedulers read.

The signal only sets a flag. Every rank looks at it at the same two points, agreeing with the others (the largest
signal number any rank received wins, so a signal sent to rank zero alone stops the whole launch):

* after a training step that no validation follows: `last.ckpt` is written there (atomically, by the trainer's
  checkpoint writer), then the run stops;
* after a validation (and after `ModelCheckpoint` wrote its `last.ckpt`): the run stops. A signal that arrives during
  a validation lets it finish, so it is recorded in every sink like any other.

The sinks are flushed on the way out (the callbacks' exception and teardown hooks, `wandb.finish`). Under SLURM with
Lightning's auto-requeue (its `SLURMEnvironment`), nothing is changed: Lightning's own handlers keep requeueing the job
on the requeue signal; its SIGTERM stop is reported with exit code 143.
"""

from __future__ import annotations

from ce_dynamics._extras import require

require("lightning")

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised inside the trainer to stop a run on a signal; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = int(signum), int(step)
        super().__init__(f"stopped by {signal.Signals(self.signum).name} at step {self.step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def slurm_requeues(trainer: L.Trainer) -> bool:
    """Whether Lightning handles signals itself here (SLURM with auto-requeue)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None:  # single-device strategies keep it on the connector only
        environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


class PreemptionCallback(Checkpoint):
    """Stops `fit` and `validate` on SIGTERM/SIGINT at a resumable point (see the module's docstring).

    A `Checkpoint` only so Lightning runs its hooks after `ModelCheckpoint`'s (list it after that one).

    Args:
        last_ckpt: where the checkpoint of a stop between validations is written (`checkpoints/last.ckpt`).
    """

    def __init__(self, last_ckpt: str | Path) -> None:
        self.last_ckpt = Path(last_ckpt)
        self.signum: int | None = None  # the first signal received

    @property
    def state_key(self) -> str:
        return "PreemptionCallback"

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def _install(self, trainer: L.Trainer) -> None:
        """Replace the handlers Lightning registered for this run (it restores the earlier ones at its end)."""
        if slurm_requeues(trainer) or threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def _agreed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The largest signal number any rank received (0: none). A collective: every rank calls it together."""
        local = self.signum or 0
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return local
        flag = torch.tensor([local], dtype=torch.int64, device=pl_module.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # ------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if slurm_requeues(trainer) or _validation_follows(trainer):
            return  # the validation runs first; on_validation_end decides
        signum = self._agreed(trainer, pl_module)
        if signum:
            trainer.save_checkpoint(self.last_ckpt)  # every rank takes part; rank zero writes
            raise Preempted(signum, trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or slurm_requeues(trainer):
            return
        signum = self._agreed(trainer, pl_module)
        if signum:  # in fit, ModelCheckpoint (ordered before this callback) has just written last.ckpt
            raise Preempted(signum, trainer.global_step)


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after this training batch (its own rule, read from the fit loop)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning version: stop after the validation, if any
        return True
