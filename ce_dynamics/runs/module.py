"""CausalLMModule: a Hugging Face causal LM as a LightningModule that honours the callback's contract
(`validation_step` returns aligned `{"logits", "labels", "loss"}`, or `{"hidden_states", "labels", "loss"}`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ce_dynamics._extras import require

require("lightning", "transformers")

import lightning as L
import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALIDATION_OUTPUTS = ("logits", "hidden_states")
_LOSS_BLOCK_ELEMENTS = 2**24  # logits per block of the validation loss from hidden states (64 MiB in fp32)


def build_gpt_neox(model_config: Mapping[str, Any]) -> torch.nn.Module:
    """A randomly initialised GPT-NeoX causal LM from `transformers.GPTNeoXConfig` keyword arguments."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**dict(model_config), hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(config)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps` (Pythia's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """Next-token LM around a Hugging Face causal LM.

    Either `model_config` (GPT-NeoX keyword arguments; trains from scratch) or `hub_id` (+ `revision`, loaded
    with `from_pretrained`, in `dtype`). Logs `train/loss` and `val/loss/<eval set>`.

    `validation_output="hidden_states"`: `validation_step` returns the last hidden states instead of the logits
    (the callback scores them against `get_output_embeddings()`), and computes its loss in token blocks, so a
    large vocabulary's `N x V` logits are never built in validation. Only for models whose logits are
    `lm_head(last_hidden_state)` (no logit scaling or soft-capping after the head).

    `device_map` (with `hub_id`): accelerate's placement of the layers over devices, CPU and disk
    (`offload_folder`); see ce_dynamics/runs/weights.py.
    """

    def __init__(self, model_config: Mapping[str, Any] | None = None, hub_id: str | None = None,
                 revision: str | None = None, dtype: str = "float32", lr: float = 3e-3,
                 min_lr_ratio: float = 0.1, warmup_steps: int = 0, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 validation_output: str = "logits", device_map: Mapping[str, Any] | None = None,
                 offload_folder: str | None = None) -> None:
        super().__init__()
        if (model_config is None) == (hub_id is None):
            raise ValueError("give exactly one of model_config (train from scratch) or hub_id (from_pretrained)")
        if validation_output not in VALIDATION_OUTPUTS:
            raise ValueError(f"validation_output must be one of {list(VALIDATION_OUTPUTS)}, got {validation_output!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.save_hyperparameters()
        if hub_id is not None:
            from transformers import AutoModelForCausalLM

            placed = {"device_map": dict(device_map), "offload_folder": offload_folder} if device_map else {}
            self.model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=DTYPES[dtype],
                                                              **placed)
        else:
            self.model = build_gpt_neox(model_config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _shifted(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"][:, :-1])  # causal: the same as slicing the full output, but contiguous
        return logits, self._labels(batch)

    @staticmethod
    def _labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["input_ids"][:, 1:]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return labels

    def _hidden_states_and_loss(self, batch: Mapping[str, torch.Tensor]
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(last hidden states [B, T-1, H], labels, mean cross-entropy), the loss from blocks of logits."""
        hidden = self.model.base_model(input_ids=batch["input_ids"][:, :-1]).last_hidden_state
        head = self.model.get_output_embeddings()
        if head.weight.device.type != "meta":  # layers spread over devices: score where the unembedding lives
            hidden = hidden.to(head.weight.device)
        labels = self._labels(batch).to(hidden.device)
        flat_hidden, flat_labels = hidden.flatten(0, 1), labels.flatten()
        rows = max(1, _LOSS_BLOCK_ELEMENTS // head.weight.shape[0])
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, flat_labels.numel(), rows):
            logits = head(flat_hidden[start:start + rows]).float()
            total = total + F.cross_entropy(logits, flat_labels[start:start + rows], reduction="sum")
        return hidden, labels, total / (flat_labels != -100).sum()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, labels = self._shifted(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        if self.hparams.validation_output == "hidden_states":
            hidden, labels, loss = self._hidden_states_and_loss(batch)
            outputs = {"hidden_states": hidden, "labels": labels, "loss": loss}
        else:
            logits, labels = self._shifted(batch)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            outputs = {"logits": logits, "labels": labels, "loss": loss}
        if "instance_ids" in batch:  # the eval instance of each row, for the callback's bootstrap
            outputs["instance_ids"] = batch["instance_ids"]
        names = getattr(self.trainer.datamodule, "eval_names", None) if self._trainer is not None else None
        name = names[dataloader_idx] if names else f"val_{dataloader_idx}"
        # For the progress bar, the validate table and `monitor=`; loggers get it from CEDecompositionCallback,
        # in the row of the same validation (same step, once per step).
        self.log(f"val/loss/{name}", loss, add_dataloader_idx=False, sync_dist=True, batch_size=labels.numel(),
                 logger=False)
        return outputs

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # biases and norms: no decay
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
