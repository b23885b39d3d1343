"""GPU: CrossEntropyDecomposition.update against F.cross_entropy on the same logits, and a Lightning validation
of a Pythia-160M-shaped model with and without CEDecompositionCallback.

    python benchmarks/bench_gpu.py            # the issue's grid, then the validation (a few minutes on an H100)
    python benchmarks/bench_gpu.py --quick    # one case and a short validation, for a smoke run

On a machine without CUDA it says so and exits 0 (nothing is measured).

Update rows, for V in {50304, 151936} x {bf16, fp32} x N in {4096, 16384}: the metric as the callback runs it on
a GPU (``validate_args=False, nan_strategy="ignore"``), with the Triton backend and with the torch backend, timed
with CUDA events against ``F.cross_entropy`` (medians of alternating calls). Bandwidth: bytes of logits read
once / time, against the device's peak (2 x memory clock x bus width, from the CUDA device properties) and
against a measured device-to-device copy (bytes read + written / time). Extra memory: peak allocated during
one call above what was allocated before it, as a share of the logits.

Validation rows: ``trainer.validate`` of a randomly initialised GPT-NeoX with Pythia-160M's shape (bf16-mixed,
random tokens, ``--sequences`` x 512 tokens in batches of ``--batch-size``), with and without the callback
(CSV logger for both), alternating, median of per-round ratios.

Targets (issue 14): update <= 0.5 x F.cross_entropy; >= 80% of peak bandwidth at N x V >= 2**30; extra memory
<= 1% of the logits; validation with the callback <= 1.05 x without it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.kernels import triton_available

VOCABS = (50304, 151936)
DTYPES = (torch.bfloat16, torch.float32)
TOKENS = (4096, 16384)
PYTHIA_160M = dict(  # configs/experiment/pythia160m.yaml's model shape
    vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
    tie_word_embeddings=False, layer_norm_eps=1e-5, initializer_range=0.02,
)
SEQ_LEN = 512


def peak_bandwidth(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s (double data rate x bus width), None where CUDA does not say."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def _cuda_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def alternating_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median milliseconds of each function, called in turn ``repeats`` times after one warm-up call each."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            bucket.append(_cuda_ms(fn))
    return [statistics.median(bucket) for bucket in times]


def extra_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second (2 GiB copied)."""
    src = torch.empty(2**29, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    (ms,) = alternating_medians([lambda: dst.copy_(src)], 5)
    return 2 * 2**31 / (ms / 1e3)


def update_row(device: torch.device, vocab: int, dtype: torch.dtype, tokens: int, repeats: int,
               peak: float | None, copy_bw: float) -> str:
    """One table row: the update (Triton and torch backends) against F.cross_entropy on one logits tensor."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
    target = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    nbytes = logits.numel() * logits.element_size()
    metrics = {
        backend: CrossEntropyDecomposition(vocab, backend=backend, validate_args=False,
                                           nan_strategy="ignore").to(device)
        for backend in (("triton", "torch") if triton_available() else ("torch",))
    }
    calls = [lambda: F.cross_entropy(logits, target)]
    calls += [lambda m=metric: m.update(logits, target) for metric in metrics.values()]
    medians = alternating_medians(calls, repeats)
    ce_ms, update_ms = medians[0], dict(zip(metrics, medians[1:]))
    main = "triton" if "triton" in metrics else "torch"
    extra = extra_peak_bytes(lambda: metrics[main].update(logits, target)) / nbytes
    achieved = nbytes / (update_ms[main] / 1e3)
    peak_share = f"{achieved / peak:>6.0%}" if peak else f"{'?':>6}"
    torch_cols = f"{update_ms['torch']:>8.2f} {update_ms['torch'] / ce_ms:>6.2f}"
    triton_cols = (f"{update_ms['triton']:>9.2f} {update_ms['triton'] / ce_ms:>6.2f}" if "triton" in update_ms
                   else f"{'-':>9} {'-':>6}")
    return (
        f"{vocab:>7} {str(dtype).removeprefix('torch.'):>8} {tokens:>6} {nbytes / 1e9:>7.2f} {ce_ms:>8.2f} "
        f"{triton_cols} {torch_cols} {achieved / 1e9:>7.0f} {peak_share} {achieved / copy_bw:>6.0%} {extra:>7.2%}"
    )


def update_rows(device: torch.device, grid: list[tuple[int, torch.dtype, int]], repeats: int,
                peak: float | None, copy_bw: float) -> list[str]:
    rows = []
    for vocab, dtype, tokens in grid:
        rows.append(update_row(device, vocab, dtype, tokens, repeats, peak, copy_bw))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()  # the case's logits are gone: give the next case the whole device
    return rows


def validation_ratio(device: torch.device, sequences: int, batch_size: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds of ``trainer.validate`` without and with the callback, and the median per-round ratio."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from ce_dynamics import CEDecompositionCallback
    from ce_dynamics.runs.module import CausalLMModule

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, PYTHIA_160M["vocab_size"], (sequences, SEQ_LEN + 1), generator=gen)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in tokens], batch_size=batch_size)
    module = CausalLMModule(model_config=PYTHIA_160M)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))

    def run(with_callback: bool, index: int) -> float:
        callbacks = [CEDecompositionCallback(output_dir=tmp / f"cb{index}")] if with_callback else []
        trainer = L.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                            precision="bf16-mixed",
                            logger=CSVLogger(tmp, name=f"run{index}"), callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.validate(module, loader, verbose=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(False, -1)  # warm-up: CUDA context, cuBLAS, Triton compilation
    run(True, -2)
    without, with_cb = [], []
    for index in range(rounds):
        without.append(run(False, 2 * index))
        with_cb.append(run(True, 2 * index + 1))
    ratios = [b / a for a, b in zip(without, with_cb)]
    return statistics.median(without), statistics.median(with_cb), statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per update case")
    parser.add_argument("--rounds", type=int, default=3, help="validation pairs")
    parser.add_argument("--sequences", type=int, default=256, help="validation sequences of 512 tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="V=50304 bf16 N=4096 only; 64 sequences, 1 round")
    parser.add_argument("--no-validation", action="store_true", help="skip the Lightning validation rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "nothing measured. Run `python benchmarks/bench_gpu.py` on a machine with an NVIDIA GPU.")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    grid = [(v, d, n) for v in VOCABS for d in DTYPES for n in TOKENS]
    if args.quick:
        grid, args.sequences, args.rounds = [(50304, torch.bfloat16, 4096)], 64, 1
    peak = peak_bandwidth(device)
    copy_bw = copy_bandwidth(device)
    peak_text = f"peak DRAM bandwidth {peak / 1e9:.0f} GB/s" if peak else "peak DRAM bandwidth unknown"
    triton_text = "triton importable" if triton_available() else "triton NOT importable: torch backend only"
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; {triton_text}; {peak_text}; "
          f"measured copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    header = (f"{'V':>7} {'dtype':>8} {'N':>6} {'GB':>7} {'F.ce ms':>8} {'triton ms':>9} {'ratio':>6} "
              f"{'torch ms':>8} {'ratio':>6} {'GB/s':>7} {'%peak':>6} {'%copy':>6} {'extra':>7}")
    print(header)
    print("-" * len(header))
    update_rows(device, grid, args.repeats, peak, copy_bw)
    if not args.no_validation:
        without, with_cb, ratio = validation_ratio(device, args.sequences, args.batch_size, args.rounds)
        print("-" * len(header))
        print(f"validation, Pythia-160M shape, bf16-mixed, {args.sequences} x {SEQ_LEN} tokens: without callback "
              f"{without:.2f} s, with {with_cb:.2f} s, ratio {ratio:.3f} (median of {args.rounds})")
    print("targets: update ratio <= 0.5; >= 80% of peak at N x V >= 2**30; extra <= 1% of the logits; "
          "validation ratio <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
