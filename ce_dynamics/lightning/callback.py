"""CEDecompositionCallback: the cross-entropy decomposition of every validation, logged and saved exactly once.

Contract with the LightningModule: `validation_step` returns a mapping with `"logits"` ([..., V]) and
`"labels"` ([...], `ignore_index` skipped), aligned (the label at t is the token predicted from logits at t);
a `"loss"` in it is logged as `val/loss/<set>` in the same row. Instead of `"logits"`, it may return
`"hidden_states"` ([..., H]): they are scored against the module's unembedding (`lm_head=`) without building the
logits.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("lightning", "wandb")

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ce_dynamics.lightning import sinks
from ce_dynamics.files import load_state, save_state, state_path
from ce_dynamics._rows import in_callers_inference_mode
from ce_dynamics.bootstrap import DEFAULT_REPLICATES as DEFAULT_BOOTSTRAP, replicates_field
from ce_dynamics.functional import KEYS
from ce_dynamics.metric import CrossEntropyDecomposition


class CEDecompositionCallback(Callback):
    """One `CrossEntropyDecomposition` per validation dataloader; at the end of each validation saves the raw
    state to `output_dir/arrays/<dataset>/step_<N>.npz`, then logs `decomp/<dataset>/<key>` to every logger (plus
    p_e/q_e histograms and a p_e-vs-q_e image to W&B), once per step (see `ce_dynamics.lightning.sinks`).

    It never stops a `fit`: non-finite logits are counted (`decomp/<dataset>/nonfinite_tokens`, one warning per
    validation) and left out of the decomposition; any other error of the callback during `fit` becomes a warning
    and that validation is not recorded. In `validate` (and replay) errors are raised.

    Args:
        output_dir: where `arrays/` goes; None -> `trainer.default_root_dir`. It belongs to one run: on start,
            every step saved there that a readable logger (W&B, `DurableCSVLogger`) lacks is logged to it.
        dataset_names: one name per val dataloader; None -> `trainer.datamodule.eval_names`, else `val_<idx>`.
        ignore_index: label value to skip.
        log_histograms: with a `WandbLogger`, also log the histograms and the image.
        max_buckets: number of log-spaced rank buckets of the histograms (W&B allows at most 512).
        save_arrays: write the `.npz` files.
        background_media: build the W&B histograms and image in a background thread, off the validation's
            critical path; the W&B row (scalars and media, at the validation's step) is then logged from the
            main thread as soon as they are ready: at a later training batch, the next validation, or teardown.
            False: build and log them before the validation ends.
        overlap_updates: update the metric in a background thread while the next batch's forward runs, so
            validation does not wait for it (one extra batch of logits stays alive). None: only for CPU logits
            when torch uses fewer threads than this process may run on (a spare core; an update competing with
            torch's own threads would slow both). Errors surface at the next batch or the end of validation.
        backfill: on setup, log saved steps a readable logger lacks (a resumed or rerun run's missing rows).
        nan_strategy: the metric's: "ignore" counts non-finite tokens and leaves them out; "error" raises (replay
            uses it, so a diverged checkpoint is reported as failed rather than recorded as NaN).
        lm_head: for a `validation_step` that returns `"hidden_states"`: the unembedding, as the name of an
            attribute of the LightningModule (dotted, e.g. `"model.lm_head"`) or a callable taking the
            LightningModule; either gives a module with `.weight` [V, H] (and optional `.bias`) or the weight
            tensor. None: `pl_module.get_output_embeddings()`, else `pl_module.model.get_output_embeddings()`.
        bootstrap: replicates of the metric's instance bootstrap (0: off): every number then comes with
            `<key>_se`, `<key>_lo`, `<key>_hi` (95%). `validation_step` may return `"instance_ids"` (`[B]`, one id
            per row, the same wherever the instance is scored) so that the intervals do not depend on batch order,
            process count or a resume; without them each row is an instance numbered in arrival order.

    Attributes:
        step: the step to log at; None -> `trainer.global_step` (replay sets a checkpoint's training step).
        last_results: per dataset, the numbers of the last recorded validation (the KEYS, `num_tokens`,
            `nonfinite_tokens`).
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, dataset_names: Sequence[str] | None = None,
                 ignore_index: int = -100, log_histograms: bool = True, max_buckets: int = 512,
                 save_arrays: bool = True, background_media: bool = True,
                 overlap_updates: bool | None = None, backfill: bool = True, nan_strategy: str = "ignore",
                 lm_head: str | Callable[[L.LightningModule], Any] | None = None,
                 bootstrap: int = DEFAULT_BOOTSTRAP) -> None:
        if not 1 <= max_buckets <= 512:
            raise ValueError(f"max_buckets must be in [1, 512] (a W&B histogram limit), got {max_buckets}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.dataset_names = list(dataset_names) if dataset_names is not None else None
        self.ignore_index = ignore_index
        self.log_histograms = log_histograms
        self.max_buckets = max_buckets
        self.save_arrays = save_arrays
        self.background_media = background_media
        self.overlap_updates = overlap_updates
        self.backfill = backfill
        self.nan_strategy = nan_strategy
        if lm_head is not None and not (isinstance(lm_head, str) or callable(lm_head)):
            raise ValueError(f"lm_head must be None, an attribute name or a callable, got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.bootstrap = bootstrap
        self.step: int | None = None
        self.last_results: dict[str, dict[str, float]] = {}
        self._media = sinks.WandbMedia(max_buckets)
        self._worker: ThreadPoolExecutor | None = None  # one thread, so updates and media run in order
        self._pending_update: Future | None = None
        self._pending_row: tuple[Logger, int, dict[str, Any], Future] | None = None  # W&B row awaiting its media
        self._metrics: dict[int, CrossEntropyDecomposition] = {}
        self._losses: dict[int, torch.Tensor] = {}  # per dataloader: [sum of loss x tokens, tokens]
        self._failure: str | None = None  # why this validation cannot be recorded (fit only)

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.backfill and trainer.is_global_zero:
            self._guard(trainer, "bringing the loggers level with the saved arrays", self._backfill, trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._failure = None
        self._guard(trainer, "the metric update", self._finish_update)
        for metric in self._metrics.values():
            metric.reset()
        self._losses = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or self._failure is not None:
            return
        self._guard(trainer, "the metric update", self._update, pl_module, outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._guard(trainer, "the metric update", self._finish_update)
        self._same_metrics_on_every_rank(trainer, pl_module)
        failed = self._any_rank_failed(trainer, pl_module)
        states = {}
        for idx in sorted(self._metrics):  # collectives: every rank takes part, whatever happened
            metric = self._metrics[idx]
            with metric.sync_context():
                self._guard(trainer, "the metric update", metric.raise_deferred_errors)
                states[idx] = {"rank_counts": metric.rank_counts.clone(),
                               "rank_log_score_sum": metric.rank_log_score_sum.clone(),
                               "nonfinite_tokens": metric.nonfinite_tokens.clone(), **metric.bootstrap_state()}
            metric.reset()
            loss = self._losses.get(idx, torch.zeros(2, dtype=torch.float64, device=pl_module.device))
            loss = trainer.strategy.reduce(loss, reduce_op="sum") if trainer.world_size > 1 else loss
            if float(loss[1]) > 0:
                states[idx]["loss"] = loss[0] / loss[1]
        if failed or self._failure is not None:  # the deferred checks see the synced counts: every rank agrees
            rank_zero_warn(f"CEDecompositionCallback: the validation at step {self._step(trainer)} is not "
                           f"recorded ({self._failure or 'another rank failed'}); training goes on")
            return
        if states:
            self._guard(trainer, "recording the validation", self._record, trainer, states)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._guard(trainer, "logging the W&B row", self._log_pending_row, False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            self._guard(trainer, "the metric update", self._finish_update)
            self._guard(trainer, "logging the W&B row", self._log_pending_row, True)
        finally:
            if self._worker is not None:
                self._worker.shutdown()
                self._worker = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:  # the run is ending anyway: keep the last validation's row if it can be had, never mask the error
            self._pending_update = None
            self._log_pending_row(wait=True)
        except Exception as err:  # noqa: BLE001
            rank_zero_warn(f"CEDecompositionCallback: the last validation's W&B row was lost: {err!r}")

    def __getstate__(self) -> dict[str, Any]:
        # a thread pool and a W&B run do not pickle (ddp_spawn, deepcopy): a copy starts without them
        return {**self.__dict__, "_worker": None, "_pending_update": None, "_pending_row": None,
                "_media": sinks.WandbMedia(self.max_buckets)}

    def state_dict(self) -> dict[str, Any]:
        return {}  # what was logged is read back from the sinks themselves (see ce_dynamics.lightning.sinks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # checkpoints of earlier versions carry `last_logged_step`, no longer needed

    # ----------------------------------------------------------------------------------------- helpers

    def _guard(self, trainer: L.Trainer, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn`; during `fit`, an error becomes a warning and this validation is marked unrecordable."""
        if trainer.state.fn != TrainerFn.FITTING:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - a monitoring callback never kills the run it watches
            self._failure = f"{what} failed: {type(err).__name__}: {err}"
            warnings.warn(f"CEDecompositionCallback: {self._failure}; training goes on", RuntimeWarning, stacklevel=2)
            return None

    def _step(self, trainer: L.Trainer) -> int:
        return trainer.global_step if self.step is None else int(self.step)

    def _root(self, trainer: L.Trainer) -> Path:
        return self.output_dir if self.output_dir is not None else Path(trainer.default_root_dir)

    def _update(self, pl_module: L.LightningModule, outputs: Any, dataloader_idx: int) -> None:
        if (not isinstance(outputs, Mapping) or "labels" not in outputs
                or ("logits" not in outputs and "hidden_states" not in outputs)):
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                "CEDecompositionCallback needs validation_step to return a mapping with 'logits' [..., V] (or "
                f"'hidden_states' [..., H], scored against the unembedding: see lm_head) and 'labels' [...] "
                f"(aligned); got {got}"
            )
        if "logits" in outputs:
            inputs: tuple[torch.Tensor | None, ...] = (outputs["logits"].detach(),)
            width = inputs[0].shape[-1]
        else:
            hidden = outputs["hidden_states"].detach()
            inputs = (hidden, *self._unembedding(pl_module, hidden.dtype))
            width = inputs[1].shape[0]
        labels = outputs["labels"].detach()
        ids = outputs.get("instance_ids")
        ids = ids.detach() if isinstance(ids, torch.Tensor) else ids
        metric = self._metrics.get(dataloader_idx)
        if metric is None:
            metric = self._metrics[dataloader_idx] = self._new_metric(width, inputs[0].device)
        loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            tokens = (labels != self.ignore_index).sum().to(torch.float64)
            acc = self._losses.setdefault(dataloader_idx, torch.zeros(2, dtype=torch.float64, device=loss.device))
            acc += torch.stack([loss.detach().to(torch.float64).reshape(()) * tokens, tokens])
        update = (lambda logits, target: metric.update(logits, target, ids)) if len(inputs) == 1 else (
            lambda hidden, weight, bias, target: metric.update_from_hidden(hidden, weight, target, bias, ids))
        self._finish_update()
        if metric.num_threads == 1:  # _new_metric made it single-threaded to run beside torch's own threads
            self._pending_update = self._background().submit(in_callers_inference_mode(update), *inputs, labels)
        else:
            update(*inputs, labels)

    def _unembedding(self, pl_module: L.LightningModule, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, H], bias [V] or None) of `lm_head`, detached, in the hidden states' dtype (as autocast
        would run the head)."""
        head: Any
        if isinstance(self.lm_head, str):
            head = pl_module
            for name in self.lm_head.split("."):
                if not hasattr(head, name):
                    raise ValueError(f"lm_head={self.lm_head!r}: {type(head).__name__} has no attribute {name!r}")
                head = getattr(head, name)
        elif self.lm_head is not None:
            head = self.lm_head(pl_module)
        else:
            owner = pl_module if hasattr(pl_module, "get_output_embeddings") else getattr(pl_module, "model", None)
            head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
            if head is None:
                raise ValueError(
                    "validation_step returned 'hidden_states' but the unembedding was not found: "
                    "pl_module.get_output_embeddings() and pl_module.model.get_output_embeddings() are missing or "
                    "None; pass CEDecompositionCallback(lm_head=...)"
                )
        weight = head if isinstance(head, torch.Tensor) else getattr(head, "weight", None)
        bias = None if isinstance(head, torch.Tensor) else getattr(head, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"Expected lm_head to give a weight tensor [V, H] (or a module with one), got {head!r}")
        return weight.detach().to(dtype), (bias.detach().to(dtype) if bias is not None else None)

    def _record(self, trainer: L.Trainer, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Turn the synced states into results; on rank zero save the arrays, then log the row once per logger."""
        names = self._names(trainer)
        eval_bytes = getattr(trainer.datamodule, "eval_bytes", None) or {}  # UTF-8 bytes of each set's targets
        by_name = {names[idx]: {**state, **({"num_bytes": eval_bytes[names[idx]]} if eval_bytes.get(names[idx])
                                            else {})} for idx, state in states.items()}
        step = self._step(trainer)
        root = self._root(trainer)
        first = not (self.save_arrays and trainer.is_global_zero and sinks.recorded(root, by_name, step))
        if not first:  # the first validation at a step wins in every sink: its saved state stands
            rank_zero_info(f"CEDecompositionCallback: step {step} is already recorded in {root / 'arrays'}; this "
                           "validation is not recorded again (the first validation at a step wins in every sink)")
            by_name = {name: load_state(state_path(root, name, step)) for name in by_name}
        results = {name: sinks.results_of(state) for name, state in by_name.items()}
        self.last_results = {
            name: {**{key: float(out[key]) for key in KEYS}, "num_tokens": int(out["num_tokens"]),
                   "nonfinite_tokens": int(out["nonfinite_tokens"]), **sinks.bpb_of(out), **sinks.intervals_of(out),
                   **replicates_field(out)}
            for name, out in results.items()
        }
        nonfinite = {name: n["nonfinite_tokens"] for name, n in self.last_results.items() if n["nonfinite_tokens"]}
        if nonfinite and first:
            rank_zero_warn(f"CEDecompositionCallback: non-finite logits (NaN/+inf) at step {step}: {nonfinite} "
                           "tokens left out of the decomposition (logged as decomp/<set>/nonfinite_tokens)")
        if not trainer.is_global_zero or not first:
            return
        if self.save_arrays:
            for name, state in by_name.items():
                save_state(root, name, step, state)
        scalars = sinks.scalars_of(results)
        for logger in trainer.loggers:
            if sinks.holds(logger, step):
                rank_zero_info(f"CEDecompositionCallback: {type(logger).__name__} already holds step {step}; "
                               "not logging it again")
            elif isinstance(logger, WandbLogger) and self.log_histograms:
                self._log_state_artifact(logger, by_name, step)
                self._log_wandb_row(logger, step, scalars, sinks.distributions_of(results))
            else:
                sinks.log_row(logger, step, scalars)

    def _log_wandb_row(self, logger: WandbLogger, step: int, scalars: dict[str, Any],
                       distributions: Mapping[str, Any]) -> None:
        """One W&B row: the scalars with the p_e/q_e histograms and image of the same step."""
        self._log_pending_row(wait=True)  # rows stay in step order, at most one in flight
        if not self.background_media:
            sinks.log_row(logger, step, scalars, self._media(distributions, step, self.max_buckets))
            return
        self._pending_row = (logger, step, scalars, self._background().submit(self._media, distributions, step,
                                                                                   self.max_buckets))

    def _log_pending_row(self, wait: bool) -> None:
        """Log the row whose media the background thread built (W&B calls stay on the main thread)."""
        if self._pending_row is None or (not wait and not self._pending_row[3].done()):
            return
        logger, step, scalars, media = self._pending_row
        self._pending_row = None
        sinks.log_row(logger, step, scalars, media.result())

    def _backfill(self, trainer: L.Trainer) -> None:
        root = self._root(trainer)
        names = self.dataset_names or getattr(trainer.datamodule, "eval_names", None)
        if names is None:
            names = sorted(p.name for p in (root / "arrays").iterdir()) if (root / "arrays").is_dir() else []
        if not names or not trainer.loggers:
            return
        media = functools.partial(self._media, max_buckets=self.max_buckets) if self.log_histograms else None
        steps = sinks.backfill(trainer.loggers, root, names, media)
        if steps:
            rank_zero_info(f"CEDecompositionCallback: logged saved step(s) {steps} that a logger lacked")

    def _background(self) -> ThreadPoolExecutor:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ce_dynamics_callback")
        return self._worker

    def _overlap(self, device: torch.device) -> bool:
        """Whether a new metric on `device` is updated in the background thread (then on one CPU thread)."""
        if self.overlap_updates is not None:
            return self.overlap_updates
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return torch.device(device).type == "cpu" and torch.get_num_threads() < cores

    def _finish_update(self) -> None:
        """Wait for the update running in the background; its error, if any, is raised here."""
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            pending.result()

    def _new_metric(self, vocab_size: int, device: torch.device) -> CrossEntropyDecomposition:
        threads = 1 if self._overlap(device) else None  # beside torch's own threads, take one core, no more
        # On an accelerator, no host synchronisation per batch: bad targets are counted and raised at the end.
        return CrossEntropyDecomposition(vocab_size, ignore_index=self.ignore_index, num_threads=threads,
                                         validate_args=torch.device(device).type == "cpu",
                                         nan_strategy=self.nan_strategy, bootstrap=self.bootstrap).to(device)

    def _same_metrics_on_every_rank(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A rank that saw no batch of some dataloader still has to join that metric's sync."""
        if trainer.world_size == 1:
            return
        count = len(trainer.num_val_batches)
        widths = torch.tensor([self._metrics[i].vocab_size if i in self._metrics else 0 for i in range(count)],
                              device=pl_module.device)
        widths = trainer.strategy.all_gather(widths).reshape(-1, count).amax(0)
        for idx, width in enumerate(widths.tolist()):
            if width and idx not in self._metrics:
                self._metrics[idx] = self._new_metric(int(width), pl_module.device)

    def _any_rank_failed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if trainer.world_size == 1:
            return self._failure is not None
        flag = torch.tensor(float(self._failure is not None), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def _names(self, trainer: L.Trainer) -> dict[int, str]:
        names = self.dataset_names or getattr(trainer.datamodule, "eval_names", None)
        if names is None:
            return {idx: f"val_{idx}" for idx in self._metrics}
        missing = [idx for idx in self._metrics if idx >= len(names)]
        if missing:
            raise ValueError(
                f"Expected one dataset name per validation dataloader (indices {sorted(self._metrics)}), got "
                f"{len(names)}: {list(names)}; pass dataset_names= or give the datamodule matching eval_names"
            )
        return {idx: names[idx] for idx in self._metrics}

    def _log_state_artifact(self, logger: WandbLogger, states: Mapping[str, Mapping[str, torch.Tensor]],
                            step: int) -> None:
        """The validation's npz state as a version of the run's W&B Artifact (ce_dynamics/lightning/wandb_artifacts.py)."""
        from ce_dynamics.lightning.wandb_artifacts import log_state_artifact

        log_state_artifact(logger.experiment, {name: (state["rank_counts"], state["rank_log_score_sum"])
                                               for name, state in states.items()}, step)
