"""The Triton backend against independent references and the torch backend.

Without CUDA the kernel runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton), which is slow: shapes stay small, and a lowered block size makes small rows cross many
block boundaries.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 before triton is imported (conftest.py sets it)",
                allow_module_level=True)

from ce_dynamics import CrossEntropyDecomposition  # noqa: E402
from ce_dynamics import kernels  # noqa: E402
from ce_dynamics.functional import token_ranks_and_log_scores  # noqa: E402
from ce_dynamics.kernels import triton_rank  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf/NaN notes in the interpreter


def _randn(*shape: int, seed: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _targets(shape: tuple[int, ...], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed + 1))


def _numpy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Strict ranks and log-scores of the counted positions, in float64 numpy (inputs upcast exactly)."""
    z = logits.detach().cpu().double().numpy().reshape(-1, logits.shape[-1])
    t = target.cpu().numpy().reshape(-1)
    keep = t != ignore_index
    z, t = z[keep], t[keep]
    z_t = z[np.arange(len(t)), t]
    m = z.max(axis=1)
    log_scores = z_t - (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))
    return (z > z_t[:, None]).sum(axis=1), log_scores


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    if name == "random fp32, odd width":
        logits, target = _randn(2, 5, 37, seed=0), _targets((2, 5), 37, 0)
    elif name == "tied integer values":
        logits = torch.randint(-3, 4, (12, 50), generator=torch.Generator().manual_seed(1)).float()
        target = _targets((12,), 50, 1)
    elif name == "bf16":
        logits, target = _randn(8, 301, seed=2, scale=1.0, dtype=torch.bfloat16), _targets((8,), 301, 2)
    elif name == "fp16":
        logits, target = _randn(8, 301, seed=3, dtype=torch.float16), _targets((8,), 301, 3)
    elif name == "ignore_index":
        logits, target = _randn(2, 6, 41, seed=4), _targets((2, 6), 41, 4)
        target[0, :3] = -100
        target[1, 4] = -100
        return logits, target, -100
    elif name == "ignore_index is a token id":
        logits, target = _randn(12, 41, seed=5), _targets((12,), 41, 5)
        target[[2, 9]] = 7
        return logits, target, 7
    elif name == "logits[:, :-1] view":
        full, target = _randn(2, 5, 41, seed=6), _targets((2, 5), 41, 6)
        logits, target = full[:, :-1], target[:, 1:]
        assert not logits.is_contiguous()
    elif name == "3 unmergeable leading dims":
        logits, target = _randn(2, 4, 3, 23, seed=7)[:, 1:, :-1], _targets((2, 3, 2), 23, 7)
        assert triton_rank._row_layout(logits) is None  # the per-row offsets path
    elif name == "column stride":
        logits, target = _randn(29, 8, seed=8).T, _targets((8,), 29, 8)
        assert logits.stride(-1) == 8
    elif name == "zero-dim target":
        logits, target = _randn(19, seed=9), torch.tensor(4)
    else:
        raise KeyError(name)
    return logits, target, -100


CASES = [
    "random fp32, odd width", "tied integer values", "bf16", "fp16", "ignore_index", "ignore_index is a token id",
    "logits[:, :-1] view", "3 unmergeable leading dims", "column stride", "zero-dim target",
]


# Blocks of 16 columns: rows of 23 to 50 columns cross 2 to 4 blocks, with a partial last one.
SMALL_BLOCK_CASES = ["random fp32, odd width", "tied integer values", "logits[:, :-1] view", "3 unmergeable leading dims"]


@pytest.mark.parametrize(
    ("case", "block"),
    [(case, None) for case in CASES] + [(case, 16) for case in SMALL_BLOCK_CASES] + [("column stride", "int64")],
)
def test_triton_matches_numpy_and_the_torch_backend(case, block, monkeypatch):
    if block == "int64":  # column offsets computed in int64, as past 2**31 elements of column stride x width
        monkeypatch.setattr(triton_rank, "INT32_LIMIT", 8)
    elif block is not None:
        monkeypatch.setattr(triton_rank, "MAX_BLOCK", block)
    logits, target, ignore_index = _case(case)
    logits, target = logits.to(DEVICE), target.to(DEVICE)
    ranks, scores = token_ranks_and_log_scores(logits, target, ignore_index, backend="triton")
    torch_ranks, torch_scores = token_ranks_and_log_scores(logits, target, ignore_index, backend="torch")
    expected_ranks, expected_scores = _numpy_reference(logits, target, ignore_index)
    np.testing.assert_array_equal(ranks.cpu().numpy(), expected_ranks)
    assert torch.equal(ranks, torch_ranks)
    np.testing.assert_allclose(scores.cpu().numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, torch_scores, rtol=0, atol=1e-5)
    if case == "tied integer values":
        assert (expected_ranks > 0).any() and len(np.unique(logits.numpy())) < 8  # ties do occur


def test_wide_rows_beyond_262144_columns():
    vocab = 262_147  # not a multiple of any block; 33 blocks of 8192
    logits = _randn(2, vocab, seed=10, scale=2.0, dtype=torch.float16)
    logits[1] = 0  # every column equal: the sum of exp (262147) overflows fp16, not the fp32 accumulator
    target = torch.tensor([vocab - 1, 123_456])
    ranks, scores = token_ranks_and_log_scores(logits.to(DEVICE), target.to(DEVICE), backend="triton")
    expected_ranks, expected_scores = _numpy_reference(logits, target, -100)
    np.testing.assert_array_equal(ranks.cpu().numpy(), expected_ranks)
    np.testing.assert_allclose(scores.cpu().numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(scores[1]), -math.log(vocab), rel_tol=1e-6)


def test_non_finite_rows_follow_torch_log_softmax(monkeypatch):
    monkeypatch.setattr(triton_rank, "MAX_BLOCK", 16)
    logits = _randn(7, 40, seed=11)
    target = torch.tensor([1, 2, 3, 4, 5, 35, 39])
    logits[0, 30] = math.nan
    logits[1, 35] = math.inf
    logits[2, 3] = math.inf  # at the target
    logits[3, 4] = -math.inf  # the target's logit
    logits[4] = -math.inf  # a whole row
    logits[5, :32] = -math.inf  # two -inf blocks before the finite ones (exp(-inf - -inf) must not appear)
    logits[6, 16:] = -math.inf  # the target alone in a -inf block
    logits[6, 39] = 0.5
    target_dev = target.to(DEVICE)
    _, scores = triton_rank.launch(logits.to(DEVICE), target_dev, -100)
    expected = torch.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(scores.cpu(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(scores[[0, 1, 2, 4]]).all() and float(scores[3]) == -math.inf
    assert torch.isfinite(scores[5:]).all()


def _with_value(value: float, row: int, col: int | None = None):
    def make():
        logits, target = _randn(6, 23, seed=12), _targets((6,), 23, 12)
        logits[row, int(target[row]) if col is None else col] = value
        return logits, target
    return make


def _target_at(value: int, row: int):
    def make():
        logits, target = _randn(6, 23, seed=12), _targets((6,), 23, 12)
        target[row] = value
        return logits, target
    return make


BAD = {
    "target too large": _target_at(23, 4),
    "negative target": _target_at(-1, 0),
    "nan logits": _with_value(math.nan, 3, 5),
    "+inf logits": _with_value(math.inf, 2, 0),
    "-inf target logit": _with_value(-math.inf, 1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_the_torch_backends_error(case):
    logits, target = BAD[case]()
    messages = []
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError) as info:
            token_ranks_and_log_scores(logits.to(DEVICE), target.to(DEVICE), backend=backend)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "position" in messages[0]


SYNC_METHODS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _record_host_syncs(calls: list[str]):
    """Record every tensor -> Python value conversion (each one a host synchronisation on a GPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    saved_nonzero = torch.nonzero

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, spy(name, fn))
        torch.nonzero = spy("torch.nonzero", saved_nonzero)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = saved_nonzero


@pytest.mark.parametrize("validate_args", [False, True])
def test_metric_update_on_triton_without_validation_never_reads_a_tensor_on_the_host(validate_args):
    logits, target = _randn(2, 6, 31, seed=13)[:, :-1], _targets((2, 5), 31, 13)
    target[0, 0] = -100
    metric = CrossEntropyDecomposition(31, backend="triton", validate_args=validate_args, nan_strategy="ignore")
    metric.update(logits.to(DEVICE), target.to(DEVICE))  # warm-up: imports, kernel definition
    calls: list[str] = []
    with _record_host_syncs(calls):
        metric.update(logits.to(DEVICE), target.to(DEVICE))
    if validate_args:
        assert calls  # the detector sees the checks' synchronisations
    else:
        assert calls == []
    assert int(metric.compute()["num_tokens"]) == 2 * 9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_cuda_update_without_validation_does_not_synchronise():
    logits = _randn(64, 1000, seed=14, dtype=torch.bfloat16).cuda()
    target = _targets((64,), 1000, 14).cuda()
    metric = CrossEntropyDecomposition(1000, validate_args=False, nan_strategy="ignore").cuda()
    metric.update(logits, target)
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(logits, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_metric_on_triton_equals_metric_on_torch_with_nonfinite_and_bad_targets():
    logits, target = _randn(20, 29, seed=15), _targets((20,), 29, 15)
    logits[[3, 17], 5] = math.nan
    logits[11, int(target[11])] = -math.inf
    target[[8, 9]] = -100
    target[12] = 29  # outside [0, V): counted as out of range, not decomposed
    states = []
    for backend in ("torch", "triton"):
        metric = CrossEntropyDecomposition(29, backend=backend, validate_args=False, nan_strategy="ignore")
        metric.update(logits.to(DEVICE), target.to(DEVICE))
        states.append((metric.rank_counts.cpu(), metric.rank_log_score_sum.cpu(),
                       int(metric.nonfinite_tokens), int(metric.out_of_range_targets)))
    (counts, sums, nonfinite, out_of_range), (t_counts, t_sums, t_nonfinite, t_out_of_range) = states
    assert torch.equal(counts, t_counts) and int(counts.sum()) == 20 - 2 - 3 - 1
    torch.testing.assert_close(sums, t_sums, rtol=0, atol=1e-4)
    assert (nonfinite, out_of_range) == (t_nonfinite, t_out_of_range) == (3, 1)


def test_auto_takes_torch_for_cpu_and_float64_always_takes_torch(monkeypatch):
    used: list[str] = []
    real = kernels.ranks_and_log_scores_triton

    def spy(*args, **kwargs):
        used.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "ranks_and_log_scores_triton", spy)
    logits, target = _randn(5, 11, seed=16), _targets((5,), 11, 16)
    token_ranks_and_log_scores(logits.double(), target, backend="triton")
    assert used == []
    token_ranks_and_log_scores(logits, target, backend="triton")
    assert used == ["triton"]
    token_ranks_and_log_scores(logits, target, backend="auto")  # CPU tensors
    assert used == ["triton"]


def test_unknown_backend_is_refused():
    logits, target = _randn(2, 5, seed=17), _targets((2,), 5, 17)
    with pytest.raises(ValueError, match=r"`backend` to be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        token_ranks_and_log_scores(logits, target, backend="cuda")
    with pytest.raises(ValueError, match="`backend` to be one of"):
        CrossEntropyDecomposition(5, backend="Triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for CPU tensors without a GPU")
def test_triton_on_cpu_without_the_interpreter_says_how_to_run_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from ce_dynamics.functional import token_ranks_and_log_scores\n"
        "try:\n"
        "    token_ranks_and_log_scores(torch.zeros(2, 5), torch.tensor([0, 1]), backend='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "backend='triton' runs on CUDA tensors, got logits on cpu" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_triton_backend_without_triton_installed_is_refused_at_construction(monkeypatch):
    import ce_dynamics.metric as metric_module

    monkeypatch.setattr(metric_module, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'ce-dynamics\[gpu\]'"):
        CrossEntropyDecomposition(5, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrossEntropyDecomposition(5, backend="auto")  # auto falls back to torch silently


_COMPILE_FOR_SM90 = """
import re, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:
    print("NO-COMPILER-API", error); sys.exit(0)
from ce_dynamics.kernels.triton_rank import _rank_log_score_kernel as kernel
signature = {"logits_ptr": "*bf16", "row_offsets_ptr": "*i64", "target_ptr": "*i64", "ranks_ptr": "*i64",
             "scores_ptr": "*fp32", "vocab_size": "i32", "inner_rows": "i32", "outer_stride": "i64",
             "inner_stride": "i64", "col_stride": "constexpr", "ignore_index": "i32",
             "USE_ROW_OFFSETS": "constexpr", "WIDE_COLUMNS": "constexpr", "BLOCK": "constexpr"}
# What a launch on rows of 50304 bf16 logits specialises: 16-aligned pointers, sizes and strides, unit columns.
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7, 8)}
constants = {"col_stride": 1, "USE_ROW_OFFSETS": False, "WIDE_COLUMNS": False, "BLOCK": 8192}
try:
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
except TypeError as error:
    print("NO-COMPILER-API", error); sys.exit(0)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
print(sorted(set(re.findall(r"ld\\.global[.\\w]*", compiled.asm["ptx"]))))
"""


def test_kernel_compiles_for_sm90_with_vectorised_loads():
    # The interpreter accepts code that the compiler refuses; compile for an H100 (no GPU needed, Triton ships
    # ptxas) and check that the row is read with 16-byte vector loads (8 bf16 logits per load).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                         timeout=300)
    if "NO-COMPILER-API" in out.stdout:
        pytest.skip(f"this Triton's compiler API differs: {out.stdout.strip()}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ld.global.v4.b32" in out.stdout, out.stdout
