"""Ranks and log-scores from hidden states and the unembedding, without building the logits.

``token_ranks_and_log_scores_from_hidden(hidden, weight, target, bias)`` gives what
``token_ranks_and_log_scores(hidden @ weight.T + bias, target)`` gives (up to matmul rounding), while only a
block of ``rows x V`` logits exists at a time (per worker thread): the ``N x V`` logits of a large-vocabulary
model are never built. Each block's target logit is read from that same block, so a rank is always counted
against the value the comparison sees (no flips on near-ties from two differently rounded products).

This module imports only torch (and the row scoring it shares with ``functional``, in ``_rows``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ce_dynamics._rows import _position, _run_in_threads, _score_rows

# Logits per block: the matmul gets enough rows (~80 at V = 50k) to run at full speed, while the block and its
# work buffer stay 32 MiB (fp32, CPU) per worker; on an accelerator, large blocks amortise kernel launches.
_CPU_BLOCK_ELEMENTS = 2**22
_ACCEL_BLOCK_ELEMENTS = 2**26


def _check_hidden_inputs(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> None:
    named = {"hidden": hidden, "weight": weight, "target": target}
    if bias is not None:
        named["bias"] = bias
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}.")
    if not hidden.is_floating_point():
        raise TypeError(f"Expected `hidden` to be a floating point tensor of shape [..., H], got dtype {hidden.dtype}.")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"Expected `hidden` of shape [..., H] with H >= 1, got shape {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"Expected `weight` of shape [V, H] = [V, {hidden.shape[-1]}] (the unembedding, e.g. "
            f"`model.get_output_embeddings().weight`), got shape {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"Expected `bias` of shape [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}.")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and (value.dtype != hidden.dtype or value.device != hidden.device):
            raise ValueError(
                f"Expected `{name}` with the dtype and device of `hidden` ({hidden.dtype}, {hidden.device}), got "
                f"{value.dtype}, {value.device}: cast it (the logits would be `hidden @ weight.T` in one dtype)."
            )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"Expected `target` to be an integer tensor (e.g. int64) of shape [...], got dtype {target.dtype}.")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(
            "Expected `hidden.shape[:-1] == target.shape` (target at position t is the token predicted from the "
            f"hidden state at t), got hidden {tuple(hidden.shape)} and target {tuple(target.shape)}."
        )


def token_ranks_and_log_scores_from_hidden(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                                           ignore_index: int = -100, num_threads: int | None = None,
                                           block_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Rank and log-score of the right token at every non-ignored position, from hidden states.

    Args:
        hidden: ``[..., H]`` float (fp16, bf16, fp32, fp64), the last hidden states (after the final norm).
        weight: ``[V, H]``, the unembedding, same dtype and device as ``hidden``.
        target: ``[...]`` integer, aligned with ``hidden``; ``ignore_index`` positions are skipped.
        bias: optional ``[V]`` output bias.
        num_threads: CPU worker threads; None: ``torch.get_num_threads()``.
        block_rows: tokens per block of logits; None: about 16 MiB of fp32 logits per block and worker on CPU.

    Returns:
        ``ranks`` (int64 ``[M]``) and ``log_scores`` (float64 ``[M]``), as
        :func:`ce_dynamics.functional.token_ranks_and_log_scores` on ``hidden @ weight.T + bias``: the product is
        rounded to ``hidden``'s dtype (as that expression would be), then scored in float32 (float64 for float64).

    Raises:
        TypeError / ValueError: wrong dtypes, shapes or devices, a target outside ``[0, V)`` that is not
            ``ignore_index``, or a non-finite log-score at a non-ignored position.
    """
    _check_hidden_inputs(hidden, weight, target, bias)
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"Expected `block_rows` to be None or a positive int, got {block_rows!r}.")
    hidden, weight = hidden.detach(), weight.detach()
    bias = bias.detach() if bias is not None else None
    vocab_size, width = weight.shape
    lead_shape = target.shape
    device = hidden.device
    flat_target = target.reshape(-1).to(device=device, dtype=torch.int64)
    index = (flat_target != ignore_index).nonzero().squeeze(1)
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
    rows = hidden.reshape(-1, width)
    if num != rows.shape[0]:
        rows = rows.index_select(0, index)  # [M, H]: small next to any [M, V]
    weight_t = weight.t()

    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    upcast = hidden.dtype != compute_dtype
    on_cpu = device.type == "cpu"
    if block_rows is None:
        block_rows = max(1, (_CPU_BLOCK_ELEMENTS if on_cpu else _ACCEL_BLOCK_ELEMENTS) // vocab_size)
    ranks = torch.empty(num, dtype=torch.int64, device=device)
    log_scores = torch.empty(num, dtype=compute_dtype, device=device)
    count_dtype = torch.float64 if vocab_size >= 2**24 else None

    def run_block(lo: int, hi: int) -> None:
        shape = (min(block_rows, hi - lo), vocab_size)
        product = torch.empty(shape, dtype=hidden.dtype, device=device)
        work = torch.empty(shape, dtype=compute_dtype, device=device)
        wide = torch.empty(shape, dtype=compute_dtype, device=device) if upcast else None
        for start in range(lo, hi, block_rows):
            stop = min(start + block_rows, hi)
            z = torch.mm(rows[start:stop], weight_t, out=product[: stop - start])
            if bias is not None:
                z.add_(bias)  # rounded after the product, as `hidden @ weight.T + bias` is
            if wide is not None:  # fp16/bf16 logits: upcast once (exact), then score in float32
                z = wide[: stop - start].copy_(z)
            w = work[: stop - start]
            # ranked against the target logit of this very block
            ranks[start:stop], log_scores[start:stop] = _score_rows(z, tokens[start:stop, None], w, count_dtype)

    workers = min(num_threads or torch.get_num_threads(), -(-num // block_rows)) if on_cpu else 1
    if workers <= 1:
        run_block(0, num)
    else:
        _run_in_threads(run_block, num, workers)

    finite = torch.isfinite(log_scores)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            "Expected finite logits `hidden @ weight.T + bias` at every non-ignored position, got a non-finite "
            f"log-score ({float(log_scores[first])}) at position {_position(int(index[first]), lead_shape)}."
        )
    return ranks, log_scores.to(torch.float64)
