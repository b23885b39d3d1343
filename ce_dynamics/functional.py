"""Pure tensor math of the cross-entropy decomposition (paper eqs. 1-8).

Two layers:

* per token: the rank of the right token (strict ``>``, 0-based, over the full logit width) and its
  log-score ``z_t - logsumexp(z)``; the torch backend computes them in token chunks that stay in cache, so no
  temporary of the logits' size is ever created; the Triton backend (``ce_dynamics.kernels``, imported
  lazily) reads each row once. Without ``validate_args`` nothing here reads a value back to the host off CPU;
* per corpus: Error-Entropy, Self-Alignment and Confidence from the accumulated state
  (``rank_counts``, ``rank_log_score_sum``), in float64 and in log space, with no epsilons, so that
  ``cross_entropy == error_entropy + self_alignment - confidence`` to float64 rounding.

This module imports only torch (and ``ce_dynamics.kernels``, which imports triton only when it runs).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ce_dynamics import kernels
from ce_dynamics._rows import _position, _run_in_threads, _score_rows
from ce_dynamics.from_hidden import token_ranks_and_log_scores_from_hidden  # noqa: F401  (re-exported)

KEYS = (
    "cross_entropy",
    "error_entropy",
    "self_alignment",
    "confidence",
    "accuracy",
    "mean_reciprocal_rank",
)
BACKENDS = ("auto", "torch", "triton")

# Elements per chunk: ~2 MiB of float32 on CPU keeps a chunk in L2 across the passes over it; on an
# accelerator, large chunks amortise kernel launches.
_CPU_CHUNK_ELEMENTS = 2**19
_ACCEL_CHUNK_ELEMENTS = 2**26
# Devices where the torch backend computes only the counted rows (finding them reads the target on the host:
# free on CPU, a synchronisation elsewhere).
_COMPACT_DEVICE_TYPES = ("cpu",)


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


def _resolve_backend(backend: str, logits: Tensor) -> str:
    """The backend that runs: ``"torch"`` or ``"triton"`` (see :func:`token_ranks_and_log_scores`)."""
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {BACKENDS}, got {backend!r}.")
    if logits.dtype == torch.float64:
        return "torch"  # the kernel accumulates in float32; float64 input asks for float64 math
    if backend == "auto":
        return "triton" if logits.device.type == "cuda" and kernels.triton_available() else "torch"
    return backend


class TokenPass(NamedTuple):
    """Per-row results of one pass, before they are checked or accumulated.

    ``ranks`` (int64) and ``log_scores`` (float32, float64 for float64 logits) have one entry per row that was
    computed: the counted rows only (``counted`` None, ``positions`` their flat positions), or every row
    (``counted`` the bool mask of rows to count, ``positions`` None). ``out_of_range``: int64 0-dim count of
    non-ignored targets outside ``[0, V)``, which are never counted.
    """

    ranks: Tensor
    log_scores: Tensor
    counted: Tensor | None
    positions: Tensor | None
    out_of_range: Tensor
    lead_shape: torch.Size


def token_pass(logits: Tensor, target: Tensor, ignore_index: int = -100, num_threads: int | None = None,
               backend: str = "auto", validate_args: bool = True) -> TokenPass:
    """Ranks and log-scores of one batch, as :class:`TokenPass`.

    With ``validate_args`` a target outside ``[0, V)`` raises (a host synchronisation). Without it nothing
    here synchronises with the host on an accelerator: every row is computed and the mask says which count.
    On CPU the torch backend computes the counted rows only (finding them costs no synchronisation there).
    """
    _check_inputs(logits, target)
    logits = logits.detach()  # ranks and scores are not differentiable; `out=` ops refuse autograd inputs
    vocab_size = logits.shape[-1]
    lead_shape = target.shape
    device = logits.device
    chosen = _resolve_backend(backend, logits)
    flat_target = target.reshape(-1).to(device=device, dtype=torch.int64)
    kept = flat_target != ignore_index
    in_range = (flat_target >= 0) & (flat_target < vocab_size)
    outside = kept & ~in_range
    if validate_args and flat_target.numel() and bool(outside.any()):
        first = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"Expected target values in [0, {vocab_size}) or ignore_index={ignore_index}, got "
            f"{int(flat_target[first])} at position {_position(first, lead_shape)}."
        )
    out_of_range = outside.sum()
    counted = kept & in_range
    if chosen == "triton":
        ranks, log_scores = kernels.ranks_and_log_scores_triton(logits, flat_target, ignore_index)
        return TokenPass(ranks, log_scores, counted, None, out_of_range, lead_shape)
    if device.type in _COMPACT_DEVICE_TYPES:
        index = counted.nonzero().squeeze(1)
        ranks, log_scores = _torch_pass(logits, flat_target[index], index, num_threads, lead_shape)
        return TokenPass(ranks, log_scores, None, index, out_of_range, lead_shape)
    # Accelerators: every row, ignored ones against column 0, so that no row count has to reach the host.
    ranks, log_scores = _torch_pass(logits, flat_target.where(counted, 0), None, num_threads, lead_shape)
    return TokenPass(ranks, log_scores, counted, None, out_of_range, lead_shape)


def _torch_pass(logits: Tensor, tokens: Tensor, index: Tensor | None, num_threads: int | None,
                lead_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Chunked torch computation over the rows ``index`` (flat positions; None: every row, in order)."""
    vocab_size = logits.shape[-1]
    device = logits.device
    num = tokens.numel()
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ranks = torch.empty(num, dtype=torch.int64, device=device)
    log_scores = torch.empty(num, dtype=compute_dtype, device=device)
    if num == 0:
        return ranks, log_scores
    try:
        rows = logits.view(-1, vocab_size)  # no copy when the leading dims are viewable

        def take(lo: int, hi: int) -> Tensor:
            return rows[lo:hi] if index is None else rows.index_select(0, index[lo:hi])

        if index is not None and num == rows.shape[0]:  # every row counted: contiguous slices, no gather
            index = None
    except RuntimeError:  # e.g. logits[:, :-1] of a [B, T, V] output: gather each chunk's rows instead

        def take(lo: int, hi: int) -> Tensor:
            idx = torch.arange(lo, hi, device=device) if index is None else index[lo:hi]
            return logits[torch.unravel_index(idx, lead_shape)]

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
            chunk = take(start, stop)
            w = work[: stop - start]
            if wide is not None:  # fp16/bf16: upcast the chunk once (exact), then work in float32
                chunk = wide[: stop - start].copy_(chunk)
            ranks[start:stop], log_scores[start:stop] = _score_rows(chunk, tokens[start:stop, None], w, count_dtype)

    workers = min(num_threads or torch.get_num_threads(), -(-num // chunk_rows)) if on_cpu else 1
    if workers <= 1:
        run_block(0, num)
    else:
        _run_in_threads(run_block, num, workers)
    return ranks, log_scores


def raise_if_nonfinite(tokens: TokenPass) -> None:
    """ValueError naming the first counted position whose log-score is not finite (a host synchronisation)."""
    bad = ~torch.isfinite(tokens.log_scores)
    if tokens.counted is not None:
        bad &= tokens.counted
    if bad.numel() == 0 or not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    position = first if tokens.positions is None else int(tokens.positions[first])
    raise ValueError(
        "Expected finite logits at every non-ignored position, got a non-finite log-score "
        f"({float(tokens.log_scores[first])}) at position {_position(position, tokens.lead_shape)}: the logits "
        "there hold NaN or +inf, or the target's logit is -inf."
    )


def token_ranks_and_log_scores(logits: Tensor, target: Tensor, ignore_index: int = -100,
                               num_threads: int | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rank and log-score of the right token at every non-ignored position, flattened.

    Args:
        logits: ``[..., V]`` float (fp16, bf16, fp32, fp64); any layout (a strided view is not copied).
        target: ``[...]`` integer, aligned with ``logits``; ``ignore_index`` positions are skipped.
        num_threads: CPU worker threads; None: ``torch.get_num_threads()``. 1 runs in the calling thread and
            leaves torch's thread setting alone (safe from a thread running beside torch's own work).
        backend: ``"torch"`` (chunked torch ops, any device), ``"triton"`` (one fused read of every row: CUDA
            tensors, or CPU tensors under ``TRITON_INTERPRET=1``), or ``"auto"``: Triton for CUDA tensors when
            it imports, else torch. float64 logits always take torch.

    Returns:
        ``ranks`` (int64 ``[M]``): ``#{v : z_v > z_target}``, and ``log_scores`` (float64 ``[M]``):
        ``z_target - logsumexp(z)`` computed in float32 (float64 for float64 logits).

    Raises:
        TypeError / ValueError: wrong dtypes or shapes, an unknown backend, a target outside ``[0, V)`` that is
            not ``ignore_index``, or a non-finite log-score (NaN or +inf logits) at a non-ignored position.
    """
    tokens = token_pass(logits, target, ignore_index, num_threads, backend, validate_args=True)
    raise_if_nonfinite(tokens)
    ranks, log_scores = tokens.ranks, tokens.log_scores
    if tokens.counted is not None:
        ranks, log_scores = ranks[tokens.counted], log_scores[tokens.counted]
    return ranks, log_scores.to(torch.float64)


def accumulate_state(ranks: Tensor, log_scores: Tensor, rank_counts: Tensor, rank_log_score_sum: Tensor) -> None:
    """Add a batch's ranks and log-scores into per-rank state, in place: ``rank_counts`` (int64 ``[V]``)
    and ``rank_log_score_sum`` (float64 ``[V]``). No temporary of size ``V``."""
    rank_counts.index_add_(0, ranks, torch.ones_like(ranks))
    rank_log_score_sum.index_add_(0, ranks, log_scores)


def accumulate_tokens(tokens: TokenPass, rank_counts: Tensor, rank_log_score_sum: Tensor) -> Tensor:
    """Add the counted rows with a finite log-score into the state (in place, on the state's device) and return
    how many counted rows were left out as non-finite (int64 0-dim). No host synchronisation off CPU."""
    device = rank_counts.device
    ranks = tokens.ranks.to(device)
    log_scores = tokens.log_scores.to(device=device, dtype=torch.float64)
    finite = torch.isfinite(log_scores)
    use = finite if tokens.counted is None else finite & tokens.counted.to(device)
    if device.type == "cpu" and tokens.counted is None and bool(finite.all()):
        accumulate_state(ranks, log_scores, rank_counts, rank_log_score_sum)  # the usual case, no masking
        return torch.zeros((), dtype=torch.int64, device=device)
    ranks = ranks.where(use, 0)  # left-out rows add 0 at rank 0
    rank_counts.index_add_(0, ranks, use.to(torch.int64))
    rank_log_score_sum.index_add_(0, ranks, log_scores.where(use, 0.0))
    left_out = ~finite if tokens.counted is None else ~finite & tokens.counted.to(device)
    return left_out.sum()


def decomposition_from_state(rank_counts: Tensor, rank_log_score_sum: Tensor,
                             nonfinite_tokens: int | Tensor = 0) -> dict[str, Tensor]:
    """Error-Entropy, Self-Alignment, Confidence and friends from accumulated per-rank state.

    Args:
        rank_counts: ``[V]`` non-negative integers, ``n_e``.
        rank_log_score_sum: ``[V]`` float, sum of ``log s_i`` over tokens of rank ``e``.
        nonfinite_tokens: how many tokens were left out of the state for a non-finite log-score (the metric's
            ``nan_strategy="ignore"``); passed through as ``nonfinite_tokens`` so that saved state gives back the
            whole dict.

    Returns:
        A dict with 0-dim float64 ``cross_entropy``, ``error_entropy``, ``self_alignment``, ``confidence``,
        ``accuracy``, ``mean_reciprocal_rank``, 0-dim int64 ``num_tokens`` and ``nonfinite_tokens``, and
        float64 ``[V]`` ``p_e``, ``q_e`` (zero where ``n_e = 0``). With no tokens, the scalars are NaN and a
        warning is raised.
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

    left_out = torch.as_tensor(nonfinite_tokens)
    if left_out.dim() != 0 or left_out.is_floating_point() or left_out.is_complex() or left_out.dtype == torch.bool:
        raise TypeError(f"Expected `nonfinite_tokens` to be an integer scalar, got {nonfinite_tokens!r}.")
    left_out = left_out.to(device=counts.device, dtype=torch.int64)
    if int(left_out) < 0:
        raise ValueError(f"Expected a non-negative `nonfinite_tokens`, got {int(left_out)}.")

    total = counts.sum()
    num_tokens = int(total)
    p_e = torch.zeros_like(sums)
    q_e = torch.zeros_like(sums)
    out: dict[str, Tensor] = {"num_tokens": total, "nonfinite_tokens": left_out, "p_e": p_e, "q_e": q_e}
    if num_tokens == 0:
        note = f" ({int(left_out)} non-finite tokens were left out)" if int(left_out) else ""
        warnings.warn(f"No tokens were accumulated{note}: every decomposition value is NaN.", UserWarning,
                      stacklevel=2)
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


def cross_entropy_decomposition(logits: Tensor, target: Tensor, ignore_index: int = -100,
                                backend: str = "auto") -> dict[str, Tensor]:
    """The decomposition of one batch, with no state: see :func:`decomposition_from_state`."""
    ranks, log_scores = token_ranks_and_log_scores(logits, target, ignore_index, backend=backend)
    rank_counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=ranks.device)
    rank_log_score_sum = torch.zeros(logits.shape[-1], dtype=torch.float64, device=ranks.device)
    accumulate_state(ranks, log_scores, rank_counts, rank_log_score_sum)
    return decomposition_from_state(rank_counts, rank_log_score_sum)
