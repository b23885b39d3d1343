"""Terminal output of a training run that says what is happening: a progress bar over optimizer steps (the
run is step-based, `trainer.max_steps`) instead of "Epoch 0/-2", and a model summary without the always-zero
FLOPs column and "Total FLOPs: 0" line (Lightning only counts FLOPs for a module with an example input)."""

from __future__ import annotations

import logging
from typing import Any

from ce_dynamics._extras import require

require("lightning")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelSummary, TQDMProgressBar  # noqa: E402

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps, ``trainer.global_step`` of ``trainer.max_steps`` (resumed runs
    start where they left off), described as ``train``; validation bars are Lightning's."""

    def _steps_total(self, trainer: L.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=self._steps_total(trainer))
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, however many passes over the data it takes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable or bar.n == trainer.global_step:
            return
        if self._should_update(trainer.global_step, bar.total or trainer.global_step):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the CSV logger's version number, not a measurement
        return metrics


class CompactModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total when nothing was counted (they read 0)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        if total_flops:
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        log.info("\n" + "\n".join(line for line in table.splitlines() if "total flops" not in line.lower()))


def console_callbacks(trainer_cfg: Any) -> list[Callback]:
    """The progress bar and model summary callbacks for `trainer.*` (none where the config turns them off:
    Lightning refuses a progress bar callback with ``enable_progress_bar=False``)."""
    callbacks: list[Callback] = []
    if trainer_cfg.get("enable_progress_bar", True) is not False:
        callbacks.append(StepProgressBar())
    if trainer_cfg.get("enable_model_summary", True) is not False:
        callbacks.append(CompactModelSummary())
    return callbacks
