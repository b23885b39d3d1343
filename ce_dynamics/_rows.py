"""Per-row scoring and its thread dispatch, shared by ``functional`` (logits) and ``from_hidden`` (blocks of
logits built from hidden states): one home below both, so neither imports the other's internals."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

_POOL: ThreadPoolExecutor | None = None
T = TypeVar("T")


def _position(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape)) if len(shape) else ()


def in_callers_inference_mode(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, to be run in another thread under the calling thread's inference mode (a thread-local setting:
    Lightning's validation runs under it, a worker thread would not)."""
    inference = torch.is_inference_mode_enabled()

    def run(*args: Any, **kwargs: Any) -> T:
        with torch.inference_mode(inference):
            return fn(*args, **kwargs)

    return run


def _score_rows(z: Tensor, target_column: Tensor, work: Tensor,
                count_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Strict rank (``#{v : z_v > z_target}``) and log-score of each row's target, through the buffer ``work``
    (``z``'s shape): the compare lands as 0.0/1.0 there, then one fused log_softmax overwrites it."""
    torch.gt(z, z.gather(1, target_column), out=work)
    ranks = work.sum(1, dtype=count_dtype)
    torch.log_softmax(z, 1, out=work)  # one fused pass: max, sum of exp, z - logsumexp(z)
    return ranks, work.gather(1, target_column).squeeze(1)


def _run_in_threads(run_block: Callable[[int, int], None], num: int, workers: int) -> None:
    """Split ``[0, num)`` into contiguous blocks, one per worker thread, each running single-threaded ops.

    Small chunk ops are cheap but many; with ATen's intra-op pool every one of them is a fork-join across
    cores, which costs more than the op itself as soon as another process competes for the cores. Whole blocks
    per thread need no joins until the end (torch ops release the GIL).
    """
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ce_dynamics")
    bounds = [num * i // workers for i in range(workers + 1)]
    run_in_callers_mode = in_callers_inference_mode(run_block)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_POOL.submit(run_in_callers_mode, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)
