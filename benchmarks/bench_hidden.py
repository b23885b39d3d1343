"""update_from_hidden against `hidden @ weight.T` then `update`, and the DTensor path against one process.

    python benchmarks/bench_hidden.py            # N = 8192, H = 128, V = 50304, fp32, CPU (the issue's case)
    python benchmarks/bench_hidden.py --quick    # N = 2048, for a smoke run

Time: both variants alternate in one process; the median of the per-pair ratios is printed. Memory: each variant
runs in a fresh subprocess that builds its inputs, resets its peak RSS (VmHWM), makes one call and prints the
peak's rise, as a share of the logits' bytes (the baseline's rise includes the logits it builds).
DTensor: 2 gloo processes hold the logits sharded on the vocabulary; their synced state is compared with one
process's `update` on the full logits (rank counts equal, log-score sums to a relative difference).
Targets: time ratio <= 1.2, extra memory <= 10% of the logits, DTensor sums within 1e-9 (float64 logits).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ce_dynamics import CrossEntropyDecomposition

HIDDEN, VOCAB = 128, 50304


def _inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5
    return hidden, weight, torch.randint(0, VOCAB, (tokens,), generator=gen)


def _baseline(metric: CrossEntropyDecomposition, hidden, weight, target) -> None:
    metric.update(hidden @ weight.T, target)


def _from_hidden(metric: CrossEntropyDecomposition, hidden, weight, target) -> None:
    metric.update_from_hidden(hidden, weight, target)


VARIANTS = {"matmul+update": _baseline, "update_from_hidden": _from_hidden}


def _peak_rss_bytes(key: str = "VmHWM:") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory benchmark needs Linux")


def _memory_child(tokens: int, variant: str) -> None:
    hidden, weight, target = _inputs(tokens)
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update_from_hidden(hidden[:64], weight, target[:64])  # warm up torch's allocations
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _peak_rss_bytes("VmRSS:")
    VARIANTS[variant](metric, hidden, weight, target)
    print(json.dumps({"extra": _peak_rss_bytes() - before}))


def _extra_memory(tokens: int, variant: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", variant, "--tokens", str(tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dtensor_worker(rank: int, port: int, tokens: int, dtype_name: str, out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        gen = torch.Generator().manual_seed(1)
        logits = (torch.randn(tokens, VOCAB, generator=gen) * 3).to(getattr(torch, dtype_name))
        target = torch.randint(0, VOCAB, (tokens,), generator=gen)
        sharded = distribute_tensor(logits, mesh, [Shard(-1)])
        own_group = [dist.new_group([r]) for r in range(2)][rank]  # data-parallel group of a tp-only mesh
        metric = CrossEntropyDecomposition(VOCAB, process_group=own_group)
        start = time.perf_counter()
        metric.update(sharded, target)
        seconds = time.perf_counter() - start
        with metric.sync_context():
            if rank == 0:
                torch.save({"counts": metric.rank_counts, "sums": metric.rank_log_score_sum, "seconds": seconds,
                            "logits": logits, "target": target}, out_path)
    finally:
        dist.destroy_process_group()


def _dtensor_check(tokens: int, dtype_name: str, tmp: str) -> dict:
    path = os.path.join(tmp, f"dtensor_{dtype_name}.pt")
    mp.start_processes(_dtensor_worker, args=(_free_port(), tokens, dtype_name, path), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(path)
    single = CrossEntropyDecomposition(VOCAB)
    single.update(got["logits"], got["target"])
    expected = float(single.rank_log_score_sum.sum())
    return {"counts_equal": bool(torch.equal(got["counts"], single.rank_counts)),
            "sum_rel_diff": abs(float(got["sums"].sum()) - expected) / abs(expected),
            "bin_max_rel_diff": float(((got["sums"] - single.rank_log_score_sum).abs()
                                       / single.rank_log_score_sum.abs().clamp_min(1e-300)).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (2048 if args.quick else 8192)
    if args.memory_child:
        _memory_child(tokens, args.memory_child)
        return

    hidden, weight, target = _inputs(tokens)
    logits_bytes = tokens * VOCAB * 4
    print(f"N = {tokens}, H = {HIDDEN}, V = {VOCAB}, float32, CPU, {torch.get_num_threads()} threads; "
          f"logits {logits_bytes / 1e6:.0f} MB")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    metric = CrossEntropyDecomposition(VOCAB)
    for name, fn in VARIANTS.items():  # warm-up
        fn(metric, hidden[:256], weight, target[:256])
    for repeat in range(args.repeats):
        order = list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            start = time.perf_counter()
            VARIANTS[name](metric, hidden, weight, target)
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["update_from_hidden"], times["matmul+update"])]
    for name, values in times.items():
        print(f"  {name:20s} median {statistics.median(values) * 1e3:8.0f} ms "
              f"(min {min(values) * 1e3:.0f}, max {max(values) * 1e3:.0f})")
    print(f"  time ratio update_from_hidden / (matmul + update): median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target <= 1.2)")
    for name in VARIANTS:
        extra = _extra_memory(tokens, name)
        print(f"  extra peak memory, {name:20s}: {extra / 1e6:7.1f} MB = {extra / logits_bytes:6.1%} of the logits"
              + ("  (target <= 10%)" if name == "update_from_hidden" else ""))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for dtype_name in ("float64", "float32"):
            check = _dtensor_check(min(tokens, 1024), dtype_name, tmp)
            print(f"  DTensor Shard(-1), 2 gloo processes, {min(tokens, 1024)} tokens, {dtype_name}: rank counts "
                  f"equal: {check['counts_equal']}, log-score sum rel. diff {check['sum_rel_diff']:.1e}, "
                  f"max per-rank-bin rel. diff {check['bin_max_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
