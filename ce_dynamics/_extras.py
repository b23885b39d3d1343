"""Optional dependencies: a missing one raises an ImportError naming the extra that installs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
            clone = _source_checkout()
            where = f" (in this clone: pip install -e '{clone}[{extra}]', or make run)" if clone else ""
            raise ImportError(
                f"{name!r} is not installed; it comes with the [{extra}] extra: pip install 'ce-dynamics[{extra}]'"
                f"{where} (or [all] for everything). Only the metric and functional API work without it."
            )


def _source_checkout() -> str | None:
    """The clone this package is imported from (a pyproject.toml beside it), as a path to type; None when
    installed from a wheel."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return None
    try:
        return str(root.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(root)

