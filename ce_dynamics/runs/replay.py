"""Replay: walk released checkpoint revisions (or a run's own checkpoints) through the same callback.

For every (model, revision) the model and its tokenizer are loaded with
`from_pretrained(hub_id, revision="stepN")`, the experiment's eval sets are evaluated with `trainer.validate`
and `CEDecompositionCallback` logging at step N, and one row per eval set is appended to
`output_dir/results.jsonl`. Everything else of a model lives in `output_dir/<model slug>/` (W&B run, CSV
log, `arrays/<dataset>/step_<N>.npz`); one W&B run per model, resumed on a rerun.

A rerun skips the (model, revision, dataset) rows already in the results file, so an interrupted walk only
does the missing work and logs no W&B step twice. A checkpoint that cannot be loaded is reported (hub id,
revision, cache location, reason); the walk goes on and the exit code is 1 at the end.

`replay.revisions=all` walks every `stepN` branch (offline: the refs the cache holds) in step order. Each row
records the `commit` its revision resolved to; two revisions with identical weights get a warning naming both
(ce_dynamics/runs/revisions.py). `replay.keep_weights=false` deletes a revision's downloaded files once evaluated.
The trainer's accelerator/devices/strategy/num_nodes not given on the command line are fitted to this
machine (:func:`fit_hardware`), and a setting it cannot run is refused before the walk.

On a cluster: `replay.shard=i/n` walks a slice of the checkpoints in its own folder and `replay.shard=merge`
combines the slices (ce_dynamics/runs/shards.py); `replay.weights=device_map` spreads a model larger than one
device (ce_dynamics/runs/weights.py); `replay.dry_run=true` prints the plan instead (ce_dynamics/runs/plan.py).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("omegaconf", "transformers", "lightning")

from omegaconf import DictConfig

from ce_dynamics.bootstrap import interval_keys
from ce_dynamics.files import (RESULT_FIELDS, append_result_row, append_result_rows, done_keys, read_results,
                               remove_stale_temporaries)
from ce_dynamics.functional import KEYS
from ce_dynamics.runs.checkpoints import Checkpoint, model_slug, plan

__all__ = ["RESULT_FIELDS", "append_result_row", "append_result_rows", "read_results", "run_replay"]

log = logging.getLogger(__name__)

_PRECISION = {"float32": "32-true", "bfloat16": "bf16-true"}


# -------------------------------------------------------------------------------------------- loading


def _where(ckpt: Checkpoint) -> str:
    """What was looked for, and where, for a failure report."""
    if ckpt.path is not None:
        return f"checkpoint {ckpt.path} (step {ckpt.step})"
    import huggingface_hub.constants as hf

    refs = Path(hf.HF_HUB_CACHE) / ("models--" + ckpt.model.replace("/", "--")) / "refs"
    cached = sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []
    return (f"hub id {ckpt.model!r}, revision {ckpt.revision!r}, cache {hf.HF_HUB_CACHE} "
            f"({'offline' if hf.HF_HUB_OFFLINE else 'online'}; cached refs: {', '.join(cached) or 'none'})")


def _load(cfg: DictConfig, ckpt: Checkpoint) -> tuple[Any, Any]:
    """(tokenizer, CausalLMModule in `replay.dtype`) for one checkpoint."""
    import torch

    from ce_dynamics.runs.module import DTYPES, CausalLMModule
    from ce_dynamics.runs.training import build_module, build_tokenizer

    if ckpt.path is None:
        from ce_dynamics.runs.weights import spread_kwargs

        tokenizer = build_tokenizer(cfg, hub_id=ckpt.model, revision=ckpt.revision)
        load_cfg, placed = spread_kwargs(cfg, ckpt.model, ckpt.revision)
        module = build_module(load_cfg, hub_id=ckpt.model, revision=ckpt.revision, dtype=cfg.replay.dtype, **placed)
    else:
        tokenizer = build_tokenizer(cfg)
        state = torch.load(ckpt.path, map_location="cpu", weights_only=False)
        module = CausalLMModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
        module = module.to(DTYPES[cfg.replay.dtype])
        del state
    width = module.model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > width:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {width} logits")
    return tokenizer, module


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- walk


@dataclass(frozen=True)
class Failure:
    checkpoint: Checkpoint
    what: str  # "load" or "evaluate"
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.checkpoint.model} {self.checkpoint.revision}: cannot {self.what} ({self.where}): {self.reason}"


class _ModelWalk:
    """The loggers, callback and eval data shared by the revisions of one model (one W&B run)."""

    def __init__(self, cfg: DictConfig, ckpt: Checkpoint) -> None:
        from ce_dynamics.runs.training import build_loggers

        self.cfg = copy.deepcopy(cfg)
        self.cfg.output_dir = str(Path(cfg.output_dir) / ckpt.folder)
        precision = _PRECISION[cfg.replay.dtype]
        if str(self.cfg.trainer.precision) != precision:
            log.info("replay: trainer.precision %s -> %s (replay.dtype=%s)", self.cfg.trainer.precision, precision,
                     cfg.replay.dtype)
            self.cfg.trainer.precision = precision
        self.loggers = build_loggers(self.cfg, run_name=ckpt.run_name)
        self._datamodule: tuple[str, Any] | None = None

    def datamodule(self, tokenizer: Any, names: list[str]) -> Any:
        """The eval data for `names`, tokenized by `tokenizer`; reused while the tokenizer is the same."""
        from ce_dynamics.runs.training import build_datamodule

        key = f"{_tokenizer_key(tokenizer)}|{names}"
        if self._datamodule is None or self._datamodule[0] != key:
            sub = copy.deepcopy(self.cfg)
            sub.data.eval_sets = names
            self._datamodule = (key, build_datamodule(sub, tokenizer))
        return self._datamodule[1]

    def evaluate(self, ckpt: Checkpoint, module: Any, tokenizer: Any, names: list[str],
                 commit: str | None = None) -> list[dict[str, Any]]:
        """`trainer.validate` at step `ckpt.step`; the result rows (on global rank zero; [] elsewhere).

        A named revision (`main`) is logged at the step of the `stepN` branch with the same commit, else at 0,
        in its own folder (:attr:`Checkpoint.folder`); its rows carry that step, or None when there is none."""
        from ce_dynamics.lightning.callback import CEDecompositionCallback
        from ce_dynamics.bpb import BPB_KEYS
        from ce_dynamics.analysis.scaling import family_of, non_embedding_params
        from ce_dynamics.runs.training import build_trainer

        step = ckpt.step
        if ckpt.named and ckpt.path is None:
            from ce_dynamics.runs.revisions import resolved_commit, step_of_commit

            step = step_of_commit(ckpt.model, commit or resolved_commit(ckpt.model, ckpt.revision))
        callback = CEDecompositionCallback(output_dir=self.cfg.output_dir, dataset_names=names, nan_strategy="error",
                                           bootstrap=self.cfg.eval.bootstrap)
        callback.step = step or 0
        from ce_dynamics.runs.weights import trainer_overrides

        trainer = build_trainer(self.cfg, [callback], self.loggers, **trainer_overrides(module))
        # Lightning logs the module's own metrics (val/loss/...) at this counter: the checkpoint's step too.
        trainer.fit_loop.epoch_loop._batches_that_stepped = step or 0
        trainer.validate(module, datamodule=self.datamodule(tokenizer, names), verbose=False)
        if not trainer.is_global_zero:
            return []
        params = non_embedding_params(module.model)
        data = self.datamodule(tokenizer, names)
        return [
            {"model": ckpt.model, "family": family_of(ckpt.model), "revision": ckpt.revision, "commit": commit,
             "step": step, "dataset": name, "num_tokens": int(callback.last_results[name]["num_tokens"]),
             "non_embedding_params": params, **{key: float(callback.last_results[name][key]) for key in KEYS},
             **{key: v for key, v in callback.last_results[name].items() if key in BPB_KEYS},
             **{key: v for key, v in callback.last_results[name].items() if key in (*interval_keys(), "replicates")},
             "num_bytes": data.eval_bytes.get(name), "eval_hash": data.eval_hashes.get(name)}
            for name in names
        ]

    def backfill(self, names: list[str]) -> list[int]:
        """Log the saved steps of this model that a logger lacks (a walk killed before W&B or the CSV got them)."""
        from ce_dynamics.lightning import sinks

        return sinks.backfill(self.loggers, Path(self.cfg.output_dir), names, sinks.WandbMedia())

    def close(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


_HARDWARE = {"accelerator": "auto", "devices": 1, "strategy": "auto", "num_nodes": 1}


def command_line_keys(argv: Iterable[str]) -> set[str]:
    """The config keys a `key=value` command line sets (`trainer.devices=2` -> `trainer.devices`)."""
    return {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}


def fit_hardware(cfg: DictConfig, given: Iterable[str]) -> list[str]:
    """Replay on the hardware at hand: the experiment's `trainer.accelerator/devices/strategy/num_nodes` (8 GPUs,
    DDP: settings for mode=train) become auto/1/auto/1, i.e. one GPU if there is one, else the CPU, except the
    keys in `given` (those set on the command line). In place; returns what changed, as `key: old -> new`."""
    given = set(given)
    changed = []
    for key, value in _HARDWARE.items():
        old = cfg.trainer[key]
        if f"trainer.{key}" not in given and old != value:
            cfg.trainer[key] = value
            changed.append(f"trainer.{key}: {old} -> {value}")
    return changed


def hardware_problem(cfg: DictConfig) -> str | None:
    """Why `cfg.trainer`'s accelerator/devices/strategy cannot run on this machine (None if they can): the
    Trainer's own check, made once before the walk instead of failing at every checkpoint."""
    import lightning as L

    settings = {key: cfg.trainer[key] for key in _HARDWARE}
    try:
        L.Trainer(**settings, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    except Exception as err:  # noqa: BLE001 - Lightning raises several types for unavailable hardware
        given = " ".join(f"trainer.{k}={v}" for k, v in settings.items())
        reason = " ".join(str(err).split())
        return (f"{given} cannot run on this machine ({type(err).__name__}: {reason}); drop these trainer.* "
                "overrides to replay on the hardware at hand (one GPU if present, else the CPU)")
    return None


def run_replay(cfg: DictConfig, command_line: Iterable[str] | None = None) -> int:
    """Walk `cfg`'s checkpoints (see the module docstring); 0 when all were evaluated, 1 if some failed,
    2 for a bad replay configuration or hardware settings this machine cannot run.

    `command_line`: the `key=value` arguments the config came from; given, the trainer's hardware keys not set
    there are fitted to this machine (:func:`fit_hardware`). None: `cfg.trainer` is used as it is.
    """
    from lightning.pytorch.utilities import rank_zero_only
    from tqdm.auto import tqdm

    if cfg.replay.shard == "merge":  # on any machine: no hardware check
        return _merge(cfg)
    if command_line is not None:
        cfg = copy.deepcopy(cfg)
        changed = fit_hardware(cfg, command_line_keys(command_line))
        if changed and rank_zero_only.rank == 0:
            print(f"replay: on the hardware at hand ({'; '.join(changed)}); the experiment's settings apply to "
                  "mode=train, give trainer.* on the command line to choose", file=sys.stderr)
    from ce_dynamics.runs.weights import weights_problem

    problem = weights_problem(cfg) or hardware_problem(cfg)
    if problem is not None:
        print(f"replay: {problem}", file=sys.stderr)
        return 2
    try:
        checkpoints = plan(cfg)
    except ValueError as err:
        print(f"replay: {err}", file=sys.stderr)
        return 2
    if cfg.replay.shard is not None:  # a job array's slice; output_dir is already the shard's own folder
        from ce_dynamics.runs.shards import parse_shard

        checkpoints = parse_shard(cfg.replay.shard).take(checkpoints)
    if cfg.replay.dry_run:
        from ce_dynamics.runs.plan import print_plan

        return print_plan(cfg, checkpoints)
    if cfg.replay.shard is not None:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # started, even with an empty slice
    out = Path(cfg.output_dir)
    if rank_zero_only.rank == 0:
        for path in remove_stale_temporaries(out):  # an atomic write a kill interrupted
            log.warning("removed %s, the temporary file of an interrupted write", path)
    results_path = out / "results.jsonl"
    done = done_keys(results_path)
    eval_sets = list(cfg.data.eval_sets)
    failures: list[Failure] = []
    walks: dict[str, _ModelWalk] = {}
    digests: dict[tuple[str, str], str] = {}  # (model, weights sha256) -> the first revision that had them
    skipped = 0
    zero = rank_zero_only.rank == 0  # under DDP every rank walks; one bar and one summary
    bar = tqdm(checkpoints, desc="replay", unit="ckpt", dynamic_ncols=True, file=sys.stderr, disable=not zero)
    try:
        for i, ckpt in enumerate(bar, start=1):
            bar.set_description(f"replay {i}/{len(checkpoints)} {ckpt.model} {ckpt.revision}")
            names = [d for d in eval_sets if (ckpt.model, ckpt.revision, d) not in done]
            if not names:
                skipped += 1
                continue
            for other in [f for f in walks if f != ckpt.folder]:  # one W&B run at a time
                walks.pop(other).close()
            try:
                tokenizer, module = _load(cfg, ckpt)
            except Exception as err:  # noqa: BLE001 - any load error is reported and the walk goes on
                failures.append(_report(ckpt, "load", err))
                continue
            commit = None
            try:
                commit = _check_integrity(ckpt, module, digests) if zero else None
                walk = walks.get(ckpt.folder) or walks.setdefault(ckpt.folder, _ModelWalk(cfg, ckpt))
                rows = walk.evaluate(ckpt, module, tokenizer, names, commit=commit)
                if rows:
                    append_result_rows(results_path, rows)
                    done.update((r["model"], r["revision"], r["dataset"]) for r in rows)
            except Exception as err:  # noqa: BLE001
                failures.append(_report(ckpt, "evaluate", err))
            finally:
                del module, tokenizer
                _free_memory()
                if cfg.replay.weights != "whole":
                    from ce_dynamics.runs.weights import remove_offload

                    remove_offload(cfg, ckpt.model, ckpt.revision)
                if not cfg.replay.keep_weights and zero and commit is not None:
                    _delete_weights(ckpt, commit)
    finally:
        bar.close()
        for walk in walks.values():
            walk.close()
    if zero:  # a model whose every revision was already done may still lack rows in W&B or the CSV
        for ckpt in {c.folder: c for c in checkpoints}.values():
            if ckpt.folder not in walks and _sinks_lacking(cfg, ckpt, eval_sets):
                walk = _ModelWalk(cfg, ckpt)
                try:
                    walk.backfill(eval_sets)
                finally:
                    walk.close()
    evaluated = len(checkpoints) - skipped - len(failures)
    if not zero:
        return 1 if failures else 0
    print(f"replay: {evaluated} checkpoint(s) evaluated, {skipped} already in {results_path}, "
          f"{len(failures)} failed", file=sys.stderr)
    if failures:
        print("replay: failed:\n" + "\n".join(f"  - {f}" for f in failures), file=sys.stderr)
        return 1
    return 0


def _merge(cfg: DictConfig) -> int:
    """`replay.shard=merge`: the shards in `output_dir/shards/` into `output_dir/results.jsonl` (runs/shards.py)."""
    from ce_dynamics.runs.shards import MergeError, merge_shards

    try:
        walk = [(c.model, c.revision) for c in plan(cfg)]
        path = merge_shards(cfg.output_dir, walk, list(cfg.data.eval_sets),
                            rerun=f"ce-dynamics replay experiment={cfg.experiment} replay.shard={{i}}/{{n}}")
    except (ValueError, MergeError) as err:
        print(f"replay: cannot merge: {err}", file=sys.stderr)
        return 2
    print(f"replay: merged {len(read_results(path))} rows into {path}", file=sys.stderr)
    return 0


def _sinks_lacking(cfg: DictConfig, ckpt: Checkpoint, names: list[str]) -> bool:
    """Whether a saved step in `ckpt`'s folder is missing from its CSV log or W&B run (read from disk, no W&B
    start)."""
    from ce_dynamics.lightning import sinks
    from ce_dynamics.lightning.csv_logger import DurableCSVLogger
    from ce_dynamics.runs.training import _wandb_run_id
    from ce_dynamics.wandb_history import logged_steps, run_files

    root = Path(cfg.output_dir) / ckpt.folder
    saved = set(sinks.saved_steps(root, names))
    if not saved:
        return False
    if not saved <= (sinks.ledger(DurableCSVLogger(root)) or set()):
        return True
    if cfg.logger.wandb.mode == "disabled":
        return False
    run_id = _wandb_run_id(root, ckpt.run_name)
    return not saved <= logged_steps(run_files(root / "wandb", run_id), sinks.ROW_PREFIX)


def _check_integrity(ckpt: Checkpoint, module: Any, digests: dict[tuple[str, str], str]) -> str | None:
    """The commit a hub revision resolved to (None for a checkpoint file); warns when its weights equal an
    earlier revision's of the same model (pythia issue #205: some branches hold the same weights)."""
    import warnings

    from ce_dynamics.runs.revisions import resolved_commit, weights_digest

    if any(p.device.type == "meta" for p in module.model.parameters()):  # layers offloaded to disk: not in memory
        return resolved_commit(ckpt.model, ckpt.revision) if ckpt.path is None else None
    digest = weights_digest(module.model)
    first = digests.setdefault((ckpt.model, digest), ckpt.revision)
    if first != ckpt.revision:
        message = (f"{ckpt.model}: revisions {first} and {ckpt.revision} have identical weights (sha256 "
                   f"{digest[:12]}); the second is not a different point of training")
        warnings.warn(message, stacklevel=2)
        print(f"replay: warning: {message}", file=sys.stderr)
    return resolved_commit(ckpt.model, ckpt.revision) if ckpt.path is None else None


def _delete_weights(ckpt: Checkpoint, commit: str) -> None:
    """replay.keep_weights=false: free the evaluated revision's downloaded files."""
    from ce_dynamics.runs.revisions import delete_revision_files

    try:
        freed = delete_revision_files(ckpt.model, commit)
    except Exception as err:  # noqa: BLE001 - a cache we cannot clean must not stop the walk
        print(f"replay: could not delete {ckpt.model} {ckpt.revision} ({commit}) from the cache: {err!r}",
              file=sys.stderr)
        return
    log.info("replay: deleted %s %s (%s) from the cache, %.1f MB", ckpt.model, ckpt.revision, commit, freed / 1e6)


def _report(ckpt: Checkpoint, what: str, err: BaseException) -> Failure:
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
    if len(reason) > 600:
        reason = reason[:600] + " ..."
    failure = Failure(ckpt, what, _where(ckpt), reason)
    if what == "evaluate":  # unlike a missing revision, this is unexpected: show where it happened
        traceback.print_exception(err, file=sys.stderr)
    print(f"replay: {failure}", file=sys.stderr)
    return failure
