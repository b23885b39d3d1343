"""Optional dependencies: a missing one raises an ImportError naming the extra that installs it."""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "lightning": "lightning",
    "wandb": "lightning",
    "matplotlib": "lightning",
    "transformers": "train",
    "tokenizers": "train",
    "accelerate": "train",
    "omegaconf": "train",
    "tqdm": "train",
    "datasets": "train",
}


def require(*modules: str) -> None:
    """Check that each of ``modules`` is installed, or raise ImportError: ``pip install 'ce-dynamics[<extra>]'``.

    Called at the top of the modules that need an extra, so ``import ce_dynamics.lightning.callback`` without lightning
    says what to install instead of only "No module named 'lightning'".
    """
    for name in modules:
        if importlib.util.find_spec(name) is None:  # finds without importing: wandb/transformers import slowly
            extra = EXTRAS.get(name, "all")
            raise ImportError(
                f"{name!r} is not installed; it comes with the [{extra}] extra: pip install 'ce-dynamics[{extra}]' "
                f"(or 'ce-dynamics[all]' for everything). Only the metric and functional API work without it."
            )

