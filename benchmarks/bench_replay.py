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
    args = parser.parse_args(argv)
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
        from ce_dynamics.runs.replay import Checkpoint, _ModelWalk
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


if __name__ == "__main__":
    sys.exit(main())
