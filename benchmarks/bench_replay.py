"""Cost of the decomposition in replay: one checkpoint replayed with CEDecompositionCallback (the replay
path: metric updates, W&B scalars, histograms and p_e-vs-q_e image, npz arrays, result rows) against a plain
`trainer.validate` of the same model, data and loggers without the callback.

    python benchmarks/bench_replay.py            # Pythia-70M shape (hidden 512, 6 layers, 50304 logits),
                                                 # 2 eval sets x 8 x 512 tokens, CPU: ~2 min on 2 cores
    python benchmarks/bench_replay.py --quick    # Pythia-14M shape, fewer tokens, for a smoke run

The model is stored in a local hub cache (tests/hub_cache.py) and loaded offline with
`from_pretrained(hub_id, revision="step0")`, as replay does. The two are timed alternately in one process and
the median ratio is printed (pairs alternate their order; these machines are noisy, so only ratios within
one run are compared). Target <= 1.10.

    python benchmarks/bench_replay.py --throughput   # tokens/s per revision, 1 process vs 2 (DDP, gloo), and
                                                     # the plan's estimate of the paper's Table 4 study

Throughput: `train.py mode=replay` over 4 revisions of a Pythia-14M-shaped model (50304 logits) from a local hub
cache, as real processes: one process with 1 torch thread, then `trainer.devices=2 trainer.strategy=ddp` (gloo,
1 thread each: twice the cores). A revision's time is the gap between its rows and the previous revision's landing in
results.jsonl (model load included, start-up and the first revision excluded). Then `replay.dry_run`'s plan for
`experiment=scaling_paper replay.dtype=bfloat16` on this machine (its FLOP/s measured) and on the node the
cluster guide describes (8 x 80 GB GPUs at an assumed FLOP/s: an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.10
SHAPES = {  # hidden, layers, heads: the Pythia sizes
    "pythia-14m": (128, 6, 4),
    "pythia-70m": (512, 6, 8),
    "pythia-160m": (768, 12, 12),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Pythia-14M shape, 8 x 128 tokens per eval set")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-sequences", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--throughput", action="store_true", help="tokens/s per revision (1 vs 2 processes) and the "
                                                                  "plan's estimate of the Table 4 study")
    parser.add_argument("--memory", action="store_true", help="peak memory of replaying the small Pythia shapes "
                                                              "on the CPU (bf16), for the cluster guide's table")
    parser.add_argument("--gpu-tflops", type=float, default=300.0,
                        help="assumed replay FLOP/s per GPU of the described node, in TFLOP/s (default 300: about "
                             "30%% of an H100's dense bf16 peak)")
    args = parser.parse_args(argv)
    if args.throughput:
        return throughput(args.gpu_tflops)
    if args.memory:
        return memory()
    shape = args.shape or ("pythia-14m" if args.quick else "pythia-70m")
    seq_len = args.seq_len or (128 if args.quick else 512)
    eval_sequences = args.eval_sequences or 8
    repeats = args.repeats or 4

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"HF_HUB_CACHE": f"{tmp}/hub", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"})
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import torch
        from hub_cache import build_hub_cache

        from ce_dynamics.runs.config import load_config
        from ce_dynamics.runs.checkpoints import Checkpoint
        from ce_dynamics.runs.replay import _ModelWalk
        from ce_dynamics.runs.training import build_module, build_tokenizer, build_trainer

        hidden, layers, heads = SHAPES[shape]
        cache = build_hub_cache(f"{tmp}/hub", hub_id=f"bench/{shape}", steps=(0,), hidden_size=hidden,
                                num_layers=layers, num_attention_heads=heads, vocab_size=50304)
        cfg = load_config(["mode=replay", f"output_dir={tmp}/out", f"data.seq_len={seq_len}",
                           f"data.eval_sequences={eval_sequences}", "data.batch_size=8",
                           f"trainer.accelerator={args.accelerator}", "trainer.enable_progress_bar=false",
                           "trainer.enable_model_summary=false"])
        ckpt = Checkpoint(cache.hub_id, "step0", 0)
        tokenizer = build_tokenizer(cfg, hub_id=ckpt.model, revision=ckpt.revision)
        module = build_module(cfg, hub_id=ckpt.model, revision=ckpt.revision)
        names = list(cfg.data.eval_sets)
        walk = _ModelWalk(cfg, ckpt.model)
        datamodule = walk.datamodule(tokenizer, names)

        def with_callback() -> None:
            walk.evaluate(ckpt, module, tokenizer, names)

        def without_callback() -> None:
            build_trainer(walk.cfg, [], walk.loggers).validate(module, datamodule=datamodule, verbose=False)

        with_callback(), without_callback()  # warm-up: data tokenized, W&B run started, kernels compiled
        times: dict[str, list[float]] = {"with": [], "without": []}
        pair = (("without", without_callback), ("with", with_callback))
        for r in range(repeats):
            for name, fn in pair if r % 2 == 0 else pair[::-1]:  # A-B, B-A, ...: no order effect
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        walk.close()

    ratio = statistics.median(w / wo for w, wo in zip(times["with"], times["without"]))
    of_medians = statistics.median(times["with"]) / statistics.median(times["without"])
    tokens = eval_sequences * (seq_len - 1) * len(names)
    print(f"replay of one checkpoint ({shape}, 50304 logits, {len(names)} eval sets, {tokens} tokens, "
          f"torch threads {torch.get_num_threads()}, {module.device.type}):")
    print(f"  trainer.validate without callback: median {statistics.median(times['without']):.3f} s")
    print(f"  replay with CEDecompositionCallback: median {statistics.median(times['with']):.3f} s")
    print(f"  ratio (median of {repeats} pairs): {ratio:.3f}  target <= {TARGET:.2f}  "
          f"[{'ok' if ratio <= TARGET else 'ABOVE TARGET'}]; ratio of the medians: {of_medians:.3f}")
    return 0


def _revision_seconds(cmd: list[str], env: dict[str, str], results: Path) -> tuple[list[float], list[int]]:
    """Run a replay, noting when each revision's rows land in `results`: (gaps in s, tokens per revision)."""
    import json
    import subprocess

    log = results.parent.parent / f"{results.parent.name}.log"  # a file, not a pipe: a full pipe blocks the child
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seen: list[tuple[float, str]] = []
    while True:
        finished = proc.poll() is not None
        seen += [(time.perf_counter(), rev) for rev in _revisions_in(results)[len(seen):]]
        if finished:
            break
        time.sleep(0.02)
    handle.close()
    if proc.returncode != 0:
        raise SystemExit(f"replay failed:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    tokens = [sum(r["num_tokens"] for r in rows if r["revision"] == rev) for _, rev in seen]
    return [b[0] - a[0] for a, b in zip(seen, seen[1:])], tokens[1:]


def _revisions_in(results: Path) -> list[str]:
    import json

    if not results.exists():
        return []
    return list(dict.fromkeys(json.loads(line)["revision"] for line in results.read_text().splitlines() if line))


def throughput(gpu_tflops: float) -> int:
    """Tokens/s per revision, 1 process vs 2 (DDP on CPU, gloo), and the plan's estimates of Table 4."""
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tests"))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"HF_HUB_CACHE": f"{tmp}/hub", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"})
        from hub_cache import build_hub_cache

        hidden, layers, heads = SHAPES["pythia-14m"]
        cache = build_hub_cache(f"{tmp}/hub", hub_id="bench/pythia-14m", steps=(0, 1, 2, 3), hidden_size=hidden,
                                num_layers=layers, num_attention_heads=heads, vocab_size=50304)
        common = [sys.executable, str(repo / "train.py"), "mode=replay", f"replay.models=[{cache.hub_id}]",
                  "replay.revisions=[0,1,2,3]", "data.seq_len=256", "data.eval_sequences=16", "data.batch_size=4",
                  f"data.cache_dir={tmp}/tok", "logger.wandb.mode=disabled", "trainer.accelerator=cpu",
                  "trainer.enable_progress_bar=false"]
        print(f"replay throughput ({cache.hub_id}: Pythia-14M shape, 50304 logits; 4 revisions x 2 eval sets x "
              "16 x 255 tokens; CPU):")
        runs = {"1 process, 1 thread": ([], "1"), "2 processes (DDP, gloo), 1 thread each":
                (["trainer.devices=2", "trainer.strategy=ddp"], "1")}
        rates = {}
        for name, (extra, threads) in runs.items():
            out = Path(tmp) / name.split(",")[0].replace(" ", "_")
            gaps, tokens = _revision_seconds([*common, f"output_dir={out}", *extra],
                                             {**os.environ, "OMP_NUM_THREADS": threads}, out / "results.jsonl")
            per = [t / g for t, g in zip(tokens, gaps)]
            rates[name] = statistics.median(per)
            print(f"  {name}: {', '.join(f'{r:,.0f}' for r in per)} tokens/s per revision (median "
                  f"{rates[name]:,.0f})")
        one, two = rates.values()
        print(f"  2 processes / 1 process: {two / one:.2f}x")

        from ce_dynamics.runs.config import load_config
        from ce_dynamics.runs.plan import Hardware, format_plan, make_plan, this_machine
        from ce_dynamics.runs.checkpoints import plan

        cfg = load_config(["experiment=scaling_paper", "replay.dtype=bfloat16", f"output_dir={tmp}/plan"])
        walk = plan(cfg)
        node = Hardware("cuda", 8, 80e9, gpu_tflops * 1e12, f"assumed: {gpu_tflops:.0f} TFLOP/s per GPU")
        for hardware in (this_machine(), node):
            plans = make_plan(cfg, walk, hardware)
            text = format_plan(cfg, plans, hardware, len(walk)).splitlines()
            print(f"\nplan estimate, experiment=scaling_paper replay.dtype=bfloat16 (an ESTIMATE, not measured):")
            print("\n".join([text[1], text[-2] if text[-1].startswith("run the models") else text[-1]]))
            spread = [p for p in plans if "device_map" in p.strategy]
            print(f"  {len(plans) - len(spread)} models whole on one device, {len(spread)} spread "
                  f"(device_map): {sum(p.seconds for p in spread) / 3600:.1f} h of the total")
    return 0


_MEASURE = """
import resource, sys, torch
from ce_dynamics.metric import CrossEntropyDecomposition
from ce_dynamics.runs.module import build_gpt_neox
hidden, layers, heads, seq = map(int, sys.argv[1:5])
torch.manual_seed(0)
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
base = rss()
torch.set_default_dtype(torch.bfloat16)  # built in bf16, as from_pretrained(dtype=bfloat16) loads: no fp32 copy
model = build_gpt_neox(dict(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=seq)).eval()
torch.set_default_dtype(torch.float32)
params = sum(p.numel() for p in model.parameters())
metric = CrossEntropyDecomposition(vocab_size=50304)
ids = torch.randint(0, 50304, (8, seq + 1))
with torch.inference_mode():
    h = model.base_model(input_ids=ids[:, :-1]).last_hidden_state
    metric.update_from_hidden(h, model.get_output_embeddings().weight, ids[:, 1:])
print(params, rss() - base)
"""


def memory() -> int:
    """Peak RSS added by building a random Pythia-shaped model in bf16 and replaying one batch of 8 x 512 tokens
    from hidden states (each shape in a fresh process), against the weights' own bytes."""
    import subprocess

    print("peak memory of replay on the CPU, bf16, one batch of 8 x 512 tokens, scored from hidden states:")
    print(f"  {'shape':<12} {'params':>8} {'weights':>9} {'peak RSS added':>15} {'ratio':>6}")
    for shape, (hidden, layers, heads) in SHAPES.items():
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(hidden), str(layers), str(heads), "512"],
                             capture_output=True, text=True, check=True).stdout.split()
        params, peak = int(out[-2]), int(out[-1])
        print(f"  {shape:<12} {params / 1e6:>7.1f}M {2 * params / 1e9:>8.3f}GB {peak / 1e9:>14.3f}GB "
              f"{peak / (2 * params):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
