"""CEDecompositionCallback: the cross-entropy decomposition of every validation, logged and saved.

Contract with the LightningModule: `validation_step` returns a mapping with `"logits"` ([..., V]) and
`"labels"` ([...], `ignore_index` skipped), aligned (the label at t is the token predicted from logits at t).
Instead of `"logits"`, it may return `"hidden_states"` ([..., H]): they are scored against the module's
unembedding (`lm_head=`) without building the logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ce_dynamics.files import atomic_open
from ce_dynamics.functional import KEYS, decomposition_from_state, in_callers_inference_mode
from ce_dynamics.metric import CrossEntropyDecomposition


class CEDecompositionCallback(Callback):
    """One `CrossEntropyDecomposition` per validation dataloader; at the end of each validation logs
    `decomp/<dataset>/<key>` to every logger (plus p_e/q_e histograms and a p_e-vs-q_e image to W&B) and saves
    the raw state to `output_dir/arrays/<dataset>/step_<N>.npz`.

    Args:
        output_dir: where `arrays/` goes; None -> `trainer.default_root_dir`.
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
        lm_head: for a `validation_step` that returns `"hidden_states"`: the unembedding, as the name of an
            attribute of the LightningModule (dotted, e.g. `"model.lm_head"`) or a callable taking the
            LightningModule; either gives a module with `.weight` [V, H] (and optional `.bias`) or the weight
            tensor. None: `pl_module.get_output_embeddings()`, else `pl_module.model.get_output_embeddings()`.

    Attributes:
        step: the step to log at; None -> `trainer.global_step` (replay sets a checkpoint's training step).
        last_results: per dataset, the floats of the last completed validation (the KEYS and `num_tokens`).
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, dataset_names: Sequence[str] | None = None,
                 ignore_index: int = -100, log_histograms: bool = True, max_buckets: int = 512,
                 save_arrays: bool = True, background_media: bool = True,
                 overlap_updates: bool | None = None,
                 lm_head: str | Callable[[L.LightningModule], Any] | None = None) -> None:
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
        if lm_head is not None and not (isinstance(lm_head, str) or callable(lm_head)):
            raise ValueError(f"lm_head must be None, an attribute name or a callable, got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self._renderers: dict[str, Any] = {}  # per eval set: PEQERenderer, which caches the figure's background
        self._worker: ThreadPoolExecutor | None = None  # one thread, so updates and media run in order
        self._pending_update: Future | None = None
        self._pending_row: tuple[Any, dict[str, Any], Future] | None = None  # (W&B run, scalars, media future)
        self.step: int | None = None
        self.last_results: dict[str, dict[str, float]] = {}
        self._metrics: dict[int, CrossEntropyDecomposition] = {}
        self._last_logged_step: int | None = None  # training steps already logged, kept across resume

    # ------------------------------------------------------------------------------------------- hooks

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_update()
        for metric in self._metrics.values():
            metric.reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
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
        metric = self._metrics.get(dataloader_idx)
        if metric is None:
            metric = self._new_metric(width, inputs[0].device)
            self._metrics[dataloader_idx] = metric
        labels = outputs["labels"].detach()
        update = metric.update if len(inputs) == 1 else (
            lambda hidden, weight, bias, target: metric.update_from_hidden(hidden, weight, target, bias))
        self._finish_update()
        if metric.num_threads == 1:  # _new_metric made it single-threaded to run beside torch's own threads
            self._pending_update = self._background().submit(in_callers_inference_mode(update), *inputs, labels)
        else:
            update(*inputs, labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._finish_update()
        self._same_metrics_on_every_rank(trainer, pl_module)
        names = self._names(trainer)
        states, results = {}, {}
        for idx in sorted(self._metrics):
            metric = self._metrics[idx]
            with metric.sync_context():  # a collective: every rank takes part
                states[names[idx]] = (metric.rank_counts.clone(), metric.rank_log_score_sum.clone())
            metric.reset()
            results[names[idx]] = decomposition_from_state(*states[names[idx]])
        if not results:
            return
        self.last_results = {
            name: {**{key: float(out[key]) for key in KEYS}, "num_tokens": int(out["num_tokens"])}
            for name, out in results.items()
        }
        step = trainer.global_step if self.step is None else int(self.step)
        if self.step is None and self._last_logged_step is not None and step <= self._last_logged_step:
            rank_zero_info(f"CEDecompositionCallback: step {step} was already logged; not logging it again")
            return
        if trainer.is_global_zero:
            self._log(trainer, results, step)
            if self.save_arrays:
                self._save(trainer, states, step)
        if self.step is None:
            self._last_logged_step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._log_pending_row(wait=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._finish_update()
        self._log_pending_row(wait=True)
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:  # the run is ending anyway: keep the last validation's row if it can be had, never mask the error
            self._pending_update = None
            self._log_pending_row(wait=True)
        except Exception as err:  # noqa: BLE001
            rank_zero_warn(f"CEDecompositionCallback: the last validation's W&B media were lost: {err!r}")

    def __getstate__(self) -> dict[str, Any]:
        # a thread pool and a W&B run do not pickle (ddp_spawn, deepcopy): a copy starts without them
        return {**self.__dict__, "_worker": None, "_pending_update": None, "_pending_row": None, "_renderers": {}}

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = state_dict.get("last_logged_step")

    # ----------------------------------------------------------------------------------------- helpers

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

    def _finish_update(self) -> None:
        """Wait for the update running in the background; its error, if any, is raised here."""
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            pending.result()

    def _new_metric(self, vocab_size: int, device: torch.device) -> CrossEntropyDecomposition:
        threads = 1 if self._overlap(device) else None  # beside torch's own threads, take one core, no more
        return CrossEntropyDecomposition(vocab_size, ignore_index=self.ignore_index, num_threads=threads).to(device)

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

    def _log(self, trainer: L.Trainer, results: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> None:
        scalars = {f"decomp/{name}/{key}": float(out[key]) for name, out in results.items() for key in KEYS}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.log_histograms:
                self._log_wandb_row(logger.experiment, {**scalars, "trainer/global_step": step}, results, step)
            else:
                logger.log_metrics(scalars, step=step)

    def _log_wandb_row(self, run: Any, scalars: dict[str, Any], results: Mapping[str, Mapping[str, torch.Tensor]],
                       step: int) -> None:
        """One W&B row: the scalars with the p_e/q_e histograms and image of the same step."""
        self._log_pending_row(wait=True)  # rows stay in step order, at most one in flight
        distributions = {name: (out["p_e"].cpu().numpy(), out["q_e"].cpu().numpy()) for name, out in results.items()}
        if not self.background_media:
            run.log({**scalars, **self._wandb_media(distributions, step)})
            return
        self._pending_row = (run, scalars, self._background().submit(self._wandb_media, distributions, step))

    def _log_pending_row(self, wait: bool) -> None:
        """Log the row whose media the background thread built (W&B calls stay on the main thread)."""
        if self._pending_row is None or (not wait and not self._pending_row[2].done()):
            return
        run, scalars, media = self._pending_row
        self._pending_row = None
        run.log({**scalars, **media.result()})

    def _wandb_media(self, distributions: Mapping[str, tuple[np.ndarray, np.ndarray]], step: int) -> dict[str, Any]:
        import wandb

        from ce_dynamics.plotting import PEQERenderer, bucket_sums, rank_bucket_edges

        media: dict[str, Any] = {}
        for name, (p_e, q_e) in distributions.items():
            edges = rank_bucket_edges(len(p_e), self.max_buckets)
            for key, values in (("p_e", p_e), ("q_e", q_e)):
                media[f"decomp/{name}/{key}"] = wandb.Histogram(np_histogram=(bucket_sums(values, edges), edges))
            renderer = self._renderers.setdefault(name, PEQERenderer())
            media[f"decomp/{name}/p_e_vs_q_e"] = wandb.Image(renderer.render(p_e, q_e, title=f"{name}, step {step}"))
        return media

    def _save(self, trainer: L.Trainer, states: Mapping[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> None:
        root = self.output_dir if self.output_dir is not None else Path(trainer.default_root_dir)
        for name, (counts, sums) in states.items():
            _save_npz_atomic(root / "arrays" / name / f"step_{step}.npz",
                             rank_counts=counts.cpu().numpy(), rank_log_score_sum=sums.cpu().numpy())


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)
