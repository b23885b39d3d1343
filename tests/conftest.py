"""Session-wide test environment: no network, W&B offline, headless matplotlib."""

from __future__ import annotations

import os

# Set before torch/transformers/wandb are imported by any test module.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("CE_DYNAMICS_LAUNCHER", None)  # the hints' make form is tested where a test asks for it

# Triton decides at import whether its kernels are compiled or interpreted, and lightning/torch may import it
# early: without a GPU, the kernel tests (tests/test_kernels.py) run it in the interpreter on CPU tensors.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
