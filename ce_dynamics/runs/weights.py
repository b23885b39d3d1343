"""Where a replayed model's weights live (`replay.weights`).

* `whole` (default): every process loads the whole model and Lightning puts it on its device; with several
  devices, `trainer.devices=N trainer.strategy=ddp` splits the eval instances (data parallel).
* `device_map`: one process; the model's layers are spread over the devices at hand, then CPU RAM, then disk
  (accelerate's big-model loading, `from_pretrained(device_map=...)`), for models larger than one device. The
  map is computed here from the model's config on empty (meta) weights, with `replay.max_memory` per device,
  and keeps the unembedding on a device, because the rows are scored from the last hidden states against it
  (`model.validation_output=hidden_states`: the `N x V` logits are never built). Activations cross devices
  layer by layer (a pipeline without overlap: one device works at a time).

Lightning's FSDP strategy would shard the weights over data-parallel processes instead, but it refuses the CPU
(lightning 2.6: "The strategy `fsdp` requires a GPU accelerator"), so it cannot be tested here and is not offered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("lightning", "transformers")

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

DeviceMap = dict[str, Any]  # module name -> GPU index, "cpu" or "disk" (accelerate's convention)


def max_memory(value: Mapping[Any, Any] | None) -> dict[Any, Any] | None:
    """`replay.max_memory` in accelerate's form: GPU indices as ints, `cpu` as is, sizes as given."""
    if value is None:
        return None
    return {int(k) if str(k).isdigit() else str(k): v for k, v in dict(value).items()}


def empty_model(hub_id: str, revision: str | None, dtype: torch.dtype) -> Any:
    """The model of `hub_id`'s config.json with its weights on the meta device: sizes, names and no bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hub_id, revision=revision)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _placed(device_map: Mapping[str, Any], name: str) -> tuple[str, Any]:
    """(key, device) of the entry of `device_map` that holds module `name`."""
    for key in sorted(device_map, key=len, reverse=True):
        if key == "" or name == key or name.startswith(key + "."):
            return key, device_map[key]
    raise ValueError(f"the device map places no module holding {name!r}")


def plan_device_map(model: torch.nn.Module, memory: Mapping[Any, Any] | None) -> DeviceMap:
    """accelerate's map for `model` (meta weights) under `memory`, the unembedding moved off the disk."""
    from accelerate import infer_auto_device_map

    device_map = dict(infer_auto_device_map(model, max_memory=max_memory(memory),
                                            no_split_module_classes=list(model._no_split_modules or []),
                                            dtype=next(model.parameters()).dtype))
    head = _module_name(model, model.get_output_embeddings())
    key, device = _placed(device_map, head)
    if device == "disk":
        if key != head:
            raise ValueError(f"the unembedding {head!r} would be offloaded to disk with {key!r}; give it more device "
                             "memory (replay.max_memory)")
        devices = [d for d in device_map.values() if d != "disk"]
        device_map[head] = devices[0] if devices else "cpu"
    return device_map


def describe(device_map: Mapping[str, Any]) -> str:
    """`cpu: gpt_neox.embed_in, gpt_neox.layers.0; disk: gpt_neox.layers.1` (devices in first-use order)."""
    by_device: dict[str, list[str]] = {}
    for name, device in device_map.items():
        by_device.setdefault(str(device), []).append(name or "(whole model)")
    return "; ".join(f"{device}: {', '.join(names)}" for device, names in by_device.items())


def root_device(model: torch.nn.Module, device_map: Mapping[str, Any]) -> torch.device:
    """The device of the input embeddings: where a batch goes in."""
    _, device = _placed(device_map, _module_name(model, model.get_input_embeddings()))
    return torch.device("cuda", device) if isinstance(device, int) else torch.device("cpu")


def placement(hub_id: str, revision: str, dtype: torch.dtype, memory: Mapping[Any, Any] | None,
              offload_dir: str | Path) -> tuple[dict[str, Any], torch.device]:
    """(`from_pretrained` keyword arguments spreading the model, the device batches go to)."""
    model = empty_model(hub_id, revision, dtype)
    device_map = plan_device_map(model, memory)
    return {"device_map": device_map, "offload_folder": str(offload_dir)}, root_device(model, device_map)


def offload_folder(cfg: Any, model: str, revision: str) -> Path:
    """A folder for one revision's disk-offloaded layers: `replay.offload_dir` (default `output_dir/offload`)
    `/<model>--<revision>`, removed once the revision is evaluated."""
    root = Path(cfg.replay.offload_dir or Path(cfg.output_dir) / "offload")
    return root / re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}--{revision}")


class DispatchedStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy for a model whose weights accelerate has already placed: batches go to
    the input embeddings' device, and the model is not moved (a `.to(device)` would pull every layer, and the
    disk-offloaded ones cannot move at all), neither in nor back to the CPU at the end."""

    def model_to_device(self) -> None:
        pass

    def teardown(self) -> None:  # Strategy.teardown less its `lightning_module.cpu()` (no optimizers in replay)
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def weights_problem(cfg: Any) -> str | None:
    """Why `replay.weights` cannot go with the rest of `cfg` (None if it can)."""
    if cfg.replay.weights == "whole":
        return None
    if cfg.replay.checkpoints:
        return (f"replay.weights={cfg.replay.weights} loads hub models (from_pretrained); replay.checkpoints "
                "holds Lightning .ckpt files: use replay.weights=whole")
    if cfg.trainer.devices not in (1, "1") or cfg.trainer.num_nodes != 1:
        return (f"replay.weights={cfg.replay.weights} runs one process that spreads one model over the devices; "
                f"trainer.devices={cfg.trainer.devices} trainer.num_nodes={cfg.trainer.num_nodes} would start "
                "several: drop them (data-parallel replay is replay.weights=whole trainer.strategy=ddp)")
    return None


def spread_kwargs(cfg: Any, hub_id: str, revision: str) -> tuple[Any, dict[str, Any]]:
    """(the config to build the module from, `from_pretrained` placement keywords) for one revision: `cfg` and
    nothing for `whole`; for `device_map`, hidden-states validation and accelerate's map (printed)."""
    import copy
    import sys

    from ce_dynamics.runs.module import DTYPES

    if cfg.replay.weights == "whole":
        return cfg, {}
    placed, _ = placement(hub_id, revision, DTYPES[cfg.replay.dtype], cfg.replay.max_memory,
                          offload_folder(cfg, hub_id, revision))
    print(f"replay: {hub_id} {revision} spread over {describe(placed['device_map'])}", file=sys.stderr)
    load_cfg = copy.deepcopy(cfg)
    load_cfg.model.validation_output = "hidden_states"  # never the N x V logits
    return load_cfg, placed


def trainer_overrides(module: Any) -> dict[str, Any]:
    """Trainer arguments for a module: none when whole; a strategy that leaves accelerate's placement alone."""
    device_map = getattr(module.model, "hf_device_map", None)
    if not device_map:
        return {}
    device = root_device(module.model, device_map)
    return {"strategy": DispatchedStrategy(device=device), "devices": 1,
            "accelerator": "cuda" if device.type == "cuda" else "cpu"}


def remove_offload(cfg: Any, hub_id: str, revision: str) -> None:
    """Delete one revision's disk-offloaded layers once it is evaluated."""
    import shutil

    folder = offload_folder(cfg, hub_id, revision)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the default root, once empty
    except OSError:
        pass
