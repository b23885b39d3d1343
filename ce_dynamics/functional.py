"""Pure tensor math of the cross-entropy decomposition (paper eqs. 1-8).

Two layers:

* per token: the rank of the right token (strict ``>``, 0-based, over the full logit width) and its
  log-score ``z_t - logsumexp(z)``; computed in token chunks that stay in cache, so no temporary of the
  logits' size is ever created;
* per corpus: Error-Entropy, Self-Alignment and Confidence from the accumulated state
  (``rank_counts``, ``rank_log_score_sum``), in float64 and in log space, with no epsilons, so that
  ``cross_entropy == error_entropy + self_alignment - confidence`` to float64 rounding.

This module imports only torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from ce_dynamics.from_hidden import token_ranks_and_log_scores_from_hidden  # noqa: F401  (re-exported)

KEYS = (
    "cross_entropy",
    "error_entropy",
    "self_alignment",
    "confidence",
    "accuracy",
    "mean_reciprocal_rank",
)

# Elements per chunk: ~2 MiB of float32 on CPU keeps a chunk in L2 across the passes over it; on an
# accelerator, large chunks amortise kernel launches.
_CPU_CHUNK_ELEMENTS = 2**19
_ACCEL_CHUNK_ELEMENTS = 2**26
_POOL: ThreadPoolExecutor | None = None
T = TypeVar("T")


def _check_inputs(logits: Tensor, target: Tensor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"Expected `logits` and `target` to be torch.Tensor, got {type(logits).__name__} and "
            f"{type(target).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(
            "Expected `logits` to be a floating point tensor (float16, bfloat16, float32 or float64) of shape "
            f"[..., V], got dtype {logits.dtype}."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"Expected `target` to be an integer tensor (e.g. int64) of shape [...], got dtype {target.dtype}.")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"Expected `logits` of shape [..., V] with V >= 1, got shape {tuple(logits.shape)}.")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            "Expected `logits.shape[:-1] == target.shape` (target at position t is the token predicted from the "
            f"logits at t), got logits {tuple(logits.shape)} and target {tuple(target.shape)}."
        )


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


def token_ranks_and_log_scores(logits: Tensor, target: Tensor, ignore_index: int = -100,
                               num_threads: int | None = None) -> tuple[Tensor, Tensor]:
    """Rank and log-score of the right token at every non-ignored position, flattened.

    Args:
        logits: ``[..., V]`` float (fp16, bf16, fp32, fp64); any layout.
        target: ``[...]`` integer, aligned with ``logits``; ``ignore_index`` positions are skipped.
        num_threads: CPU worker threads; None: ``torch.get_num_threads()``. 1 runs in the calling thread and
            leaves torch's thread setting alone (safe from a thread running beside torch's own work).

    Returns:
        ``ranks`` (int64 ``[M]``): ``#{v : z_v > z_target}``, and ``log_scores`` (float64 ``[M]``):
        ``z_target - logsumexp(z)`` computed in float32 (float64 for float64 logits).

    Raises:
        TypeError / ValueError: wrong dtypes or shapes, a target outside ``[0, V)`` that is not
            ``ignore_index``, or a non-finite log-score (NaN or +inf logits) at a non-ignored position.
    """
    _check_inputs(logits, target)
    logits = logits.detach()  # ranks and scores are not differentiable; `out=` ops refuse autograd inputs
    vocab_size = logits.shape[-1]
    lead_shape = target.shape
    device = logits.device
    flat_target = target.reshape(-1).to(device=device, dtype=torch.int64)
    valid = flat_target != ignore_index
    index = valid.nonzero().squeeze(1)
    num = index.numel()
    if num == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.float64, device=device)
    tokens = flat_target[index]
    out_of_range = (tokens < 0) | (tokens >= vocab_size)
    if bool(out_of_range.any()):
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"Expected target values in [0, {vocab_size}) or ignore_index={ignore_index}, got {int(tokens[first])} "
            f"at position {_position(int(index[first]), lead_shape)}."
        )

    try:
        rows = logits.view(-1, vocab_size)  # no copy when the leading dims are viewable

        def take(idx: Tensor) -> Tensor:
            return rows.index_select(0, idx)

        take_range = None if num != flat_target.numel() else lambda start, stop: rows[start:stop]
    except RuntimeError:  # e.g. logits[:, :-1] of a [B, T, V] output: gather each chunk's rows instead

        def take(idx: Tensor) -> Tensor:
            return logits[torch.unravel_index(idx, lead_shape)]

        take_range = None

    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ranks = torch.empty(num, dtype=torch.int64, device=device)
    log_scores = torch.empty(num, dtype=compute_dtype, device=device)
    on_cpu = device.type == "cpu"
    chunk_rows = max(1, (_CPU_CHUNK_ELEMENTS if on_cpu else _ACCEL_CHUNK_ELEMENTS) // vocab_size)

    # Comparisons land as 0.0/1.0 in a float buffer: its row sum is several times faster than a bool sum, and
    # exact (float64 accumulation past 2**24 columns).
    count_dtype = torch.float64 if vocab_size >= 2**24 else None
    upcast = logits.dtype != compute_dtype

    def run_block(lo: int, hi: int) -> None:
        shape = (min(chunk_rows, hi - lo), vocab_size)
        work = torch.empty(shape, dtype=compute_dtype, device=device)
        wide = torch.empty(shape, dtype=compute_dtype, device=device) if upcast else None
        for start in range(lo, hi, chunk_rows):
            stop = min(start + chunk_rows, hi)
            chunk = take_range(start, stop) if take_range is not None else take(index[start:stop])
            w = work[: stop - start]
            if wide is not None:  # fp16/bf16: upcast the chunk once (exact), then work in float32
                chunk = wide[: stop - start].copy_(chunk)
            target_column = tokens[start:stop, None]
            torch.gt(chunk, chunk.gather(1, target_column), out=w)
            ranks[start:stop] = w.sum(1, dtype=count_dtype)
            torch.log_softmax(chunk, 1, out=w)  # one fused pass: max, sum of exp, z - logsumexp(z)
            log_scores[start:stop] = w.gather(1, target_column).squeeze(1)

    workers = min(num_threads or torch.get_num_threads(), -(-num // chunk_rows)) if on_cpu else 1
    if workers <= 1:
        run_block(0, num)
    else:
        _run_in_threads(run_block, num, workers)

    finite = torch.isfinite(log_scores)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            "Expected finite logits at every non-ignored position, got a non-finite log-score "
            f"({float(log_scores[first])}) at position {_position(int(index[first]), lead_shape)}: the logits "
            "there hold NaN or +inf, or the target's logit is -inf."
        )
    return ranks, log_scores.to(torch.float64)


def accumulate_state(ranks: Tensor, log_scores: Tensor, rank_counts: Tensor, rank_log_score_sum: Tensor) -> None:
    """Add a batch's ranks and log-scores into per-rank state, in place: ``rank_counts`` (int64 ``[V]``)
    and ``rank_log_score_sum`` (float64 ``[V]``). No temporary of size ``V``."""
    rank_counts.index_add_(0, ranks, torch.ones_like(ranks))
    rank_log_score_sum.index_add_(0, ranks, log_scores)


def decomposition_from_state(rank_counts: Tensor, rank_log_score_sum: Tensor) -> dict[str, Tensor]:
    """Error-Entropy, Self-Alignment, Confidence and friends from accumulated per-rank state.

    Args:
        rank_counts: ``[V]`` non-negative integers, ``n_e``.
        rank_log_score_sum: ``[V]`` float, sum of ``log s_i`` over tokens of rank ``e``.

    Returns:
        A dict with 0-dim float64 ``cross_entropy``, ``error_entropy``, ``self_alignment``, ``confidence``,
        ``accuracy``, ``mean_reciprocal_rank``, 0-dim int64 ``num_tokens``, and float64 ``[V]`` ``p_e``,
        ``q_e`` (zero where ``n_e = 0``). With no tokens, the scalars are NaN and a warning is raised.
    """
    counts = torch.as_tensor(rank_counts)
    sums = torch.as_tensor(rank_log_score_sum)
    if counts.dim() != 1 or sums.shape != counts.shape:
        raise ValueError(
            "Expected `rank_counts` and `rank_log_score_sum` of the same shape [V], got "
            f"{tuple(counts.shape)} and {tuple(sums.shape)}."
        )
    if counts.is_floating_point() or counts.is_complex():
        raise TypeError(f"Expected integer `rank_counts`, got dtype {counts.dtype}.")
    counts = counts.to(torch.int64)
    sums = sums.to(device=counts.device, dtype=torch.float64)
    if bool((counts < 0).any()):
        raise ValueError("Expected non-negative `rank_counts`.")

    total = counts.sum()
    num_tokens = int(total)
    p_e = torch.zeros_like(sums)
    q_e = torch.zeros_like(sums)
    out: dict[str, Tensor] = {"num_tokens": total, "p_e": p_e, "q_e": q_e}
    if num_tokens == 0:
        warnings.warn("No tokens were accumulated: every decomposition value is NaN.", UserWarning, stacklevel=2)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=sums.device)
        out.update({key: nan.clone() for key in KEYS})
        return out

    seen = counts > 0
    n = counts[seen].to(torch.float64)
    log_n = n.log()
    log_total = math.log(num_tokens)
    log_p = log_n - log_total
    p = n / num_tokens
    log_big_q = sums[seen] / n  # log of the geometric mean of the scores, eq. 3
    confidence = torch.logsumexp(log_big_q, 0)  # log C, eq. 4
    log_q = log_big_q - confidence
    p_e[seen] = p
    q_e[seen] = log_q.exp()
    ranks = torch.arange(counts.numel(), dtype=torch.float64, device=sums.device)
    out.update(
        cross_entropy=-sums.sum() / num_tokens,
        error_entropy=-(p * log_p).sum(),
        self_alignment=(p * (log_p - log_q)).sum(),
        confidence=confidence,
        accuracy=p_e[0].clone(),
        mean_reciprocal_rank=(p_e / (ranks + 1)).sum(),
    )
    return out


def cross_entropy_decomposition(logits: Tensor, target: Tensor, ignore_index: int = -100) -> dict[str, Tensor]:
    """The decomposition of one batch, with no state: see :func:`decomposition_from_state`."""
    ranks, log_scores = token_ranks_and_log_scores(logits, target, ignore_index)
    rank_counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=ranks.device)
    rank_log_score_sum = torch.zeros(logits.shape[-1], dtype=torch.float64, device=ranks.device)
    accumulate_state(ranks, log_scores, rank_counts, rank_log_score_sum)
    return decomposition_from_state(rank_counts, rank_log_score_sum)
