"""Triton kernel: strict rank and log-score of the right token, one read of each logit row.

One program per row. It loads the target's logit first, then streams the row in blocks, keeping a running
count of logits strictly above the target's, and an online max and sum of exponentials (rescaled when the max
grows) for ``logsumexp``; everything is accumulated in float32 whatever the input dtype (fp32, bf16, fp16).
Rows are addressed through their strides, so a ``logits[:, :-1]`` view is read in place, never copied.

Non-finite rows reproduce ``torch.log_softmax``: NaN or ``+inf`` anywhere in the row gives a NaN log-score, a
``-inf`` target logit gives ``-inf``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)  # the kernel below was defined for the interpreter

INT32_LIMIT = 2**31  # column offsets below it stay in int32 (tests lower it to check the int64 path)

# Elements per block load: 16 KiB of bf16 or 32 KiB of fp32 per step of the row. Tests lower it to cross many
# block boundaries on small rows.
MAX_BLOCK = 8192


@triton.jit
def _rank_log_score_kernel(
    logits_ptr,
    row_offsets_ptr,  # int64 [N] element offsets of each row; read only when USE_ROW_OFFSETS
    target_ptr,  # int64 [N]
    ranks_ptr,  # int64 [N], out
    scores_ptr,  # float32 [N], out
    vocab_size,
    inner_rows,  # rows are (outer, inner) pairs: offset = outer * outer_stride + inner * inner_stride
    outer_stride,
    inner_stride,
    col_stride,
    ignore_index,
    USE_ROW_OFFSETS: tl.constexpr,
    WIDE_COLUMNS: tl.constexpr,  # column offsets past int32: compute them in int64
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    counted = (target != ignore_index) & (target >= 0) & (target < vocab_size)
    rank = tl.zeros((), dtype=tl.int64)
    score = tl.zeros((), dtype=tl.float32)
    if counted:
        if USE_ROW_OFFSETS:
            row_start = tl.load(row_offsets_ptr + row)
        else:
            row_start = (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride
        row_ptr = logits_ptr + row_start
        z_target = tl.load(row_ptr + target * col_stride).to(tl.float32)
        running_max = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), dtype=tl.float32)
        above = tl.zeros((BLOCK,), dtype=tl.int32)  # per lane, summed once after the loop
        cols = tl.arange(0, BLOCK)
        for start in range(0, vocab_size, BLOCK):
            offsets = start + cols
            if WIDE_COLUMNS:
                column_offsets = offsets.to(tl.int64) * col_stride
            else:
                column_offsets = offsets * col_stride
            z = tl.load(row_ptr + column_offsets, mask=offsets < vocab_size, other=float("-inf"))
            z = z.to(tl.float32)
            above += (z > z_target).to(tl.int32)
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            # While every logit so far is -inf, exponentiate against 0 (exp(-inf - -inf) would be NaN). A NaN
            # makes its exp NaN, a +inf makes the pivot +inf and exp(inf - inf) NaN: the sum turns NaN, as in torch.
            pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(running_max - pivot) + tl.sum(tl.exp(z - pivot), axis=0)
            running_max = new_max
        score = z_target - (running_max + tl.log(sum_exp))
        rank = tl.sum(above.to(tl.int64), axis=0)
    tl.store(ranks_ptr + row, rank)
    tl.store(scores_ptr + row, score)


def _row_layout(logits: Tensor) -> tuple[int, int, int] | None:
    """``(inner_rows, outer_stride, inner_stride)`` addressing every row of ``logits`` ``[..., V]`` as an
    (outer, inner) pair, or None when the leading dimensions do not merge into two."""
    dims = [(size, stride) for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]) if size != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:  # merge a dimension into the previous one when they step like one dimension
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    (_, outer_stride), (inner_size, inner_stride) = merged
    return inner_size, outer_stride, inner_stride


def _row_offsets(logits: Tensor) -> Tensor:
    """int64 element offset of every row, for layouts :func:`_row_layout` cannot express (8 bytes a row)."""
    offsets = torch.zeros((), dtype=torch.int64, device=logits.device)
    for dim, (size, stride) in enumerate(zip(logits.shape[:-1], logits.stride()[:-1])):
        shape = [1] * (logits.dim() - 1)
        shape[dim] = size
        offsets = offsets + torch.arange(size, device=logits.device).view(shape) * stride
    return offsets.expand(logits.shape[:-1]).reshape(-1)


def launch(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Run the kernel over every row: int64 ranks and float32 log-scores, ``[N]`` each (skipped rows: 0, 0)."""
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"The Triton kernel takes float16, bfloat16 or float32 logits, got {logits.dtype}.")
    if logits.device.type != "cuda" and not (INTERPRETED and logits.device.type == "cpu"):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got logits on {logits.device} (set TRITON_INTERPRET=1 "
            "before the first Triton call to run it on CPU tensors in Triton's interpreter, or use "
            "backend='torch')."
        )
    vocab_size = logits.shape[-1]
    num = target.numel()
    ranks = torch.empty(num, dtype=torch.int64, device=logits.device)
    scores = torch.empty(num, dtype=torch.float32, device=logits.device)
    if num == 0:
        return ranks, scores
    layout = _row_layout(logits)
    row_offsets = _row_offsets(logits) if layout is None else target  # any int64 tensor: unread
    inner_rows, outer_stride, inner_stride = layout if layout is not None else (1, 0, 0)
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab_size))
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    # Triton launches on the current CUDA device, which need not be the tensor's.
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else nullcontext():
        _rank_log_score_kernel[(num,)](
            logits, row_offsets, target, ranks, scores,
            vocab_size, inner_rows, outer_stride, inner_stride, logits.stride(-1), ignore_index,
            USE_ROW_OFFSETS=layout is None, WIDE_COLUMNS=(vocab_size - 1) * abs(logits.stride(-1)) >= INT32_LIMIT,
            BLOCK=block, num_warps=num_warps,
        )
    return ranks, scores
