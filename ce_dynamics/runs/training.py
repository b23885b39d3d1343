"""Builders shared by training and replay (tokenizer, data, module, loggers, trainer), and `run_training`."""

from __future__ import annotations

import json
import logging
import signal
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("lightning", "transformers", "omegaconf")

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ce_dynamics.lightning import sinks
from ce_dynamics.lightning.callback import CEDecompositionCallback
from ce_dynamics.lightning.csv_logger import DurableCSVLogger
from ce_dynamics.runs.data import CEDataModule, corpus_id, documents, take_chars, train_bpe_tokenizer
from ce_dynamics.files import atomic_open, remove_stale_temporaries
from ce_dynamics.runs.module import CausalLMModule
from ce_dynamics.runs.preemption import Preempted, PreemptionCallback
from ce_dynamics.lightning.progress import console_callbacks

log = logging.getLogger(__name__)

_NOT_SHAPE_KEYS = ("hub_id", "revision", "pretrained", "tokenizer", "validation_output")


def model_shape(cfg: DictConfig) -> dict[str, Any]:
    """The GPT-NeoX config kwargs of `cfg.model` (every model.* key but the hub/tokenizer ones)."""
    return {k: v for k, v in _plain(cfg.model).items() if k not in _NOT_SHAPE_KEYS}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_tokenizer(cfg: DictConfig, hub_id: str | None = None, revision: str | None = None) -> Any:
    """`model.tokenizer`, else the hub model's (`hub_id` or `model.hub_id`), else a BPE trained on data.train.

    The BPE is cached in `data.cache_dir`, keyed by corpus and vocabulary size.
    """
    from transformers import AutoTokenizer

    if cfg.model.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if hub_id or cfg.model.hub_id:
        return AutoTokenizer.from_pretrained(hub_id or cfg.model.hub_id,
                                             revision=revision if hub_id else cfg.model.revision)
    spec = train_spec(cfg)
    chars = cfg.data.tokenizer_train_chars
    key = f"{corpus_id(spec, 'train')}|chars={chars}"
    return train_bpe_tokenizer(take_chars(documents(spec, "train"), chars), cfg.model.vocab_size,
                               cfg.data.cache_dir, key)


def train_spec(cfg: DictConfig) -> dict[str, Any]:
    """`data.train` as a source spec for `ce_dynamics.runs.data.documents`: its set fields, `max_chars` aside."""
    return {k: v for k, v in _plain(cfg.data.train).items() if k != "max_chars" and v is not None}


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> CEDataModule:
    """The datamodule: `data.eval_sets` (looked up in the `data.eval` catalog) as validation dataloaders."""
    return CEDataModule(
        tokenizer,
        eval_specs={name: _plain(cfg.data.eval[name]) for name in cfg.data.eval_sets},
        seq_len=cfg.data.seq_len,
        eval_sequences=cfg.data.eval_sequences,
        batch_size=cfg.data.batch_size,
        train_spec=train_spec(cfg),
        train_max_chars=cfg.data.train.max_chars,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        cache_dir=cfg.data.cache_dir,
    )


def build_module(cfg: DictConfig, hub_id: str | None = None, revision: str | None = None,
                 dtype: str = "float32", **placement: Any) -> CausalLMModule:
    """`from_pretrained(hub_id, revision)` when given (or `model.pretrained`), else GPT-NeoX from model.*;
    `placement`: `device_map`/`offload_folder` for `from_pretrained` (ce_dynamics/runs/weights.py)."""
    kwargs = {**_plain(cfg.optim), "validation_output": cfg.model.validation_output, **placement}
    if hub_id is None and cfg.model.pretrained:
        hub_id, revision = cfg.model.hub_id, cfg.model.revision
        if not hub_id:
            raise ValueError("model.pretrained=true needs model.hub_id")
    if hub_id is not None:
        return CausalLMModule(hub_id=hub_id, revision=revision, dtype=dtype, **kwargs)
    return CausalLMModule(model_config=model_shape(cfg), **kwargs)


def _wandb_run_id(output_dir: Path, run_name: str) -> str:
    """The W&B run id of `run_name` in this output_dir (created once, kept in `wandb_run_ids.json`), so a
    resumed run continues the same charts while differently named runs (replay's models) stay apart."""
    path = output_dir / "wandb_run_ids.json"
    ids = json.loads(path.read_text()) if path.exists() else {}
    if run_name not in ids:
        ids[run_name] = uuid.uuid4().hex[:12]
        with atomic_open(path, "w") as handle:
            handle.write(json.dumps(ids, indent=1))
    return ids[run_name]


def build_loggers(cfg: DictConfig, run_name: str) -> list[Logger]:
    """A DurableCSVLogger, plus a WandbLogger (offline by default) under `output_dir` unless W&B is disabled.

    Online mode without an API key or network falls back to offline with a warning instead of failing.
    """
    out = Path(cfg.output_dir)
    loggers: list[Logger] = [DurableCSVLogger(save_dir=out, name="csv")]
    mode = cfg.logger.wandb.mode
    if mode == "disabled":
        return loggers

    def wandb_logger(mode: str) -> WandbLogger:
        logger = WandbLogger(project=cfg.logger.wandb.project, name=run_name, save_dir=str(out),
                             id=_wandb_run_id(out, run_name), resume="allow", mode=mode,
                             config=OmegaConf.to_container(cfg, resolve=True))
        init = getattr(logger, "_wandb_init", {})
        if "anonymous" in init and init["anonymous"] is None:  # Lightning passes anonymous=None, and wandb warns
            del init["anonymous"]                                # "The anonymous setting has no effect" for it
        return logger

    logger = wandb_logger(mode)
    if mode == "online":
        try:
            logger.experiment  # noqa: B018 - start the run now, so a login or network failure shows here
        except Exception as err:  # wandb raises several types for "no key" and "no network"
            warnings.warn(f"W&B online failed ({err!r}); logging offline instead (`wandb sync` it later)",
                          stacklevel=2)
            logger = wandb_logger("offline")
    return [*loggers, logger]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on any local disk: a temporary file beside the target, fsynced, then
    renamed over it. (Lightning's own transaction writes the temporary under the system's temp folder and copies
    it over the target when that is another disk, so a kill mid-copy leaves a torn checkpoint.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_open(path) as handle:
            torch.save(checkpoint, handle)


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger], **overrides: Any) -> L.Trainer:
    """`lightning.Trainer(**cfg.trainer, **overrides)` writing under `output_dir`, checkpoints written atomically."""
    return L.Trainer(**{**_plain(cfg.trainer), **overrides}, callbacks=callbacks, logger=loggers or False,
                     default_root_dir=cfg.output_dir, plugins=[AtomicCheckpointIO()])


def checkpoint_callback(cfg: DictConfig) -> ModelCheckpoint:
    """`checkpoints/last.ckpt` rewritten after every validation of `fit`; with `checkpoint.keep=all` also
    `checkpoints/step_<N>.ckpt` for each."""
    where = Path(cfg.output_dir) / "checkpoints"
    common = dict(dirpath=where, auto_insert_metric_name=False, every_n_epochs=1, save_on_train_epoch_end=False,
                  enable_version_counter=False)
    if cfg.checkpoint.keep == "all":
        return ModelCheckpoint(filename="step_{step}", save_top_k=-1, save_last=True, **common)
    return ModelCheckpoint(filename="last", save_top_k=1, **common)  # without a monitor: the latest, overwritten


def run_training(cfg: DictConfig) -> int:
    """Train `cfg`'s model, validating (and logging the decomposition) at step 0 and every
    `trainer.val_check_interval` batches; checkpoints in `output_dir/checkpoints`. Returns an exit code."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    if rank_zero_only.rank == 0:  # (DDP children start while rank zero writes)
        for path in remove_stale_temporaries(out):  # an atomic write a kill interrupted (e.g. .last.ckpt.*.tmp)
            log.warning("removed %s, the temporary file of an interrupted write", path)
    tokenizer = build_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    module = build_module(cfg)
    width = module.model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > width:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {width} logits "
                         f"(raise model.vocab_size)")
    callback = CEDecompositionCallback(output_dir=out, dataset_names=list(cfg.data.eval_sets),
                                       bootstrap=cfg.eval.bootstrap)
    callbacks = [callback, checkpoint_callback(cfg), PreemptionCallback(out / "checkpoints" / "last.ckpt"),
                 LearningRateMonitor(logging_interval="step"),
                 *console_callbacks(cfg.trainer)]  # a progress bar over optimizer steps; no "Total FLOPs: 0"
    ckpt_path = cfg.ckpt_path
    if ckpt_path in ("last", "last_or_new"):  # preflight refused `last` on a folder holding no run at all
        last = out / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if last.exists() else None
        if ckpt_path is None and cfg.ckpt_path == "last":
            log.info("no checkpoint in %s yet (the run stopped before its first one): starting at step 0; the "
                     "validations already saved in arrays/ are not logged twice", last.parent)
    loggers = build_loggers(cfg, run_name=cfg.experiment)
    trainer = build_trainer(cfg, callbacks, loggers)
    try:
        if ckpt_path is None:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # step 0: the untrained model on every chart
        if trainer.max_steps != 0:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            if trainer.global_step not in sinks.saved_steps(out, cfg.data.eval_sets):
                trainer.validate(module, datamodule=datamodule)  # the final model, whatever val_check_interval
    except (Preempted, SIGTERMException) as stop:  # SIGTERMException: Lightning's own stop (SLURM auto-requeue)
        code = stop.exit_code if isinstance(stop, Preempted) else 128 + signal.SIGTERM
        if trainer.is_global_zero:
            print(f"{cfg.experiment}: {stop if isinstance(stop, Preempted) else 'stopped by SIGTERM'}; exit code "
                  f"{code}. Every recorded validation is in the sinks; resume with ckpt_path=last "
                  f"({out / 'checkpoints' / 'last.ckpt'})", file=sys.stderr)
        return code
    finally:
        if any(isinstance(lg, WandbLogger) for lg in loggers) and trainer.is_global_zero:
            import wandb

            wandb.finish()  # flush the (offline) run to disk now, and let a later run in this process start anew
    return 0
