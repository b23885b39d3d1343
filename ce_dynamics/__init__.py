"""ce-dynamics: what in cross-entropy is improving.

Token-level cross-entropy splits exactly into Error-Entropy, Self-Alignment and Confidence
(Yan et al., "What Scales in Cross-Entropy Scaling Law?", ICLR 2026).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CrossEntropyDecomposition", "CEDecompositionCallback", "__version__"]

if TYPE_CHECKING:
    from ce_dynamics.lightning.callback import CEDecompositionCallback
    from ce_dynamics.metric import CrossEntropyDecomposition


def __getattr__(name: str) -> Any:
    # Lazy, so `import ce_dynamics.functional` stays torch-only (no lightning, no wandb).
    if name == "CrossEntropyDecomposition":
        from ce_dynamics.metric import CrossEntropyDecomposition

        return CrossEntropyDecomposition
    if name == "CEDecompositionCallback":
        from ce_dynamics.lightning.callback import CEDecompositionCallback

        return CEDecompositionCallback
    raise AttributeError(f"module 'ce_dynamics' has no attribute {name!r}")
