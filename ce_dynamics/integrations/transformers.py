"""The cross-entropy decomposition inside a Hugging Face ``Trainer``.

    evaluator = CEDecompositionEval(vocab_size=model.config.vocab_size)
    trainer = Trainer(model, args, eval_dataset={"code": ..., "prose": ...},
                      preprocess_logits_for_metrics=evaluator.preprocess_logits_for_metrics,
                      compute_metrics=evaluator.compute_metrics,
                      callbacks=[CEDecompositionTrainerCallback(evaluator)])
    trainer.evaluate()  # eval_code_cross_entropy, eval_code_error_entropy, ..., eval_prose_num_tokens

``preprocess_logits_for_metrics`` reduces each batch's ``[B, T, V]`` logits to two numbers per token, the
right token's rank and log-score, on the logits' device, so the Trainer gathers and keeps ``[B, T, 2]``
instead of the logits (which for a 50k vocabulary are 25,000 times larger). ``compute_metrics`` sums them into
the metric's per-rank state, with ``batch_eval_metrics`` False (all at once) or True (batch by batch).
Under ``accelerate`` with several processes the Trainer gathers the per-token values of every process before
``compute_metrics``, so every process computes the decomposition of the whole eval set.
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("transformers", "accelerate")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from ce_dynamics import bootstrap as _bootstrap  # noqa: E402
from ce_dynamics.functional import KEYS, accumulate_state, decomposition_from_state, token_ranks_and_log_scores  # noqa: E402

__all__ = ["CEDecompositionEval", "CEDecompositionTrainerCallback"]

_IGNORED = -1.0  # rank of a position that carries no token (ignore_index, or the Trainer's -100 padding)


class CEDecompositionEval:
    """``preprocess_logits_for_metrics`` and ``compute_metrics`` for a ``transformers.Trainer``.

    Args:
        vocab_size: width ``V`` of the model's logits (``model.config.vocab_size``, padding columns included).
        ignore_index: label value to skip (the Trainer's and the data collators' -100).
        shift_labels: the labels are the inputs (causal LM): the logits at ``t`` predict the label at ``t + 1``.
            False: labels are already aligned with the logits.
        bootstrap: replicates of the instance bootstrap (0: off); on, ``evaluate()`` also gives
            ``eval_<key>_se``, ``_lo``, ``_hi`` (95%; see :mod:`ce_dynamics.bootstrap`). The instances are the
            rows of the predictions in the order the Trainer hands them over (its eval sampler is sequential: row
            ``i`` is eval dataset row ``i`` with one process).

    Attributes:
        last_state: ``(rank_counts, rank_log_score_sum)`` numpy arrays of the last computed evaluation, for
            :class:`CEDecompositionTrainerCallback` (None before the first).
        last_bootstrap_state: the bootstrap's per-group state of the last evaluation in its saved form ({}: off).
    """

    def __init__(self, vocab_size: int, ignore_index: int = -100, shift_labels: bool = True,
                 bootstrap: int = _bootstrap.DEFAULT_REPLICATES) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"Expected `vocab_size` to be a positive int, got {vocab_size!r}.")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.shift_labels = bool(shift_labels)
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
            raise ValueError(f"Expected `bootstrap` to be 0 (off) or an int >= 2 (replicates), got {bootstrap!r}.")
        self.bootstrap = bootstrap
        self.last_state: tuple[np.ndarray, np.ndarray] | None = None
        self.last_bootstrap_state: dict[str, np.ndarray] = {}
        self._reset()

    def _reset(self) -> None:
        self._counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        self._sums = torch.zeros(self.vocab_size, dtype=torch.float64)
        shape = (_bootstrap.DEFAULT_GROUPS, self.vocab_size) if self.bootstrap else (0, self.vocab_size)
        self._group_counts = torch.zeros(shape, dtype=torch.int64)
        self._group_sums = torch.zeros(shape, dtype=torch.int64)
        self._rows = 0  # instances seen since the last compute: the next row's id

    def preprocess_logits_for_metrics(self, logits: Tensor | tuple, labels: Tensor) -> Tensor:
        """``[B, T, V]`` logits and ``[B, T]`` labels -> ``[B, T', 2]`` (rank, log-score) per position, on the
        logits' device; ``T' = T - 1`` with ``shift_labels``. Skipped positions hold rank -1."""
        if isinstance(logits, (tuple, list)):  # model outputs beside the logits (e.g. hidden states)
            logits = logits[0]
        if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[-1] != self.vocab_size:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"Expected logits of shape [..., {self.vocab_size}] (vocab_size), got {got}.")
        if not isinstance(labels, Tensor):
            raise TypeError(f"Expected labels as a torch.Tensor (the Trainer needs `labels` in the batch), got "
                            f"{type(labels).__name__}.")
        labels = labels.to(logits.device)
        if self.shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        valid = (labels != self.ignore_index).reshape(-1)
        ranks, log_scores = token_ranks_and_log_scores(logits, labels, self.ignore_index)
        dtype = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
        out = torch.full((valid.numel(), 2), _IGNORED, dtype=dtype, device=logits.device)
        out[valid, 0] = ranks.to(dtype)
        out[valid, 1] = log_scores.to(dtype)
        return out.reshape(*labels.shape, 2)

    def update(self, per_token: Any) -> None:
        """Add ``[..., 2]`` (rank, log-score) values from :meth:`preprocess_logits_for_metrics`."""
        values = torch.as_tensor(per_token)
        if values.dim() < 1 or values.shape[-1] != 2:
            raise ValueError("Expected predictions of shape [..., 2] from CEDecompositionEval."
                             "preprocess_logits_for_metrics (pass it to the Trainer as preprocess_logits_for_metrics),"
                             f" got {tuple(values.shape)}.")
        rows = values.shape[0] if values.dim() >= 3 else 1  # [B, T, 2]: B instances; [T, 2]: one
        ids = torch.arange(self._rows, self._rows + rows).repeat_interleave(values[..., 0].numel() // rows)
        values = values.reshape(-1, 2).to("cpu", torch.float64)
        keep = values[:, 0] >= 0  # -1: skipped; -100: the Trainer's padding between batches
        kept = values[keep]
        ranks = kept[:, 0].to(torch.int64)
        if ranks.numel() and int(ranks.max()) >= self.vocab_size:
            raise ValueError(f"Expected ranks below vocab_size={self.vocab_size}, got {int(ranks.max())}.")
        accumulate_state(ranks, kept[:, 1], self._counts, self._sums)
        self._rows += rows
        if self.bootstrap:
            groups = _bootstrap.instance_groups(ids[keep], _bootstrap.DEFAULT_GROUPS)
            _bootstrap.accumulate_groups(ranks, kept[:, 1], groups, None, self._group_counts, self._group_sums)

    def compute(self) -> dict[str, float]:
        """The decomposition of everything added since the last compute; resets the state."""
        out = decomposition_from_state(self._counts, self._sums)
        self.last_state = (self._counts.numpy().copy(), self._sums.numpy().copy())
        extra: dict[str, float] = {}
        self.last_bootstrap_state = {}
        if self.bootstrap:
            summary = _bootstrap.bootstrap_summary(self._group_counts, self._group_sums, self.bootstrap)
            extra = {key: float(summary[key]) for key in _bootstrap.interval_keys()}
            self.last_bootstrap_state = _bootstrap.pack_group_state(self._group_counts, self._group_sums,
                                                                    self.bootstrap, 0)
        self._reset()
        return {**{key: float(out[key]) for key in KEYS}, "num_tokens": int(out["num_tokens"]), **extra}

    def compute_metrics(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        """The Trainer's ``compute_metrics``: with ``batch_eval_metrics=False`` called once with every
        prediction; with True once per batch, ``compute_result`` True at the last one."""
        predictions = eval_pred.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        self.update(predictions)
        return self.compute() if compute_result else {}


class CEDecompositionTrainerCallback(TrainerCallback):
    """Records each evaluation exactly once, as the Lightning callback does: the state of `evaluator` is saved
    first, atomically, to ``<output_dir>/arrays/<set>/step_<N>.npz`` (the truth), then logged to W&B when
    ``report_to`` includes wandb: one row per eval set and step holding the Trainer's ``eval/<set>_*`` numbers,
    ``decomp/<set>/<key>`` and the p_e/q_e histograms and image.

    With W&B it takes the Trainer's own ``WandbCallback`` over (it forwards the training logs to it and logs the
    evaluations itself), so that:

    * the W&B run is the same across ``trainer.train(resume_from_checkpoint=...)``: its id is kept in
      ``<output_dir>/wandb_run_id`` (a run the user started with ``wandb.init`` before is used as it is);
    * a step W&B durably holds (read back from the run's transaction logs) is never logged again, and on (re)start
      every saved step W&B lacks (a process killed between the npz and the W&B row) is logged from its npz;
    * an evaluation at a step already saved (a resume from an earlier checkpoint re-evaluates it, and the
      Trainer's resume is not bit-exact) is not recorded again: the first evaluation stays the record in every
      sink, and a warning says by how much the new one differs. Never two values for one step.

    Args:
        evaluator: the :class:`CEDecompositionEval` whose ``compute_metrics`` the Trainer uses.
        output_dir: where ``arrays/`` goes; None: the Trainer's ``args.output_dir``.
        save_arrays: write the npz files (without them, nothing is back-filled or kept from a re-evaluation).
        log_histograms: log to W&B (only when ``report_to`` includes wandb).
        max_buckets: histogram buckets (W&B allows at most 512).
    """

    def __init__(self, evaluator: CEDecompositionEval, output_dir: str | os.PathLike | None = None,
                 save_arrays: bool = True, log_histograms: bool = True, max_buckets: int = 512) -> None:
        if not isinstance(evaluator, CEDecompositionEval):
            raise TypeError(f"Expected a CEDecompositionEval, got {type(evaluator).__name__}.")
        if not 1 <= max_buckets <= 512:
            raise ValueError(f"max_buckets must be in [1, 512] (a W&B histogram limit), got {max_buckets}")
        self.evaluator = evaluator
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.save_arrays = save_arrays
        self.log_histograms = log_histograms
        self.max_buckets = max_buckets
        self._renderers: dict[str, Any] = {}
        self._wandb_callback: Any = None  # the Trainer's WandbCallback, taken over (see on_init_end)
        self._ledgers: dict[str, set[int]] = {}  # per eval set: the steps W&B holds
        self._backfilled = False

    @staticmethod
    def eval_set_name(metrics: Mapping[str, Any]) -> str | None:
        """The eval set of a Trainer metrics dict: ``eval`` for ``eval_cross_entropy``, ``code`` for
        ``eval_code_cross_entropy`` (a dict ``eval_dataset``); None if the decomposition is not in it."""
        for key in metrics:
            if key.endswith("_cross_entropy"):
                prefix = key[: -len("_cross_entropy")]
                return prefix[len("eval_"):] if prefix.startswith("eval_") else prefix
        return None

    # ------------------------------------------------------------------------------------------- hooks

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._wants_wandb(args):
            return
        from transformers.integrations import WandbCallback
        from transformers.trainer_callback import CallbackHandler

        handler = sys._getframe(1).f_locals.get("self")  # the CallbackHandler calling this hook
        if not isinstance(handler, CallbackHandler):
            warnings.warn("CEDecompositionTrainerCallback: cannot reach the Trainer's callbacks; its WandbCallback "
                          "logs the evaluations itself (a re-evaluated step may reach W&B twice)", stacklevel=2)
            return
        for callback in list(handler.callbacks):
            if isinstance(callback, WandbCallback):
                handler.callbacks.remove(callback)
                self._wandb_callback = callback

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start_wandb(args, state, kwargs.get("model"))
        self._forward("on_train_begin", args, state, control, **kwargs)
        self._backfill(args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forward("on_train_end", args, state, control, **kwargs)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forward("on_save", args, state, control, **kwargs)

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._forward("on_predict", args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        logs = dict(logs or {})
        name = self.eval_set_name(logs)
        if name is None or self.evaluator.last_state is None:
            self._start_wandb(args, state, kwargs.get("model"))
            self._forward("on_log", args, state, control, logs=logs, **kwargs)
            return
        if state.is_world_process_zero:
            self._backfill(args, state)
            self._record(args, state, name, logs)

    # ----------------------------------------------------------------------------------------- helpers

    def _root(self, args: Any) -> Path:
        return self.output_dir if self.output_dir is not None else Path(args.output_dir)

    def _wants_wandb(self, args: Any) -> bool:
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        return "wandb" in report_to

    def _forward(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._wandb_callback is not None:
            getattr(self._wandb_callback, event)(args, state, control, **kwargs)

    def _start_wandb(self, args: Any, state: Any, model: Any = None) -> Any:
        """The W&B run (started here, before the WandbCallback's setup, with the id kept in output_dir), or None
        without W&B or off world rank zero."""
        if not self._wants_wandb(args) or not state.is_world_process_zero:
            return None
        import wandb

        if wandb.run is None:
            from ce_dynamics.files import atomic_open

            path = self._root(args) / "wandb_run_id"
            run_id = path.read_text().strip() if path.is_file() else ""
            if not run_id:
                run_id = uuid.uuid4().hex[:12]
                with atomic_open(path, "w") as handle:
                    handle.write(run_id)
            wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), name=args.run_name, id=run_id,
                       resume="allow")
        callback = self._wandb_callback
        if callback is not None and not callback._initialized:
            callback.setup(args, state, model)
        return wandb.run

    def _ledger(self, run: Any, name: str) -> set[int]:
        """The steps whose ``decomp/<name>/`` row the W&B run durably holds (read back once, then kept)."""
        if name not in self._ledgers:
            from ce_dynamics.wandb_history import logged_steps, run_files

            files = run_files(Path(run.dir).parent.parent, run.id)
            self._ledgers[name] = logged_steps(files, f"decomp/{name}/", step_key="train/global_step")
        return self._ledgers[name]

    def _record(self, args: Any, state: Any, name: str, logs: Mapping[str, Any]) -> None:
        """Save this evaluation's state (unless the step is saved already: then the saved one stands), then log
        the row of whatever is saved to W&B, if W&B lacks it."""
        from ce_dynamics.files import save_state, state_path

        counts, sums = self.evaluator.last_state
        step = int(state.global_step)
        path = state_path(self._root(args), name, step)
        saved = _readable_state(path) if self.save_arrays and path.exists() else None
        if saved is not None:
            self._refuse_reevaluation(path, name, step, saved, counts, sums)
            counts, sums, logs = saved["rank_counts"], saved["rank_log_score_sum"], {}
        elif self.save_arrays:
            save_state(self._root(args), name, step, {"rank_counts": counts, "rank_log_score_sum": sums,
                                                      **self.evaluator.last_bootstrap_state})
        run = self._start_wandb(args, state)
        if run is None or not self.log_histograms or step in self._ledger(run, name):
            return
        from transformers.integrations.integration_utils import rewrite_logs

        row = {**rewrite_logs(logs), **self._row(name, counts, sums, step), "train/global_step": step}
        run.log(row)
        self._ledger(run, name).add(step)

    @staticmethod
    def _refuse_reevaluation(path: Path, name: str, step: int, saved: Mapping[str, np.ndarray],
                             counts: np.ndarray, sums: np.ndarray) -> None:
        if np.array_equal(saved["rank_counts"], counts) and np.array_equal(saved["rank_log_score_sum"], sums):
            return
        old = decomposition_from_state(torch.as_tensor(saved["rank_counts"]),
                                       torch.as_tensor(saved["rank_log_score_sum"]))["cross_entropy"]
        new = decomposition_from_state(torch.as_tensor(counts), torch.as_tensor(sums))["cross_entropy"]
        warnings.warn(f"CEDecompositionTrainerCallback: {name} at step {step} was evaluated again (a resume from an "
                      f"earlier checkpoint; the Trainer's resume is not bit-exact) and differs from the record "
                      f"(cross_entropy {float(old):.6f} recorded in {path}, {float(new):.6f} now); the first "
                      "evaluation stays the record in every sink and this one is not logged", RuntimeWarning,
                      stacklevel=3)

    def _row(self, name: str, counts: np.ndarray, sums: np.ndarray, step: int) -> dict[str, Any]:
        """``decomp/<name>/<key>`` scalars and the p_e/q_e histograms and image of one state."""
        import wandb

        from ce_dynamics.plotting import PEQERenderer, wandb_rank_histograms

        out = decomposition_from_state(torch.as_tensor(counts), torch.as_tensor(sums))
        row: dict[str, Any] = {f"decomp/{name}/{key}": float(out[key]) for key in KEYS}
        row[f"decomp/{name}/num_tokens"] = int(out["num_tokens"])
        p_e, q_e = out["p_e"].numpy(), out["q_e"].numpy()
        row.update({f"decomp/{name}/{key}": hist
                    for key, hist in wandb_rank_histograms(p_e, q_e, self.max_buckets).items()})
        renderer = self._renderers.setdefault(name, PEQERenderer())
        row[f"decomp/{name}/p_e_vs_q_e"] = wandb.Image(renderer.render(p_e, q_e, title=f"{name}, step {step}",
                                                                        values=out))
        return row

    def _backfill(self, args: Any, state: Any) -> None:
        """Once per process: log every saved step W&B lacks (a process killed between the npz and the row);
        a state file that cannot be read is moved aside, loudly, and logged nowhere."""
        if self._backfilled or not state.is_world_process_zero:
            return
        self._backfilled = True
        run = self._start_wandb(args, state)
        arrays = self._root(args) / "arrays"
        if run is None or not self.log_histograms or not arrays.is_dir():
            return
        from ce_dynamics.files import state_files

        for folder in sorted(p for p in arrays.iterdir() if p.is_dir()):
            for step, path in sorted(state_files(folder).items()):
                if step in self._ledger(run, folder.name) or (saved := _readable_state(path)) is None:
                    continue
                run.log({**self._row(folder.name, saved["rank_counts"], saved["rank_log_score_sum"], step),
                         "train/global_step": step})
                self._ledger(run, folder.name).add(step)


def _readable_state(path: Path) -> dict[str, np.ndarray] | None:
    """A saved state, or None when it cannot be read: then it is moved aside to ``*.damaged``, with a warning
    naming it, and what it held is logged nowhere."""
    from ce_dynamics.files import DamagedFileError, load_state, set_aside

    try:
        return load_state(path)
    except DamagedFileError as err:
        moved = set_aside(path)
        warnings.warn(f"CEDecompositionTrainerCallback: {err}; moved aside to {moved}: that evaluation is logged "
                      "nowhere (a new evaluation at that step is recorded anew)", RuntimeWarning, stacklevel=3)
        return None
