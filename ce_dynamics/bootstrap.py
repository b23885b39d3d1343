"""Sampling uncertainty of the decomposition: a bootstrap over eval instances, grouped.

Tokens of one document are correlated, so the unit that is resampled is the eval instance (sequence or
document), never the token. Each instance is hashed, by its id and a seed, into one of ``K`` groups, and the
metric keeps the per-rank state of every group (``group_rank_counts`` and ``group_rank_log_score_sum``,
``[K, V]`` int64, summed like the rest; the log-scores in fixed point, units of ``2**-24`` nats, so that their
sums are exact and the same in any order, on any device). At ``compute()`` the groups are resampled with
replacement ``B`` times (a cluster bootstrap: the groups are independent random sets of instances); each
replicate's decomposition comes from the summed state of its groups. Nothing depends on batch order, process
count or a resume: the group of an instance is a pure function of ``(seed, instance id)``, the state is a sum,
and the replicate draws come from the seed alone.

Reported per key (``cross_entropy``, ``error_entropy``, ``self_alignment``, ``confidence``, ``accuracy``):
``<key>_se`` (the replicates' standard deviation) and the basic ("reverse percentile") 95% interval
``<key>_lo, <key>_hi = 2 x - q_975, 2 x - q_025``, which also corrects for the estimators' finite-sample bias
(plug-in entropies are biased low, Confidence high). Beside Error-Entropy: ``error_entropy_mm`` (Miller-Madow,
``+ (m - 1) / 2N``, which assumes independent tokens), ``error_entropy_bc`` (bootstrap bias-corrected,
``2 x - mean(x*)``, which resamples documents and so accounts for their correlation), and the sample-sufficiency
readout ``error_entropy_half`` / ``error_entropy_half_se``: Error-Entropy and its standard error from half the
instances. This module imports only torch and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

BOOTSTRAP_KEYS = ("cross_entropy", "error_entropy", "self_alignment", "confidence", "accuracy")
SUFFIXES = ("_se", "_lo", "_hi")
EXTRA_KEYS = ("error_entropy_mm", "error_entropy_bc", "error_entropy_half", "error_entropy_half_se")
DEFAULT_GROUPS = 64
DEFAULT_REPLICATES = 200  # the callback's, replay's and the HF adapter's default (the library's is 0: off)
LEVEL = 0.95
_HALVES = 16  # random halves averaged for error_entropy_half
_CHUNK = 32  # replicates decomposed at once (bounds compute()'s temporaries to a few [32, seen ranks] arrays)
_MASK32 = 0xFFFFFFFF
# Group log-score sums are int64 in units of 1 / FIXED_POINT nats: exact sums in any order, and as float64 every
# weighted sum of them below 2**29 nats (~100 M tokens) is exact too, so replicates do not depend on the order.
FIXED_POINT = 2.0**24
_FIXED_LIMIT = 2.0**30  # |log-score| clamp (nats) that keeps a token's fixed-point value far from int64's range


def interval_keys() -> list[str]:
    """Every key ``compute()`` adds when the bootstrap is on, in a stable order."""
    return [f"{key}{suffix}" for key in BOOTSTRAP_KEYS for suffix in SUFFIXES] + list(EXTRA_KEYS)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche (the ``lowbias32`` finaliser) in int64 arithmetic, exact on every device: values stay
    below 2**32 and every product below 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def instance_groups(instance_ids: Tensor, num_groups: int, seed: int = 0) -> Tensor:
    """The group (int64, in ``[0, num_groups)``) of each instance id: a counter-based hash of ``(seed, id)``, so
    the same on every device, process and run. Elementwise: no host synchronisation."""
    ids = instance_ids.to(torch.int64)
    key = _mix32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=ids.device) ^ 0x9E3779B9)
    high = _mix32(((ids >> 32) & _MASK32) ^ key)
    return _mix32((ids & _MASK32) ^ high) % num_groups


def accumulate_groups(ranks: Tensor, log_scores: Tensor, groups: Tensor, use: Tensor | None,
                      group_rank_counts: Tensor, group_rank_log_score_sum: Tensor) -> None:
    """Add tokens into the per-group state ``[K, V]`` in place: token ``i`` goes to row ``groups[i]``, column
    ``ranks[i]``; rows where ``use`` is False add nothing. Log-scores are added in fixed point (int64, units of
    ``1 / FIXED_POINT`` nats): integer sums do not depend on order. No host synchronisation."""
    vocab_size = group_rank_counts.shape[1]
    device = group_rank_counts.device
    flat = groups.to(device) * vocab_size + ranks.to(device)
    scaled = log_scores.to(device=device, dtype=torch.float64).clamp(-_FIXED_LIMIT, _FIXED_LIMIT) * FIXED_POINT
    log_scores = scaled.nan_to_num(0.0).round().to(torch.int64)
    if use is None:
        group_rank_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        group_rank_log_score_sum.view(-1).index_add_(0, flat, log_scores)
        return
    use = use.to(device)
    flat = flat.where(use, 0)
    group_rank_counts.view(-1).index_add_(0, flat, use.to(torch.int64))
    group_rank_log_score_sum.view(-1).index_add_(0, flat, log_scores.where(use, 0))


def replicate_weights(num_groups: int, replicates: int, seed: int = 0, draws: int | None = None) -> np.ndarray:
    """``[replicates, num_groups]`` int64: how often each group is drawn in each replicate (``draws`` groups,
    default ``num_groups``, drawn with replacement), from the seed alone (numpy's PCG64)."""
    rng = np.random.default_rng([seed, num_groups, replicates])
    picks = rng.integers(0, num_groups, size=(replicates, draws or num_groups))
    weights = np.zeros((replicates, num_groups), dtype=np.int64)
    np.add.at(weights, (np.arange(replicates)[:, None], picks), 1)
    return weights


def decompose_rows(counts: np.ndarray, sums: np.ndarray) -> dict[str, np.ndarray]:
    """The decomposition of each row of ``counts``/``sums`` ``[R, V]`` (float64; the bootstrap's replicates):
    ``[R]`` arrays for :data:`BOOTSTRAP_KEYS`, plus ``num_tokens`` and ``num_ranks`` (ranks seen); NaN for a row
    with no token. The formulas of :func:`ce_dynamics.functional.decomposition_from_state`, in numpy: its
    reductions do not depend on the thread count, so the result is the same in every process."""
    with np.errstate(divide="ignore", invalid="ignore"):
        total = counts.sum(1)
        seen = counts > 0
        safe_n = np.where(seen, counts, 1.0)
        p = counts / total[:, None]
        log_p = np.where(seen, np.log(safe_n) - np.log(total)[:, None], 0.0)
        log_big_q = np.where(seen, sums / safe_n, -np.inf)
        top = log_big_q.max(1)
        top = np.where(np.isfinite(top), top, 0.0)
        confidence = top + np.log(np.exp(log_big_q - top[:, None]).sum(1))
        log_q = np.where(seen, log_big_q - confidence[:, None], 0.0)
        return {
            "cross_entropy": -sums.sum(1) / total,
            "error_entropy": -(p * log_p).sum(1),
            "self_alignment": (p * (log_p - log_q)).sum(1),
            "confidence": confidence,
            "accuracy": p[:, 0],
            "num_tokens": total,
            "num_ranks": seen.sum(1).astype(np.float64),
        }


def _replicates(counts: np.ndarray, sums: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The decomposition of every replicate (rows of ``weights`` over the groups of ``counts``/``sums``). The
    weighted sums are exact (integers, and multiples of ``1 / FIXED_POINT`` far below 2**53 of them), so they do
    not depend on the order the matrix product adds in."""
    parts = [decompose_rows(w @ counts, w @ sums)
             for w in np.array_split(weights.astype(np.float64), max(1, -(-len(weights) // _CHUNK)))]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def bootstrap_summary(group_rank_counts: Tensor | np.ndarray, group_rank_log_score_sum: Tensor | np.ndarray,
                      replicates: int, seed: int = 0, keep_replicates: bool = False) -> dict[str, Any]:
    """Standard errors, basic 95% intervals, bias-corrected Error-Entropy and the sample-sufficiency readout
    from the per-group state (see the module docstring); 0-dim float64 tensors. Everything, the intervals'
    centres included, comes from the integer group state, so the result is a function of ``(state, replicates,
    seed)`` alone: bit for bit the same however the tokens were batched, split across processes or resumed
    (the centres equal the metric's point estimates up to the fixed point's rounding, ``2**-25`` nats a token).
    ``keep_replicates``: also ``"replicates"``, ``{key: [B] array}`` of :data:`BOOTSTRAP_KEYS`: replicate ``b``
    draws the same groups for every state with the same ``(K, B, seed)``, so the replicates of models scored on
    the same instances are paired (what :mod:`ce_dynamics.analysis.uncertainty` fits)."""
    gc = np.asarray(torch.as_tensor(group_rank_counts).cpu())
    gs = np.asarray(torch.as_tensor(group_rank_log_score_sum).cpu())
    if gc.ndim != 2 or gs.shape != gc.shape:
        raise ValueError(f"Expected per-group state of shape [K, V], got {gc.shape} and {gs.shape}.")
    out = {key: _scalar(math.nan) for key in interval_keys()}
    if not gc.any():  # no token (e.g. every one non-finite): NaNs, as the point estimates
        return out
    num_groups = gc.shape[0]
    columns = np.flatnonzero(gc.sum(0) > 0)  # ranks never seen add nothing to any replicate
    if columns.size and columns[0] != 0:  # keep rank 0 for accuracy
        columns = np.concatenate([[0], columns])
    counts = gc[:, columns].astype(np.float64)
    sums = gs[:, columns].astype(np.float64) / FIXED_POINT
    whole = decompose_rows(counts.sum(0, keepdims=True), sums.sum(0, keepdims=True))
    point = {key: float(whole[key][0]) for key in BOOTSTRAP_KEYS}
    total = float(whole["num_tokens"][0])
    out["error_entropy_mm"] = _scalar(point["error_entropy"] + (float(whole["num_ranks"][0]) - 1) / (2 * total))
    if replicates < 2:
        return out
    reps = _replicates(counts, sums, replicate_weights(num_groups, replicates, seed))
    if keep_replicates:
        out["replicates"] = {key: reps[key] for key in BOOTSTRAP_KEYS}
    alpha = (1 - LEVEL) / 2
    for key in BOOTSTRAP_KEYS:
        values = reps[key][np.isfinite(reps[key])]
        if values.size < 2:
            continue
        x = point[key]
        q_lo, q_hi = np.quantile(values, [alpha, 1 - alpha])
        out[f"{key}_se"] = _scalar(float(values.std(ddof=1)))
        out[f"{key}_lo"] = _scalar(2 * x - float(q_hi))
        out[f"{key}_hi"] = _scalar(2 * x - float(q_lo))
        if key == "error_entropy":
            out["error_entropy_bc"] = _scalar(2 * x - float(values.mean()))
    out.update(_half_readout(counts, sums, replicates, seed))
    return out


def _half_readout(counts: np.ndarray, sums: np.ndarray, replicates: int, seed: int) -> dict[str, Tensor]:
    """Error-Entropy from half the groups (mean over random halves) and its bootstrap standard error there."""
    num_groups = counts.shape[0]
    half = num_groups // 2
    if half < 2:
        return {}
    rng = np.random.default_rng([seed, num_groups, 1])
    masks = np.zeros((_HALVES, num_groups))
    for row in masks:
        row[rng.permutation(num_groups)[:half]] = 1.0
    halves = decompose_rows(masks @ counts, masks @ sums)["error_entropy"]
    chosen = np.flatnonzero(masks[0])
    reps = _replicates(counts[chosen], sums[chosen], replicate_weights(half, replicates, seed))["error_entropy"]
    reps = reps[np.isfinite(reps)]
    halves = halves[np.isfinite(halves)]
    return {"error_entropy_half": _scalar(float(halves.mean()) if halves.size else math.nan),
            "error_entropy_half_se": _scalar(float(reps.std(ddof=1)) if reps.size > 1 else math.nan)}


# --------------------------------------------------------------------------------- saved form (npz)
# The per-group state is K x V, mostly zeros: it is saved as its non-zero entries (at most one per token).

def pack_group_state(group_rank_counts: Tensor, group_rank_log_score_sum: Tensor, replicates: int,
                     seed: int) -> dict[str, np.ndarray]:
    """The arrays a state file keeps of the per-group state: ``bootstrap_index`` (flat ``group * V + rank`` of
    each non-zero entry), ``bootstrap_counts``, ``bootstrap_log_score_sum``, and the shape and settings that
    recompute the intervals (``bootstrap_shape``, ``bootstrap_replicates``, ``bootstrap_seed``)."""
    counts = group_rank_counts.detach().reshape(-1).cpu()
    sums = group_rank_log_score_sum.detach().reshape(-1).cpu()
    index = counts.nonzero().squeeze(1)
    small = counts.numel() < 2**31 and (index.numel() == 0 or int(counts[index].max()) < 2**31)
    dtype = np.int32 if small else np.int64
    return {
        "bootstrap_index": index.numpy().astype(dtype),
        "bootstrap_counts": counts[index].numpy().astype(dtype),
        "bootstrap_log_score_sum": sums[index].numpy(),  # int64, units of 1 / FIXED_POINT nats
        "bootstrap_shape": np.asarray(tuple(group_rank_counts.shape), dtype=np.int64),
        "bootstrap_replicates": np.asarray(replicates, dtype=np.int64),
        "bootstrap_seed": np.asarray(seed, dtype=np.int64),
    }


def unpack_group_state(state: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """``(group_rank_counts, group_rank_log_score_sum)`` ``[K, V]`` of a state file's arrays (or of a state dict
    already holding them dense); None when the state has no per-group part."""
    if "group_rank_counts" in state:
        return (torch.as_tensor(state["group_rank_counts"]), torch.as_tensor(state["group_rank_log_score_sum"]))
    if "bootstrap_index" not in state:
        return None
    shape = tuple(int(n) for n in np.asarray(state["bootstrap_shape"]))
    index = torch.as_tensor(np.asarray(state["bootstrap_index"], dtype=np.int64))
    counts = torch.zeros(math.prod(shape), dtype=torch.int64)
    sums = torch.zeros(math.prod(shape), dtype=torch.int64)
    counts[index] = torch.as_tensor(np.asarray(state["bootstrap_counts"], dtype=np.int64))
    sums[index] = torch.as_tensor(np.asarray(state["bootstrap_log_score_sum"], dtype=np.int64))
    return counts.reshape(shape), sums.reshape(shape)


def summary_of_state(state: Mapping[str, Any], keep_replicates: bool = False) -> dict[str, Any]:
    """The bootstrap keys of a saved (or packed) state, recomputed exactly from its arrays; {} without them.
    ``keep_replicates``: see :func:`bootstrap_summary`."""
    groups = unpack_group_state(state)
    if groups is None or int(np.asarray(state.get("bootstrap_replicates", 0))) < 1:
        return {}
    return bootstrap_summary(*groups, int(np.asarray(state["bootstrap_replicates"])),
                             int(np.asarray(state.get("bootstrap_seed", 0))), keep_replicates)


def replicates_field(results: Mapping[str, Any]) -> dict[str, Any]:
    """``{"replicates": {key: [B floats]}}`` for a results row (9 significant digits), from a dict that
    :func:`summary_of_state` filled with ``keep_replicates``; {} when it has none."""
    reps = results.get("replicates")
    if not reps:
        return {}
    return {"replicates": {key: [float(f"{v:.9g}") for v in np.asarray(values).tolist()]
                           for key, values in reps.items()}}
