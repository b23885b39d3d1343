"""Speed and memory of CrossEntropyDecomposition.update against F.cross_entropy on the same logits.

    python benchmarks/bench_metric.py            # the issue's three cases (CPU)
    python benchmarks/bench_metric.py --quick    # smaller, for a smoke run
    python benchmarks/bench_metric.py --bootstrap  # cost of the uncertainty state (two designs), see below

Time: the two are measured alternately in one process and the median ratio is printed (these machines are
noisy; ratios within one run are what we compare). Memory: each case runs in a fresh subprocess that first
materialises the logits, then reads the process's peak RSS before and after one call; the difference is the
extra peak memory of the call, printed as a fraction of the logits' bytes.
Targets: time ratio <= 0.75, extra memory <= 10% of the logits.

``--bootstrap``: update time with ``bootstrap=200`` over the same metric without it, measured alternately in one
run (target: <= 1.10 at V=50304, N=4096), for the chosen design (instances hashed into K=64 groups, resampled at
compute) and for the alternative (a streaming Poisson bootstrap: B Poisson(1) weights per instance from a
counter-based hash of (seed, id, replicate), accumulated into B x V states at update); and the extra state of each
at the paper's protocol (1000 instances x 512 tokens, V=50304), in memory and saved (targets 64 MB and 10 MB).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
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


BOOT_REPLICATES, BOOT_TIME_TARGET, BOOT_MEMORY_MB, BOOT_DISK_MB = 200, 1.10, 64, 10
_POISSON_CDF = torch.tensor([sum(math.exp(-1) / math.factorial(j) for j in range(k + 1)) for k in range(16)],
                            dtype=torch.float64)


def poisson_weights(instance_ids: torch.Tensor, replicates: int, seed: int = 0) -> torch.Tensor:
    """The alternative design: ``[instances, B]`` Poisson(1) weights from a counter-based hash of
    ``(seed, id, replicate)`` (independent of batch order, process count and resume), by inverse CDF."""
    from ce_dynamics.bootstrap import _mix32

    counter = instance_ids.to(torch.int64)[:, None] * replicates + torch.arange(replicates)
    u = _mix32((counter & 0xFFFFFFFF) ^ _mix32(torch.tensor(seed) ^ 0x9E3779B9)).to(torch.float64) / 2.0**32
    return (u[..., None] >= _POISSON_CDF).sum(-1)


class PoissonStreaming:
    """The alternative design's update: the per-token weights of B replicates, added into ``[B, V]`` states."""

    def __init__(self, vocab: int, replicates: int) -> None:
        self.counts = torch.zeros(replicates, vocab, dtype=torch.int64)
        self.sums = torch.zeros(replicates, vocab, dtype=torch.int64)
        self.metric = CrossEntropyDecomposition(vocab)
        self.replicates = replicates

    def update(self, logits: torch.Tensor, target: torch.Tensor, instance_ids: torch.Tensor) -> None:
        from ce_dynamics.bootstrap import FIXED_POINT
        from ce_dynamics.functional import token_pass

        tokens = token_pass(logits, target)
        self.metric.rank_counts.index_add_(0, tokens.ranks, torch.ones_like(tokens.ranks))
        self.metric.rank_log_score_sum.index_add_(0, tokens.ranks, tokens.log_scores.double())
        rows = torch.unique(instance_ids)
        weights = poisson_weights(rows, self.replicates)  # [instances, B]
        row_of = torch.searchsorted(rows, instance_ids.reshape(-1, 1).expand(target.shape).reshape(-1))
        w = weights[row_of[tokens.positions]]  # [tokens, B]
        vocab = self.counts.shape[1]
        flat = (torch.arange(self.replicates) * vocab)[None, :] + tokens.ranks[:, None]
        fixed = (tokens.log_scores.double() * FIXED_POINT).round().to(torch.int64)
        self.counts.view(-1).index_add_(0, flat.reshape(-1), w.reshape(-1))
        self.sums.view(-1).index_add_(0, flat.reshape(-1), (w * fixed[:, None]).reshape(-1))


def _bootstrap_times(tokens: int, vocab: int, repeats: int) -> dict[str, float]:
    logits, target = _inputs(tokens, vocab, torch.float32)
    seq = 512 if tokens >= 512 else tokens
    target = target.reshape(-1, seq)
    logits = logits.reshape(target.shape[0], seq, vocab)
    ids = torch.arange(target.shape[0])
    plain = CrossEntropyDecomposition(vocab)
    grouped = CrossEntropyDecomposition(vocab, bootstrap=BOOT_REPLICATES)
    poisson = PoissonStreaming(vocab, BOOT_REPLICATES)
    from ce_dynamics.bootstrap import accumulate_groups
    from ce_dynamics.functional import token_pass

    tokens = token_pass(logits, target)

    def groups_work() -> None:  # the bootstrap's own share of an update: the hash and one index_add per token
        groups = grouped._row_groups(target, ids)[tokens.positions]
        accumulate_groups(tokens.ranks, tokens.log_scores, groups, torch.isfinite(tokens.log_scores),
                          grouped.group_rank_counts, grouped.group_rank_log_score_sum)

    runs = {"plain": lambda: plain.update(logits, target), "groups": lambda: grouped.update(logits, target, ids),
            "poisson": lambda: poisson.update(logits, target, ids), "groups_work": groups_work}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def _saved_megabytes(state: dict) -> float:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **state)
    return buffer.tell() / 2**20


def _protocol_sizes(vocab: int, instances: int = 1000, seq: int = 512) -> dict[str, float]:
    """Extra state in memory and on disk at the paper's protocol, ranks from a trained LM's heavy-tailed law
    (accuracy ~0.45, p_e ~ (e + 1)^-1.3: the shape of the paper's fig. 6) and, for the disk, all ranks distinct
    (the worst case: one entry per token)."""
    from ce_dynamics.bootstrap import DEFAULT_GROUPS, instance_groups, pack_group_state

    gen = torch.Generator().manual_seed(0)
    law = (torch.arange(vocab, dtype=torch.float64) + 1) ** -1.3
    law[0] = law[1:].sum() * 0.45 / 0.55
    ranks = torch.multinomial(law / law.sum(), instances * seq, replacement=True, generator=gen)
    log_scores = -torch.rand(instances * seq, generator=gen, dtype=torch.float64) * 10
    groups = instance_groups(torch.arange(instances).repeat_interleave(seq), DEFAULT_GROUPS)
    sizes = {"groups_memory": 2 * DEFAULT_GROUPS * vocab * 8 / 2**20,
             "poisson_memory": 2 * BOOT_REPLICATES * vocab * 8 / 2**20}
    for label, r in (("", ranks), ("_worst", torch.randperm(instances * seq, generator=gen) % vocab)):
        from ce_dynamics.bootstrap import accumulate_groups

        counts = torch.zeros(DEFAULT_GROUPS, vocab, dtype=torch.int64)
        sums = torch.zeros_like(counts)
        accumulate_groups(r, log_scores, groups, None, counts, sums)
        sizes[f"groups_disk{label}"] = _saved_megabytes(pack_group_state(counts, sums, BOOT_REPLICATES, 0))
        if not label:  # compute(): the B replicates (and the half-sample readout) from the K x V state
            from ce_dynamics.bootstrap import bootstrap_summary

            start = time.perf_counter()
            bootstrap_summary(counts, sums, BOOT_REPLICATES)
            sizes["groups_compute_s"] = time.perf_counter() - start
    weights = poisson_weights(torch.arange(instances), BOOT_REPLICATES)  # [instances, B]
    per_instance = torch.zeros(instances, vocab, dtype=torch.int64)
    per_instance.view(-1).index_add_(0, torch.arange(instances).repeat_interleave(seq) * vocab + ranks,
                                     torch.ones_like(ranks))
    nonzero = int(((weights.T.double() @ per_instance.double()) > 0).sum())  # entries of the B x V counts
    sizes["poisson_disk"] = nonzero * 16 / 2**20
    return sizes


def bootstrap_main(tokens: int, repeats: int) -> int:
    vocab = 50304
    print(f"uncertainty state, update with bootstrap={BOOT_REPLICATES} vs without, CPU, "
          f"{torch.get_num_threads()} threads, N={tokens}, V={vocab}")
    t = _bootstrap_times(tokens, vocab, repeats)
    sizes = _protocol_sizes(vocab)
    ratio_groups, ratio_poisson = t["groups"] / t["plain"], t["poisson"] / t["plain"]
    print(f"{'design':>28} {'update ms':>9} {'ratio':>6} {'memory MB':>9} {'saved MB':>9}")
    print(f"{'none':>28} {t['plain'] * 1e3:>9.1f} {1:>6.3f} {0:>9.1f} {0:>9.1f}")
    print(f"{'K=64 groups (chosen)':>28} {t['groups'] * 1e3:>9.1f} {ratio_groups:>6.3f} "
          f"{sizes['groups_memory']:>9.1f} {sizes['groups_disk']:>9.2f}  (worst case {sizes['groups_disk_worst']:.2f})")
    print(f"{'streaming Poisson, B=200':>28} {t['poisson'] * 1e3:>9.1f} {ratio_poisson:>6.3f} "
          f"{sizes['poisson_memory']:>9.1f} {sizes['poisson_disk']:>9.2f}  (sparse, uncompressed)")
    ok = (ratio_groups <= BOOT_TIME_TARGET and sizes["groups_memory"] <= BOOT_MEMORY_MB
          and sizes["groups_disk_worst"] <= BOOT_DISK_MB)
    print(f"the chosen design's own work per update (hash + index_add), timed alone: {t['groups_work'] * 1e3:.2f} ms "
          f"= {t['groups_work'] / t['plain']:.2%} of the update")
    print(f"compute() of the chosen design at the protocol (B={BOOT_REPLICATES}): {sizes['groups_compute_s']:.2f} s "
          "once per validation")
    print(f"targets (chosen design): ratio <= {BOOT_TIME_TARGET}, memory <= {BOOT_MEMORY_MB} MB, saved <= "
          f"{BOOT_DISK_MB} MB per set: {'met' if ok else 'NOT met'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="512 tokens, 3 repeats")
    parser.add_argument("--bootstrap", action="store_true", help="cost of the uncertainty state")
    parser.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bootstrap:
        return bootstrap_main(args.tokens, args.repeats)
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
