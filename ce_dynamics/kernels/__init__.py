"""Fused per-token kernels for accelerators (Triton), imported lazily.

Importing this package imports only torch: :func:`triton_available` tries ``import triton`` once, at its first
call, and the kernel module (``ce_dynamics.kernels.triton_rank``) is imported at its first use. Triton reads
``TRITON_INTERPRET`` when the kernel is defined, so set ``TRITON_INTERPRET=1`` before the first Triton call to
run the kernel on CPU tensors in Triton's interpreter (how the tests check it without a GPU).
"""

from __future__ import annotations

from functools import lru_cache

from torch import Tensor

__all__ = ["ranks_and_log_scores_triton", "triton_available"]


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds here (tried once, at the first call)."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or installed without a working backend: the torch path serves
        return False
    return True


def ranks_and_log_scores_triton(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Rank and float32 log-score of every row of ``logits`` ``[..., V]`` in one read of the logits.

    ``target`` is the flat int64 ``[N]`` target. Rows whose target is ``ignore_index`` or outside ``[0, V)``
    are skipped (rank 0, log-score 0). No host synchronisation. See :mod:`ce_dynamics.kernels.triton_rank`.
    """
    if not triton_available():
        raise ImportError(
            "backend='triton' needs the `triton` package (the [gpu] extra: `pip install 'ce-dynamics[gpu]'`, Linux); "
            "backend='torch' runs everywhere."
        )
    from ce_dynamics.kernels.triton_rank import launch

    return launch(logits, target, ignore_index)
