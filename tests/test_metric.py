"""CrossEntropyDecomposition: accumulation, bad input, dtype casts, DDP."""

from __future__ import annotations

import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.functional import KEYS, cross_entropy_decomposition
from ce_dynamics.metric import _STATES
from numpy_reference import decompose

VOCAB = 23


def _data(seed: int, tokens: int = 40, vocab: int = VOCAB, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=gen) * 2).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    return logits, target


def _state(metric: CrossEntropyDecomposition) -> tuple[torch.Tensor, torch.Tensor]:
    return metric.rank_counts.clone(), metric.rank_log_score_sum.clone()


def test_accumulation_over_batches_equals_one_batch():
    logits, target = _data(0, tokens=60)
    metric = CrossEntropyDecomposition(VOCAB)
    for lo, hi in [(0, 7), (7, 30), (30, 60)]:
        metric.update(logits[lo:hi], target[lo:hi])
    result = metric.compute()
    expected = cross_entropy_decomposition(logits, target)
    assert torch.equal(result["p_e"], expected["p_e"])
    for key in KEYS:
        assert math.isclose(float(result[key]), float(expected[key]), rel_tol=1e-12), key
    assert int(result["num_tokens"]) == 60
    assert result["cross_entropy"].dtype == torch.float64 and result["num_tokens"].dtype == torch.int64
    assert result["p_e"].shape == result["q_e"].shape == (VOCAB,)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 50), max_size=6))
def test_any_split_into_batches_gives_the_same_state(seed, cuts):
    logits, target = _data(seed, tokens=50)
    whole = CrossEntropyDecomposition(VOCAB)
    whole.update(logits, target)
    split = CrossEntropyDecomposition(VOCAB)
    bounds = [0, *sorted(cuts), 50]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        split.update(logits[lo:hi], target[lo:hi])  # empty slices included
    assert torch.equal(split.rank_counts, whole.rank_counts)
    torch.testing.assert_close(split.rank_log_score_sum, whole.rank_log_score_sum, rtol=1e-12, atol=1e-12)


def test_forward_returns_the_batch_value_and_accumulates():
    a, ta = _data(1)
    b, tb = _data(2)
    metric = CrossEntropyDecomposition(VOCAB)
    batch_value = metric(a, ta)
    assert math.isclose(float(batch_value["cross_entropy"]), float(cross_entropy_decomposition(a, ta)["cross_entropy"]))
    metric(b, tb)
    total = cross_entropy_decomposition(torch.cat([a, b]), torch.cat([ta, tb]))
    assert math.isclose(float(metric.compute()["cross_entropy"]), float(total["cross_entropy"]), rel_tol=1e-12)


def test_reset_clears_state():
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(*_data(3))
    metric.reset()
    assert int(metric.rank_counts.sum()) == 0 and float(metric.rank_log_score_sum.abs().sum()) == 0.0


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "to_fp16", "double", "float"])
def test_float64_state_survives_parent_dtype_casts(cast):
    parent = torch.nn.Module()
    parent.lin = torch.nn.Linear(2, 2)
    parent.metric = CrossEntropyDecomposition(VOCAB)
    parent.metric.update(*_data(4, dtype=torch.float64))
    before = _state(parent.metric)
    {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "to_fp16": lambda m: m.to(dtype=torch.float16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "double": lambda m: m.double(),
        "float": lambda m: m.float(),
    }[cast](parent)
    assert parent.metric.rank_counts.dtype == torch.int64
    assert parent.metric.rank_log_score_sum.dtype == torch.float64
    assert torch.equal(parent.metric.rank_log_score_sum, before[1])
    parent.metric.reset()  # the defaults keep their dtype too
    assert parent.metric.rank_log_score_sum.dtype == torch.float64
    parent.metric.update(*_data(5, dtype=torch.bfloat16))
    assert parent.metric.rank_log_score_sum.dtype == torch.float64


def test_lightning_bf16_true_precision_keeps_float64_state():
    from lightning.fabric.plugins.precision import HalfPrecision

    module = torch.nn.Module()
    module.metric = CrossEntropyDecomposition(VOCAB)
    module = HalfPrecision("bf16-true").convert_module(module)
    assert module.metric.rank_log_score_sum.dtype == torch.float64


GOOD_LOGITS, GOOD_TARGET = _data(6, tokens=8)


def _nan_at_valid():
    logits = GOOD_LOGITS.clone()
    logits[3, 5] = math.nan
    return logits, GOOD_TARGET


def _inf_at_valid():
    logits = GOOD_LOGITS.clone()
    logits[2, 0] = math.inf
    return logits, GOOD_TARGET


def _target_logit_minus_inf():
    logits = GOOD_LOGITS.clone()
    logits[1, int(GOOD_TARGET[1])] = -math.inf
    return logits, GOOD_TARGET


BAD_INPUTS = {
    "int logits": (lambda: (GOOD_LOGITS.long(), GOOD_TARGET), TypeError, "floating point"),
    "float target": (lambda: (GOOD_LOGITS, GOOD_TARGET.float()), TypeError, "integer tensor"),
    "bool target": (lambda: (GOOD_LOGITS, GOOD_TARGET > 3), TypeError, "integer tensor"),
    "list logits": (lambda: (GOOD_LOGITS.tolist(), GOOD_TARGET), TypeError, "torch.Tensor"),
    "shape mismatch": (lambda: (GOOD_LOGITS, GOOD_TARGET[:5]), ValueError, r"logits \(8, 23\) and target \(5,\)"),
    "vocab mismatch": (lambda: (GOOD_LOGITS[:, :20], GOOD_TARGET), ValueError, r"\[\.\.\., 23\].*\(8, 20\)"),
    "target too large": (
        lambda: (GOOD_LOGITS, torch.where(torch.arange(8) == 4, 23, GOOD_TARGET)),
        ValueError,
        r"\[0, 23\).*got 23 at position \(4,\)",
    ),
    "negative target": (
        lambda: (GOOD_LOGITS, torch.where(torch.arange(8) == 0, -1, GOOD_TARGET)),
        ValueError,
        r"got -1 at position \(0,\)",
    ),
    "nan logits": (_nan_at_valid, ValueError, r"non-finite log-score \(nan\) at position \(3,\)"),
    "+inf logits": (_inf_at_valid, ValueError, r"non-finite.*position \(2,\)"),
    "-inf target logit": (_target_logit_minus_inf, ValueError, r"non-finite log-score \(-inf\) at position \(1,\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clearly_and_leaves_state_untouched(case):
    make, error, message = BAD_INPUTS[case]
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(*_data(7))
    before = _state(metric)
    with pytest.raises(error, match=message):
        metric.update(*make())
    after = _state(metric)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_bad_values_at_ignored_positions_are_fine():
    logits, target = _nan_at_valid()
    target = target.clone()
    target[3] = -100
    target[5] = -100
    logits[5] = math.inf
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(logits, target)
    assert int(metric.compute()["num_tokens"]) == 6


SHAPE_AND_TYPE_CASES = ["int logits", "float target", "bool target", "list logits", "shape mismatch", "vocab mismatch"]


@pytest.mark.parametrize("case", SHAPE_AND_TYPE_CASES)
def test_shape_and_type_errors_raise_without_validate_args_too(case):
    make, error, message = BAD_INPUTS[case]
    metric = CrossEntropyDecomposition(VOCAB, validate_args=False, nan_strategy="ignore")
    with pytest.raises(error, match=message):
        metric.update(*make())


def _three_nonfinite_rows():
    """GOOD_LOGITS with NaN at row 3, +inf at row 2 and a -inf target logit at row 1; rows kept: the others."""
    logits = GOOD_LOGITS.clone()
    logits[3, 5] = math.nan
    logits[2, 0] = math.inf
    logits[1, int(GOOD_TARGET[1])] = -math.inf
    keep = torch.tensor([True, False, False, False, True, True, True, True])
    return logits, GOOD_TARGET, keep


@pytest.mark.parametrize("validate_args", [True, False])
def test_nan_strategy_ignore_decomposes_the_finite_tokens_and_counts_the_others(validate_args):
    logits, target, keep = _three_nonfinite_rows()
    metric = CrossEntropyDecomposition(VOCAB, validate_args=validate_args, nan_strategy="ignore")
    metric.update(logits, target)
    result = metric.compute()
    assert result["nonfinite_tokens"].dtype == torch.int64 and result["nonfinite_tokens"].shape == ()
    assert int(result["nonfinite_tokens"]) == 3 and int(result["num_tokens"]) == 5
    z, t = logits[keep].double().numpy(), target[keep].numpy()
    ranks = (z > z[np.arange(len(t)), t][:, None]).sum(axis=1)
    np.testing.assert_array_equal(metric.rank_counts.numpy(), np.bincount(ranks, minlength=VOCAB))
    reference = F.cross_entropy(logits[keep].double(), target[keep])
    assert math.isclose(float(result["cross_entropy"]), float(reference), rel_tol=1e-6)
    assert math.isclose(float(result["cross_entropy"]),
                        float(result["error_entropy"] + result["self_alignment"] - result["confidence"]),
                        rel_tol=1e-12)


def test_nan_strategy_error_without_validate_args_raises_at_compute_and_keeps_the_finite_tokens():
    logits, target, keep = _three_nonfinite_rows()
    metric = CrossEntropyDecomposition(VOCAB, validate_args=False)
    metric.update(logits, target)  # no check, no raise: nothing is read back from the tensors
    assert int(metric.rank_counts.sum()) == 5 and int(metric.nonfinite_tokens) == 3
    with pytest.raises(ValueError, match=r"3 token\(s\) given to update\(\) since the last reset had a non-finite"):
        metric.compute()
    metric.reset()
    metric.update(logits[keep], target[keep])
    assert int(metric.compute()["num_tokens"]) == 5


@pytest.mark.parametrize("nan_strategy", ["error", "ignore"])
def test_out_of_range_targets_without_validate_args_are_skipped_and_raised_at_compute(nan_strategy):
    target = GOOD_TARGET.clone()
    target[4], target[6], target[7] = VOCAB, -1, -100
    metric = CrossEntropyDecomposition(VOCAB, validate_args=False, nan_strategy=nan_strategy)
    metric.update(GOOD_LOGITS, target)
    assert int(metric.rank_counts.sum()) == 5 and int(metric.out_of_range_targets) == 2
    with pytest.raises(ValueError, match=r"\[0, 23\) or ignore_index=-100, but update\(\) was given 2 other target"):
        metric.compute()
    metric.reset()
    metric.update(GOOD_LOGITS, GOOD_TARGET)
    assert int(metric.compute()["num_tokens"]) == 8


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ignored=st.lists(st.integers(0, 29), max_size=10))
def test_validate_args_false_gives_the_same_state_on_good_input(seed, ignored):
    logits, target = _data(seed, tokens=30)
    target[ignored] = -100
    checked = CrossEntropyDecomposition(VOCAB)
    unchecked = CrossEntropyDecomposition(VOCAB, validate_args=False, nan_strategy="ignore")
    checked.update(logits, target)
    unchecked.update(logits, target)
    for name in ("rank_counts", "rank_log_score_sum", "nonfinite_tokens", "out_of_range_targets"):
        assert torch.equal(getattr(checked, name), getattr(unchecked, name)), name


@pytest.mark.parametrize("validate_args", [False, True])
def test_update_reads_no_value_back_without_validate_args(validate_args):
    # Meta tensors have shapes and no data: any value read on the host (.item(), bool(), nonzero) fails on them.
    # Off CPU the torch backend takes the same path as on a GPU (every row, masks), so this is the GPU path's check.
    metric = CrossEntropyDecomposition(VOCAB, validate_args=validate_args, nan_strategy="ignore").to("meta")
    logits = torch.empty(2, 6, VOCAB, device="meta", dtype=torch.bfloat16)
    target = torch.empty(2, 6, device="meta", dtype=torch.int64)
    if validate_args:
        with pytest.raises((RuntimeError, NotImplementedError)):
            metric.update(logits[:, :-1], target[:, 1:])
    else:
        metric.update(logits[:, :-1], target[:, 1:])
        metric.update(logits, target)
        assert metric.rank_counts.device.type == "meta" and metric.nonfinite_tokens.shape == ()


def test_compute_always_reports_nonfinite_tokens():
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(*_data(11))
    result = metric.compute()
    assert result["nonfinite_tokens"].dtype == torch.int64 and int(result["nonfinite_tokens"]) == 0


def test_forward_gives_the_batch_nonfinite_count_and_accumulates_it():
    logits, target, _ = _three_nonfinite_rows()
    metric = CrossEntropyDecomposition(VOCAB, nan_strategy="ignore")
    assert int(metric(logits, target)["nonfinite_tokens"]) == 3
    assert int(metric(GOOD_LOGITS, GOOD_TARGET)["nonfinite_tokens"]) == 0
    assert int(metric(logits, target)["nonfinite_tokens"]) == 3
    result = metric.compute()
    assert int(result["nonfinite_tokens"]) == 6 and int(result["num_tokens"]) == 5 + 8 + 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nan_strategy": "warn"}, r"`nan_strategy` to be one of \('error', 'ignore'\), got 'warn'"),
        ({"nan_strategy": None}, "`nan_strategy` to be one of"),
        ({"validate_args": "no"}, "`validate_args` to be a bool, got 'no'"),
        ({"validate_args": 0}, "`validate_args` to be a bool"),
        ({"backend": "gpu"}, r"`backend` to be one of \('auto', 'torch', 'triton'\), got 'gpu'"),
    ],
)
def test_new_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossEntropyDecomposition(VOCAB, **kwargs)


@pytest.mark.parametrize("vocab_size", [0, -3, 2.5, "50", True, None])
def test_vocab_size_must_be_a_positive_int(vocab_size):
    with pytest.raises(ValueError, match="positive int"):
        CrossEntropyDecomposition(vocab_size)


@pytest.mark.parametrize("num_threads", [0, -1, 1.5, True, "2"])
def test_num_threads_must_be_none_or_a_positive_int(num_threads):
    with pytest.raises(ValueError, match="`num_threads` to be None or a positive int"):
        CrossEntropyDecomposition(VOCAB, num_threads=num_threads)


def test_all_ignored_batch_is_a_no_op():
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(*_data(8))
    before = _state(metric)
    metric.update(GOOD_LOGITS, torch.full((8,), -100))
    assert torch.equal(before[0], metric.rank_counts) and torch.equal(before[1], metric.rank_log_score_sum)


def test_compute_before_any_token_warns_and_returns_nan():
    metric = CrossEntropyDecomposition(VOCAB)
    with pytest.warns(UserWarning, match="No tokens"):
        result = metric.compute()
    assert all(math.isnan(float(result[key])) for key in KEYS)
    assert int(result["num_tokens"]) == 0


def test_plot_is_a_log_log_figure_of_p_and_q():
    from matplotlib.figure import Figure

    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(*_data(9, tokens=400))
    fig = metric.plot(title="test")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("p_e" in label for label in labels) and any("q_e" in label for label in labels)
    p_line = ax.get_lines()[0]
    assert len(p_line.get_xdata()) == int((metric.rank_counts > 0).sum())


# ---------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, shards: list, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = CrossEntropyDecomposition(VOCAB, nan_strategy="ignore")
        for logits, target in shards[rank]:
            metric.update(logits, target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = metric.compute()
        # Deferred checks (validate_args=False): every state, the error counts included, synced before they judge.
        deferred = CrossEntropyDecomposition(VOCAB, validate_args=False, nan_strategy="ignore")
        for logits, target in shards[rank]:
            deferred.update(logits, _out_of_range(target, rank + 1))
        with deferred.sync_context():
            synced = {name: getattr(deferred, name).clone() for name in _STATES}
            try:
                deferred.raise_deferred_errors()
                error = ""
            except ValueError as err:
                error = str(err)
        torch.save({"result": dict(result) if rank == 0 else None, "synced": synced, "error": error},
                   out_path.replace(".pt", f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _out_of_range(target: torch.Tensor, count: int) -> torch.Tensor:
    """`target` with its first `count` scored positions set past the vocabulary."""
    bad = target.clone()
    bad[torch.nonzero(bad != -100).flatten()[:count]] = VOCAB + 5
    return bad


@pytest.mark.slow
def test_ddp_two_gloo_processes_with_uneven_shards_equal_single_process(tmp_path):
    logits, target = _data(10, tokens=70)
    target[::9] = -100
    logits[[10, 55, 61], 3] = math.nan  # one non-finite token on rank 0, two on rank 1: summed across ranks
    # Rank 0 gets 1 batch of 50 tokens, rank 1 one batch of 20: uneven shards, one update each.
    shards = [[(logits[:50], target[:50])], [(logits[50:], target[50:])]]
    out = tmp_path / "ddp.pt"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), shards, str(out)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"ddp{rank}.pt") for rank in range(2)]
    ddp = ranks[0]["result"]
    single = CrossEntropyDecomposition(VOCAB, nan_strategy="ignore")
    for shard in shards:
        for batch in shard:
            single.update(*batch)
    expected = single.compute()
    for key in (*KEYS, "num_tokens", "nonfinite_tokens", "p_e", "q_e"):
        assert torch.equal(ddp[key], expected[key]), key
    assert int(ddp["nonfinite_tokens"]) == 3
    # The deferred-error metric: each rank's state is the sum over ranks of what each rank alone accumulated
    # (numpy's counts for the finite, in-range tokens), the error counts included; both ranks raise on the total.
    logits_all, target_all = torch.cat([logits[:50], logits[50:]]), torch.cat(
        [_out_of_range(target[:50], 1), _out_of_range(target[50:], 2)])
    keep = (target_all >= 0) & (target_all < VOCAB) & torch.isfinite(logits_all).all(-1)
    ref = decompose(logits_all[keep].numpy(), target_all[keep].numpy())
    for rank in ranks:
        assert np.array_equal(rank["synced"]["rank_counts"].numpy(), ref["rank_counts"])
        np.testing.assert_allclose(rank["synced"]["rank_log_score_sum"].numpy(), ref["rank_log_score_sum"],
                                   rtol=1e-6)  # float32 logits
        assert int(rank["synced"]["nonfinite_tokens"]) == 3 and int(rank["synced"]["out_of_range_targets"]) == 3
        assert "was given 3 other target(s)" in rank["error"]
