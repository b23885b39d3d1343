"""Distributed pieces of the metric: vocab-sharded logits (DTensor) and an O(V) state sync.

* ``token_ranks_and_log_scores_sharded(logits, target)``: ``logits`` is a DTensor sharded on its last dim
  (``Shard(-1)``, what torchtitan's loss-parallel produces). Each rank scores its own vocabulary slice: the
  target logit (from the rank that holds it), the max, the sum of ``exp(z - max)`` and the count of logits above
  the target's; two all-reduces of per-token numbers combine them. The vocabulary is never gathered.
* ``all_reduce_sum_``: the metric's state summed over a process group with one all-reduce per state
  (``V`` numbers per rank), where torchmetrics' default all-gathers ``world x V`` numbers before summing.

This module imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# Elements per chunk of the local shard: bounds the temporaries of a pass (float32 ~8 MiB).
_CHUNK_ELEMENTS = 2**21


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (False where torch has no distributed)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _vocab_mesh_dim(logits: Any) -> tuple[int, int, int]:
    """(mesh dim sharding the vocabulary, this rank's first vocabulary index, its local width)."""
    from torch.distributed.tensor import Replicate, Shard

    last = logits.dim() - 1
    vocab_dims = []
    for mesh_dim, placement in enumerate(logits.placements):
        if type(placement) is Shard and placement.dim % logits.dim() == last:
            vocab_dims.append(mesh_dim)
        elif not (type(placement) is Replicate or (type(placement) is Shard and placement.dim % logits.dim() != last)):
            raise ValueError(
                "Expected a DTensor of logits sharded on the vocabulary (Shard(-1)) and replicated or sharded on "
                f"the leading dims over the other mesh dims, got placements {tuple(logits.placements)} "
                "(Partial logits: reduce them first)."
            )
    if len(vocab_dims) != 1:
        raise ValueError(
            "Expected a DTensor of logits sharded on its last (vocabulary) dim (Shard(-1)) over exactly one mesh dim, got "
            f"placements {tuple(logits.placements)}."
        )
    mesh_dim = vocab_dims[0]
    mesh = logits.device_mesh
    vocab_size, parts = logits.shape[-1], mesh.size(mesh_dim)
    coordinate = mesh.get_coordinate()[mesh_dim]
    full = -(-vocab_size // parts)  # torch.chunk's split, which Shard follows
    offset = min(coordinate * full, vocab_size)
    width = max(0, min(vocab_size, offset + full) - offset)
    if logits.to_local().shape[-1] != width:
        raise ValueError(
            f"Expected the local shard of rank {coordinate} of {parts} to hold columns [{offset}, {offset + width}) "
            f"of {vocab_size} (torch.chunk's split), got width {logits.to_local().shape[-1]}."
        )
    return mesh_dim, offset, width


def token_ranks_and_log_scores_sharded(logits: Any, target: Tensor, ignore_index: int = -100
                                       ) -> tuple[Tensor, Tensor]:
    """Rank and log-score of the right token at every non-ignored local position, from vocab-sharded logits.

    A collective: every rank of the vocabulary's mesh dim must call it with the same tokens.

    Args:
        logits: DTensor ``[..., V]`` float, placements ``Shard(-1)`` on one mesh dim (others ``Replicate`` or
            sharding the leading dims).
        target: ``[...]`` integer, aligned with the local shard's leading dims (a DTensor: its local part).

    Returns:
        ``ranks`` (int64 ``[M]``, ``#{v : z_v > z_target}`` over the whole vocabulary) and ``log_scores``
        (float64 ``[M]``), as :func:`ce_dynamics.functional.token_ranks_and_log_scores` on the full logits (the
        same ranks; log-scores to float rounding: float32 work for float32 logits, float64 for float64).
    """
    from ce_dynamics.functional import _check_inputs, _position

    mesh_dim, offset, width = _vocab_mesh_dim(logits)
    group = logits.device_mesh.get_group(mesh_dim)
    vocab_size = logits.shape[-1]
    local = logits.to_local().detach()
    if is_dtensor(target):
        target = target.to_local()
    _check_inputs(local, target)
    device = local.device
    lead_shape = target.shape
    flat_target = target.reshape(-1).to(device=device, dtype=torch.int64)
    index = (flat_target != ignore_index).nonzero().squeeze(1)
    tokens = flat_target[index]
    out_of_range = (tokens < 0) | (tokens >= vocab_size)
    if bool(out_of_range.any()):  # the same tokens on every rank of the group: all of them raise
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"Expected target values in [0, {vocab_size}) or ignore_index={ignore_index}, got {int(tokens[first])} "
            f"at position {_position(int(index[first]), lead_shape)}."
        )
    num = index.numel()
    compute_dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
    rows = local.reshape(-1, width) if width else None  # a view when the leading dims allow; chunks gathered below
    mine = (tokens >= offset) & (tokens < offset + width)
    column = (tokens - offset).clamp(0, max(width - 1, 0))

    # all-reduce 1 (max): the target logit (held by one rank, -inf elsewhere) and the row max
    peaks = torch.full((2, num), -torch.inf, dtype=compute_dtype, device=device)
    chunk_rows = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, num if width else 0, chunk_rows):
        chunk = rows.index_select(0, index[start:start + chunk_rows]).to(compute_dtype)
        stop = start + chunk.shape[0]
        target_logit = chunk.gather(1, column[start:stop, None]).squeeze(1)
        peaks[0, start:stop] = torch.where(mine[start:stop], target_logit, -torch.inf)
        peaks[1, start:stop] = chunk.amax(1)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    target_logit, row_max = peaks[0], peaks[1]
    finite_max = torch.where(torch.isfinite(row_max), row_max, 0.0)

    # all-reduce 2 (sum): logits above the target's, and the sum of exp(z - max), in float64 (counts exact)
    totals = torch.zeros((2, num), dtype=torch.float64, device=device)
    for start in range(0, num if width else 0, chunk_rows):
        chunk = rows.index_select(0, index[start:start + chunk_rows]).to(compute_dtype)
        stop = start + chunk.shape[0]
        totals[0, start:stop] = (chunk > target_logit[start:stop, None]).sum(1, dtype=torch.float64)
        totals[1, start:stop] = (chunk - finite_max[start:stop, None]).exp().sum(1, dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)

    ranks = totals[0].to(torch.int64)
    log_scores = (target_logit - finite_max).to(torch.float64) - totals[1].log()
    finite = torch.isfinite(log_scores)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(
            "Expected finite logits at every non-ignored position, got a non-finite log-score "
            f"({float(log_scores[first])}) at position {_position(int(index[first]), lead_shape)}: the logits "
            "there hold NaN or +inf, or the target's logit is -inf."
        )
    return ranks, log_scores


def all_reduce_sum_(tensors: list[Tensor], group: Any = None) -> list[Tensor]:
    """Each tensor summed over ``group`` (None: the default group) with one all-reduce of its own size: exact for
    integers, float64 sums to float64 rounding (the order of the reduction is the backend's)."""
    out = []
    for tensor in tensors:
        summed = tensor.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        out.append(summed)
    return out
