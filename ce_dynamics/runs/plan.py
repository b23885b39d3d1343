"""The plan of a replay before the work (`replay.dry_run=true`): the rows left to do, what must be downloaded,
the memory per device, the strategy for this machine and a time estimate. No weights are downloaded.

Where each figure comes from is printed beside it:
* parameters: the model's `config.json` on empty (meta) weights (cached, or fetched when online: a few kB), else
  an estimate from the model's name (`pythia-160m` -> 160M; a table for names without a size);
* download: the hub's file sizes when online, the local cache when the revision is there, else 2 bytes per
  parameter (the hub's fp16/bf16 files; fp32 repositories are twice that);
* time: eval tokens x 2 x parameters FLOPs (the forward pass) at a FLOP/s measured here on a few batches of a
  random Pythia-14M-shaped model with the decomposition (or given by the caller, e.g. the benchmark's figure for
  a GPU node). Small models use a device less well than large ones, so the estimate errs long.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

GB = 1e9
HEADROOM = 1.2  # weights x this: activations, the metric's buffers and the allocator's slack
# Total parameters (embeddings included) of released models whose names carry no size (their model cards).
KNOWN_PARAMS = {"openai-gpt": 117e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
                "distilgpt2": 82e6}
_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([mb])(?![a-z])")


@dataclass(frozen=True)
class Hardware:
    """The devices a replay would use: `count` x `memory` bytes of `kind` (`cuda` or `cpu`), each doing `flops`
    FLOP/s of replay (forward + decomposition), `flops_source` saying where that figure comes from."""

    kind: str
    count: int
    memory: float
    flops: float
    flops_source: str

    def describe(self) -> str:
        what = f"{self.count} x {self.kind.upper()} ({self.memory / GB:.0f} GB each)" if self.kind == "cuda" \
            else f"the CPU ({self.memory / GB:.0f} GB RAM)"
        return f"{what}, {self.flops / 1e9:,.0f} GFLOP/s of replay per device ({self.flops_source})"


@dataclass
class ModelPlan:
    model: str
    params: float
    params_source: str
    rows_left: list[tuple[str, str]] = field(default_factory=list)  # (revision, dataset)
    download: float = 0.0
    download_source: str = ""
    weight_bytes: float = 0.0
    strategy: str = ""
    memory_per_device: float = 0.0
    seconds: float = 0.0


def params_from_name(model: str) -> float | None:
    """Nominal total parameters from a hub id: `EleutherAI/pythia-1.4b` -> 1.4e9; the table for `gpt2` & co."""
    name = model.rsplit("/", 1)[-1].lower()
    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name]
    sizes = _SIZE.findall(name)
    if not sizes:
        return None
    number, unit = sizes[-1]
    return float(number) * (1e6 if unit == "m" else 1e9)


def model_params(model: str, revision: str, dtype: str) -> tuple[float, str]:
    """(total parameters, where the figure comes from), without downloading weights."""
    import torch

    try:
        from ce_dynamics.runs.weights import empty_model

        empty = empty_model(model, revision, getattr(torch, dtype))
        return float(sum(p.numel() for p in empty.parameters())), "config.json"
    except Exception:  # noqa: BLE001 - offline and not cached, gated, or not a causal LM: fall back to the name
        guess = params_from_name(model)
        if guess is None:
            raise ValueError(f"no parameter count for {model}: its config.json is not cached and its name has no "
                             "size; run once with network (the plan downloads only config.json)") from None
        return guess, "estimate from the name"


def download_size(model: str, revision: str, params: float) -> tuple[float, str]:
    """(bytes of weight files to fetch for one revision, where the figure comes from)."""
    import huggingface_hub.constants as hf

    cached = _cached_weight_bytes(model, revision)
    if cached:
        return 0.0, f"in the cache ({cached / GB:.2f} GB)"
    if not hf.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            files = HfApi().model_info(model, revision=revision, files_metadata=True).siblings or []
            sizes = _weights([(f.rfilename, f.size or 0) for f in files])
            if sizes:
                return float(sum(sizes)), "hub metadata"
        except Exception:  # noqa: BLE001 - gated or unreachable: estimate
            pass
    return 2.0 * params, "estimate: 2 bytes/param"


def _weights(files: Sequence[tuple[str, float]]) -> list[float]:
    """Sizes of the weight files from_pretrained reads: the safetensors if any, else the .bin files."""
    for suffix in (".safetensors", ".bin"):
        sizes = [size for name, size in files if name.endswith(suffix)]
        if sizes:
            return sizes
    return []


def _cached_weight_bytes(model: str, revision: str) -> float:
    from ce_dynamics.runs.revisions import repo_cache_dir

    repo = repo_cache_dir(model)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return 0.0
    files = [(p.name, p.stat().st_size) for p in snapshot.iterdir() if p.exists()]
    return float(sum(_weights(files)))


def this_machine(flops: float | None = None, flops_source: str = "given") -> Hardware:
    """The devices here (every GPU, else the CPU) and, unless given, the FLOP/s measured on them."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        kind, memory = "cuda", float(min(torch.cuda.get_device_properties(i).total_memory for i in range(count)))
    else:
        count, kind = 1, "cpu"
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if flops is None:
        flops, flops_source = measure_flops(torch.device("cuda" if kind == "cuda" else "cpu"))
    return Hardware(kind, count, memory, flops, flops_source)


def measure_flops(device: Any, batches: int = 3, batch_size: int = 2, seq_len: int = 256) -> tuple[float, str]:
    """FLOP/s of replay's work (forward to the last hidden states, then the decomposition from them against a
    50304-wide unembedding) on a random Pythia-14M-shaped model, counted as 2 x parameters per token."""
    import torch

    from ce_dynamics.metric import CrossEntropyDecomposition
    from ce_dynamics.runs.module import build_gpt_neox

    torch.manual_seed(0)
    model = build_gpt_neox(dict(vocab_size=50304, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                intermediate_size=512, max_position_embeddings=seq_len)).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    metric = CrossEntropyDecomposition(vocab_size=50304).to(device)
    ids = torch.randint(0, 50304, (batch_size, seq_len + 1), device=device)
    head = model.get_output_embeddings().weight
    elapsed = 0.0
    with torch.inference_mode():
        for i in range(batches + 1):  # the first is a warm-up
            start = time.perf_counter()
            hidden = model.base_model(input_ids=ids[:, :-1]).last_hidden_state
            metric.update_from_hidden(hidden, head, ids[:, 1:])
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += (time.perf_counter() - start) if i else 0.0
    tokens = batches * batch_size * seq_len
    return 2.0 * params * tokens / elapsed, (f"measured here: {tokens / elapsed:,.0f} tokens/s on a "
                                             f"{params / 1e6:.0f}M-parameter model, {device.type}")


def make_plan(cfg: DictConfig, checkpoints: Sequence[Any], hardware: Hardware) -> list[ModelPlan]:
    """One ModelPlan per model with rows left, in walk order."""
    from ce_dynamics.files import done_keys

    done = done_keys(Path(cfg.output_dir) / "results.jsonl")
    bytes_per_param = 2 if cfg.replay.dtype == "bfloat16" else 4
    tokens_per_row = cfg.data.eval_sequences * (cfg.data.seq_len - 1)
    plans: dict[str, ModelPlan] = {}
    for ckpt in checkpoints:
        names = [d for d in cfg.data.eval_sets if (ckpt.model, ckpt.revision, d) not in done]
        if not names:
            continue
        if ckpt.model not in plans:
            params, source = model_params(ckpt.model, ckpt.revision, cfg.replay.dtype) if ckpt.path is None else \
                (_checkpoint_params(ckpt.path), "checkpoint file")
            plans[ckpt.model] = ModelPlan(ckpt.model, params, source)
        plan = plans[ckpt.model]
        plan.rows_left += [(ckpt.revision, d) for d in names]
        if ckpt.path is None:
            size, plan.download_source = download_size(ckpt.model, ckpt.revision, plan.params)
            plan.download += size
    for plan in plans.values():
        plan.weight_bytes = plan.params * bytes_per_param
        need = plan.weight_bytes * HEADROOM
        flops = 2.0 * plan.params * tokens_per_row * len(plan.rows_left)
        if need <= hardware.memory:
            parallel = hardware.count
            plan.strategy = (f"whole, DDP over {hardware.count} (trainer.devices={hardware.count} "
                             "trainer.strategy=ddp)") if hardware.count > 1 else "whole, one device"
            plan.memory_per_device = need
        elif need <= hardware.memory * hardware.count:
            parallel = 1
            plan.strategy = f"replay.weights=device_map over {hardware.count} devices"
            plan.memory_per_device = need / hardware.count
        else:
            parallel = 1
            plan.strategy = "replay.weights=device_map, offloading to CPU RAM/disk (slow)"
            plan.memory_per_device = hardware.memory
        plan.seconds = flops / (hardware.flops * parallel)
    return list(plans.values())


def _checkpoint_params(path: Path) -> float:
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    return float(sum(t.numel() for t in state.values()))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(cfg: DictConfig, plans: Sequence[ModelPlan], hardware: Hardware, total_checkpoints: int) -> str:
    """The plan as text: one line per model, then totals and what to run."""
    rows = sum(len(p.rows_left) for p in plans)
    tokens = cfg.data.eval_sequences * (cfg.data.seq_len - 1)
    lines = [f"replay plan for {cfg.output_dir} ({cfg.replay.dtype}; {total_checkpoints} checkpoint(s) in this walk"
             + (f", shard {cfg.replay.shard}" if cfg.replay.shard else "") + f"; {rows} row(s) left to do)",
             f"machine: {hardware.describe()}",
             f"{'model':<34} {'params':>9} {'rows':>5} {'download':>10} {'mem/device':>10} {'time':>8}  strategy"]
    for p in plans:
        lines.append(f"{p.model:<34} {p.params / 1e9:>8.2f}B {len(p.rows_left):>5} {p.download / GB:>8.2f}GB "
                     f"{p.memory_per_device / GB:>8.2f}GB {_duration(p.seconds):>8}  {p.strategy}")
        lines.append(f"{'':<34} params: {p.params_source}; download: {p.download_source or 'checkpoint file'}; "
                     f"left: {', '.join(f'{r}/{d}' for r, d in p.rows_left[:6])}"
                     + (" ..." if len(p.rows_left) > 6 else ""))
    total = sum(p.seconds for p in plans)
    lines.append(f"total: {rows} row(s) x at most {tokens:,} tokens, {sum(p.download for p in plans) / GB:.1f} GB to "
                 f"download, about {_duration(total)} (estimate: 2 x params FLOPs per token at the rate above)")
    spread = [p.model for p in plans if "device_map" in p.strategy]
    if spread and len(spread) < len(plans):
        lines.append(f"run the models larger than one device as their own walk: replay.models=[{','.join(spread)}] "
                     "replay.weights=device_map; the others with the DDP settings above")
    return "\n".join(lines)


def print_plan(cfg: DictConfig, checkpoints: Sequence[Any], hardware: Hardware | None = None) -> int:
    """`replay.dry_run=true`: print the plan (rank zero only) and return 0; 2 when a model cannot be sized."""
    import sys

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return 0
    try:
        hardware = hardware or this_machine()
        plans = make_plan(cfg, checkpoints, hardware)
    except ValueError as err:
        print(f"replay: {err}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plans, hardware, len(checkpoints)))
    return 0
