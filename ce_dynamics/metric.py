"""CrossEntropyDecomposition: a torchmetrics Metric accumulating the decomposition's per-rank state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from ce_dynamics import bootstrap as _bootstrap
from ce_dynamics.functional import (
    BACKENDS,
    accumulate_state,
    accumulate_tokens,
    decomposition_from_state,
    raise_if_nonfinite,
    token_pass,
)
from ce_dynamics.kernels import triton_available
from ce_dynamics.from_hidden import token_ranks_and_log_scores_from_hidden
from ce_dynamics.sharded import all_reduce_sum_, is_dtensor, token_ranks_and_log_scores_sharded

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STATES = ("rank_counts", "rank_log_score_sum", "nonfinite_tokens", "out_of_range_targets")
_GROUP_STATES = ("group_rank_counts", "group_rank_log_score_sum")
NAN_STRATEGIES = ("error", "ignore")


class CrossEntropyDecomposition(Metric):
    """Exact split of token-level cross-entropy into Error-Entropy, Self-Alignment and Confidence.

    ``cross_entropy = error_entropy + self_alignment - confidence`` (Yan et al., ICLR 2026, eq. 8). The state is
    two vectors of length ``vocab_size``, summed across batches and processes: ``rank_counts`` (int64, tokens
    whose right token had rank ``e``) and ``rank_log_score_sum`` (float64, their summed log-scores), plus two
    int64 counters of tokens left out of them, ``nonfinite_tokens`` and ``out_of_range_targets``. They keep
    their dtypes when the owning module is cast to bf16/fp16.

    Args:
        vocab_size: width ``V`` of the logits (the full output width, padding columns included).
        ignore_index: target value whose positions are skipped.
        num_threads: CPU worker threads of ``update``; None: ``torch.get_num_threads()`` at each call.
        backend: ``"auto"`` (Triton for CUDA tensors when it imports, else torch), ``"torch"`` or ``"triton"``;
            see :func:`ce_dynamics.functional.token_ranks_and_log_scores`.
        validate_args: check targets and log-scores in ``update`` and raise there, naming the position (a host
            synchronisation per check). False: ``update`` never synchronises with the host; non-ignored targets
            outside ``[0, V)`` are skipped and counted, and ``compute()`` raises a ValueError if there were any;
            non-finite log-scores are handled by ``nan_strategy`` at ``compute()``.
        nan_strategy: what a non-finite log-score at a counted position (NaN or +inf logits, or a -inf target
            logit) does. ``"error"``: ValueError, from ``update`` with ``validate_args`` (state untouched), else
            from ``compute()``. ``"ignore"``: the token is left out of the decomposition and counted in the state
            ``nonfinite_tokens``.
        bootstrap: number of bootstrap replicates ``B`` (0: off). On, ``compute()`` adds ``<key>_se``,
            ``<key>_lo``, ``<key>_hi`` (95%) for cross_entropy, error_entropy, self_alignment, confidence and
            accuracy, and a bias-corrected Error-Entropy (see :mod:`ce_dynamics.bootstrap`): eval instances (pass
            ``instance_ids`` to ``update``) are hashed into ``bootstrap_groups`` groups whose per-rank state is kept
            (two ``[K, V]`` int64: 51 MB at K=64, V=50304) and resampled at ``compute()``.
        bootstrap_groups: ``K``, the number of instance groups (more: finer resampling, more memory).
        bootstrap_seed: seeds the grouping and the replicates; the intervals are a function of the data and it.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = CrossEntropyDecomposition(vocab_size=5)
        >>> metric.update(torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]]), torch.tensor([0]))
        >>> round(float(metric.compute()["accuracy"]), 3)
        1.0
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    rank_counts: Tensor
    rank_log_score_sum: Tensor
    nonfinite_tokens: Tensor
    out_of_range_targets: Tensor

    def __init__(self, vocab_size: int, ignore_index: int = -100, num_threads: int | None = None,
                 backend: str = "auto", validate_args: bool = True, nan_strategy: str = "error",
                 bootstrap: int = 0, bootstrap_groups: int = _bootstrap.DEFAULT_GROUPS, bootstrap_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"Expected `vocab_size` to be a positive int, got {vocab_size!r}.")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"Expected `ignore_index` to be an int, got {ignore_index!r}.")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"Expected `num_threads` to be None or a positive int, got {num_threads!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"Expected `backend` to be one of {BACKENDS}, got {backend!r}.")
        if backend == "triton" and not triton_available():
            raise ImportError("backend='triton' needs the `triton` package (the [gpu] extra: "
                              "`pip install 'ce-dynamics[gpu]'`, Linux).")
        if not isinstance(validate_args, bool):
            raise ValueError(f"Expected `validate_args` to be a bool, got {validate_args!r}.")
        if nan_strategy not in NAN_STRATEGIES:
            raise ValueError(f"Expected `nan_strategy` to be one of {NAN_STRATEGIES}, got {nan_strategy!r}.")
        for name, value, low in (("bootstrap", bootstrap, 0), ("bootstrap_groups", bootstrap_groups, 2),
                                 ("bootstrap_seed", bootstrap_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Expected `{name}` to be an int >= {low}, got {value!r}.")
        if bootstrap == 1:
            raise ValueError("Expected `bootstrap` to be 0 (off) or at least 2 replicates (e.g. 200), got 1.")
        self.bootstrap = bootstrap
        self.bootstrap_groups = bootstrap_groups
        self.bootstrap_seed = bootstrap_seed
        self._next_instance = 0  # instance ids given to rows when update() gets none
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.num_threads = num_threads
        self.backend = backend
        self.validate_args = validate_args
        self.nan_strategy = nan_strategy
        self.add_state("rank_counts", default=torch.zeros(vocab_size, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(
            "rank_log_score_sum", default=torch.zeros(vocab_size, dtype=torch.float64), dist_reduce_fx="sum"
        )
        # Tokens left out of the two vectors: non-finite log-scores, and (validate_args=False) bad targets.
        self.add_state("nonfinite_tokens", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("out_of_range_targets", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        if bootstrap:  # per-group state of the instance bootstrap (ce_dynamics.bootstrap), summed like the rest
            shape = (bootstrap_groups, vocab_size)
            self.add_state("group_rank_counts", default=torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state("group_rank_log_score_sum", default=torch.zeros(shape, dtype=torch.int64),
                           dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, instance_ids: Tensor | None = None) -> None:
        """Add a batch: ``logits`` ``[..., V]`` float, ``target`` ``[...]`` integer, already aligned.

        ``instance_ids`` (integer, shape ``target.shape`` or a leading part of it, e.g. ``[B]`` for ``[B, T]``
        targets): the eval instance (document, sequence) of each token, used by the bootstrap (ignored when it
        is off). The same instance must get the same id wherever and whenever it is scored; then the intervals do
        not depend on batch order, process count or a resume. Without them, each leading row is an instance
        numbered in arrival order on this process (a warning says so: intervals then depend on those).

        ``logits`` may be a DTensor sharded on the vocabulary (``Shard(-1)``): then every rank of that mesh dim
        must call ``update`` with the same tokens, and the metric's ``process_group`` should be the
        data-parallel group, so that the ranks sharing tokens do not count them twice at sync.
        """
        if isinstance(logits, Tensor) and logits.dim() >= 1 and logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"Expected `logits` of shape [..., {self.vocab_size}] (vocab_size), got {tuple(logits.shape)}."
            )
        groups = (self._row_groups(target, instance_ids) if self.bootstrap and isinstance(target, Tensor)
                  else None)  # checked before any state is touched
        if is_dtensor(logits):  # vocab-sharded: per-token numbers all-reduced, the vocabulary never gathered
            ranks, log_scores = token_ranks_and_log_scores_sharded(logits, target, self.ignore_index)
            device = self.rank_counts.device
            accumulate_state(ranks.to(device), log_scores.to(device), self.rank_counts, self.rank_log_score_sum)
            self._accumulate_kept_groups(ranks, log_scores, target, groups)
            return
        tokens = token_pass(logits, target, self.ignore_index, self.num_threads, self.backend, self.validate_args)
        if self.validate_args and self.nan_strategy == "error":
            raise_if_nonfinite(tokens)
        self.nonfinite_tokens += accumulate_tokens(tokens, self.rank_counts, self.rank_log_score_sum)
        self.out_of_range_targets += tokens.out_of_range.to(self.out_of_range_targets.device)
        if groups is not None:
            if tokens.positions is not None:
                groups = groups[tokens.positions.to(groups.device)]
            use = torch.isfinite(tokens.log_scores)
            if tokens.counted is not None:
                use &= tokens.counted
            _bootstrap.accumulate_groups(tokens.ranks, tokens.log_scores, groups, use, self.group_rank_counts,
                                         self.group_rank_log_score_sum)

    def _row_groups(self, target: Tensor, instance_ids: Tensor | None) -> Tensor:
        """The bootstrap group of every flat position of ``target``."""
        device = self.group_rank_counts.device
        if instance_ids is None:
            if self._next_instance == 0:
                rank_zero_warn("CrossEntropyDecomposition(bootstrap=...): update() got no instance_ids, so each "
                               "leading row is an instance numbered in arrival order; pass instance_ids for "
                               "intervals that do not depend on batch order, process count or a resume.")
            rows = target.shape[0] if target.dim() >= 2 else 1
            instance_ids = torch.arange(self._next_instance, self._next_instance + rows, device=device)
            if target.dim() < 2:
                instance_ids = instance_ids.expand(target.shape)
            self._next_instance += rows
        ids = torch.as_tensor(instance_ids, device=device)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"Expected integer `instance_ids`, got dtype {ids.dtype}.")
        if tuple(ids.shape) != tuple(target.shape[: ids.dim()]):
            raise ValueError(
                "Expected `instance_ids` of shape target.shape or a leading part of it (one id per instance row), "
                f"got {tuple(ids.shape)} for target {tuple(target.shape)}."
            )
        ids = ids.reshape(*ids.shape, *([1] * (target.dim() - ids.dim()))).expand(target.shape).reshape(-1)
        return _bootstrap.instance_groups(ids, self.bootstrap_groups, self.bootstrap_seed)

    def _accumulate_kept_groups(self, ranks: Tensor, log_scores: Tensor, target: Tensor,
                                groups: Tensor | None) -> None:
        """Per-group state of the tokens a path that returns only the non-ignored positions scored."""
        if groups is None:
            return
        groups = groups[target.reshape(-1).to(groups.device) != self.ignore_index]
        _bootstrap.accumulate_groups(ranks, log_scores, groups, None, self.group_rank_counts,
                                     self.group_rank_log_score_sum)

    def update_from_hidden(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                           instance_ids: Tensor | None = None) -> None:
        """Add a batch given as hidden states ``[..., H]`` and the unembedding ``weight`` ``[V, H]`` (+ ``bias``
        ``[V]``): the state ``update(hidden @ weight.T + bias, target)`` would add, without the ``N x V`` logits
        (see :func:`ce_dynamics.functional.token_ranks_and_log_scores_from_hidden`)."""
        # through torchmetrics' update wrapper, as `update` is: it drops the cached compute() and counts the update
        self._wrap_update(self._update_from_hidden)(hidden, weight, target, bias, instance_ids)

    def _update_from_hidden(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
                            instance_ids: Tensor | None = None) -> None:
        if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"Expected `weight` of shape [{self.vocab_size}, H] (vocab_size rows), got {tuple(weight.shape)}."
            )
        groups = (self._row_groups(target, instance_ids) if self.bootstrap and isinstance(target, Tensor)
                  else None)  # checked before any state is touched
        ranks, log_scores = token_ranks_and_log_scores_from_hidden(
            hidden, weight, target, bias, self.ignore_index, self.num_threads
        )
        device = self.rank_counts.device
        accumulate_state(ranks.to(device), log_scores.to(device), self.rank_counts, self.rank_log_score_sum)
        self._accumulate_kept_groups(ranks, log_scores, target, groups)

    def compute(self) -> dict[str, Tensor]:
        """The decomposition of everything accumulated (NaNs, with a warning, before any token), with
        ``nonfinite_tokens``: how many tokens ``nan_strategy="ignore"`` left out.

        Raises:
            ValueError: (``validate_args=False`` only) ``update`` saw targets outside ``[0, V)``, or non-finite
                log-scores with ``nan_strategy="error"``.
        """
        self.raise_deferred_errors()
        out = decomposition_from_state(self.rank_counts, self.rank_log_score_sum, self.nonfinite_tokens)
        if self.bootstrap:
            out.update(_bootstrap.bootstrap_summary(self.group_rank_counts, self.group_rank_log_score_sum,
                                                    self.bootstrap, self.bootstrap_seed))
        return out

    def bootstrap_state(self) -> dict[str, Any]:
        """The per-group state in its saved form (:func:`ce_dynamics.bootstrap.pack_group_state`), {} when the
        bootstrap is off: what a state file needs to recompute every interval."""
        if not self.bootstrap:
            return {}
        return _bootstrap.pack_group_state(self.group_rank_counts, self.group_rank_log_score_sum, self.bootstrap,
                                           self.bootstrap_seed)

    def reset(self) -> None:
        super().reset()
        self._next_instance = 0

    def raise_deferred_errors(self) -> None:
        """Raise what ``validate_args=False`` defers from ``update`` to here: targets outside ``[0, V)``, and
        non-finite tokens under ``nan_strategy="error"`` (a ValueError with the count); nothing otherwise."""
        out_of_range = int(self.out_of_range_targets)
        if out_of_range:
            raise ValueError(
                f"Expected target values in [0, {self.vocab_size}) or ignore_index={self.ignore_index}, but "
                f"update() was given {out_of_range} other target(s) since the last reset (validate_args=False "
                "skips them and reports them here; validate_args=True raises at the batch, naming the position)."
            )
        nonfinite = int(self.nonfinite_tokens)
        if nonfinite and self.nan_strategy == "error":
            raise ValueError(
                f"Expected finite logits at every non-ignored position, but {nonfinite} token(s) given to update() "
                "since the last reset had a non-finite log-score (NaN or +inf logits, or a -inf target logit). "
                "nan_strategy='ignore' leaves them out and counts them in `nonfinite_tokens`; "
                "validate_args=True raises at the batch, naming the position."
            )

    def plot(self, ax: Axes | None = None, title: str | None = None) -> Figure:  # type: ignore[override]
        """Matplotlib figure of ``p_e`` and ``q_e`` against rank on log-log axes (paper fig. 6), with the
        decomposition's values in the panel. Needs matplotlib (the ``[lightning]`` extra; the error says so)."""
        from ce_dynamics._extras import require
        from ce_dynamics.plotting import plot_p_e_q_e

        require("matplotlib")

        result = self.compute()
        return plot_p_e_q_e(result["p_e"].cpu().numpy(), result["q_e"].cpu().numpy(), ax=ax, title=title,
                            values={k: float(v) for k, v in result.items() if v.ndim == 0})

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        # torchmetrics all-gathers every state (world x V numbers per rank) and then sums; an all-reduce moves V.
        # A dist_sync_fn given by the user keeps torchmetrics' own path.
        from torchmetrics.utilities.distributed import gather_all_tensors

        if dist_sync_fn not in (None, gather_all_tensors):
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        names = list(self._reductions)  # every state of this metric is a tensor reduced by "sum"
        summed = all_reduce_sum_([getattr(self, name) for name in names], process_group or self.process_group)
        for name, value in zip(names, summed):
            setattr(self, name, value)

    def _own_states(self) -> tuple[str, ...]:
        return _STATES + (_GROUP_STATES if getattr(self, "bootstrap", 0) else ())

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        # A parent's `.to(torch.bfloat16)` (Lightning's "bf16-true") would cast the float64 state: follow the
        # device only, keep the dtypes.
        this = super()._apply(fn, exclude_state=tuple(exclude_state) + self._own_states())
        device = fn(torch.zeros(1, device=self.rank_counts.device)).device
        for name in self._own_states():
            setattr(this, name, getattr(this, name).to(device))
            this._defaults[name] = this._defaults[name].to(device)
        return this
