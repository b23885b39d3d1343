"""Speed and memory of CrossEntropyDecomposition.update against F.cross_entropy on the same logits.

    python benchmarks/bench_metric.py            # the issue's three cases (CPU)
    python benchmarks/bench_metric.py --quick    # smaller, for a smoke run

Time: the two are measured alternately in one process and the median ratio is printed (these machines are
noisy; ratios within one run are what we compare). Memory: each case runs in a fresh subprocess that first
materialises the logits, then reads the process's peak RSS before and after one call; the difference is the
extra peak memory of the call, printed as a fraction of the logits' bytes.
Targets: time ratio <= 0.75, extra memory <= 10% of the logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ce_dynamics import CrossEntropyDecomposition

CASES = [(50304, torch.float32), (151936, torch.float32), (50304, torch.bfloat16)]
TIME_TARGET, MEMORY_TARGET = 0.75, 0.10


def _inputs(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Filled in place: no temporary pushes the process's peak memory above the logits themselves.
    logits = torch.empty(tokens, vocab, dtype=dtype).normal_(0.0, 2.0, generator=gen)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    return logits, target


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: "5" resets this address space's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this address space (fresh after exec). getrusage's ru_maxrss would not do: Linux carries
    # the parent's peak across fork + exec, and the parent holds gigabytes of logits.
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory benchmark needs Linux")


def _memory_case(tokens: int, vocab: int, dtype_name: str, which: str) -> None:
    """Child process: print the extra peak RSS of one call, in bytes."""
    logits, target = _inputs(tokens, vocab, getattr(torch, dtype_name))
    metric = CrossEntropyDecomposition(vocab)
    metric.update(logits[:64], target[:64])  # worker threads and allocator warmed up, as in a running job
    F.cross_entropy(logits[:64], target[:64])
    _reset_peak_rss()
    before = _peak_rss_bytes()
    if which == "update":
        metric.update(logits, target)
    else:
        F.cross_entropy(logits, target)
    print(json.dumps({"extra": _peak_rss_bytes() - before, "logits": logits.numel() * logits.element_size()}))


def _extra_memory(tokens: int, vocab: int, dtype: torch.dtype, which: str) -> float:
    dtype_name = str(dtype).removeprefix("torch.")
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", str(tokens), str(vocab), dtype_name, which],
        check=True,
        capture_output=True,
        text=True,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return record["extra"] / record["logits"]


def _time_case(tokens: int, vocab: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    logits, target = _inputs(tokens, vocab, dtype)
    metric = CrossEntropyDecomposition(vocab)
    metric.update(logits, target)  # warm-up
    F.cross_entropy(logits, target)
    ce_times, update_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        F.cross_entropy(logits, target)
        ce_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        metric.update(logits, target)
        update_times.append(time.perf_counter() - start)
    return statistics.median(ce_times), statistics.median(update_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="512 tokens, 3 repeats")
    parser.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        tokens, vocab, dtype_name, which = args._memory
        _memory_case(int(tokens), int(vocab), dtype_name, which)
        return 0
    tokens, repeats = (512, 3) if args.quick else (args.tokens, args.repeats)

    print(f"CrossEntropyDecomposition.update vs F.cross_entropy, CPU, {torch.get_num_threads()} threads, N={tokens}")
    header = f"{'V':>7} {'dtype':>9} {'logits MB':>9} {'F.ce ms':>8} {'update ms':>9} {'time ratio':>10} " \
             f"{'extra mem':>9} {'F.ce mem':>8}"
    print(header)
    print("-" * len(header))
    ok = True
    for vocab, dtype in CASES:
        ce_s, update_s = _time_case(tokens, vocab, dtype, repeats)
        ratio = update_s / ce_s
        extra = _extra_memory(tokens, vocab, dtype, "update")
        ce_extra = _extra_memory(tokens, vocab, dtype, "cross_entropy")
        ok &= ratio <= TIME_TARGET and extra <= MEMORY_TARGET
        size_mb = tokens * vocab * torch.finfo(dtype).bits / 8 / 2**20
        print(
            f"{vocab:>7} {str(dtype).removeprefix('torch.'):>9} {size_mb:>9.0f} {ce_s * 1e3:>8.1f} "
            f"{update_s * 1e3:>9.1f} {ratio:>10.3f} {extra:>9.1%} {ce_extra:>8.1%}"
        )
    print(f"targets: time ratio <= {TIME_TARGET}, extra memory <= {MEMORY_TARGET:.0%} of the logits: "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
