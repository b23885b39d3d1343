"""mode=sweep: train one model per size with the same config, then compare the final models (paper sec. 4).

    python train.py experiment=tiny_scaling                        # 5 tiny GPT-NeoX sizes on CPU
    python train.py experiment=tiny_scaling trainer.max_steps=400  # any override applies to every member
    python -m ce_dynamics.analysis outputs/tiny_scaling/sweep/results.jsonl

Every member uses the experiment's config (same tokenizer, data, token budget and schedule) with its own
(hidden_size, num_hidden_layers) from `sweep.sizes`, is trained by `ce_dynamics.runs.training.run_training` into
`output_dir/<member>/`, and its final validation state (`arrays/<dataset>/step_<max_steps>.npz`; training always
evaluates its final model, whatever `trainer.val_check_interval`) becomes one row per dataset of
`output_dir/results.jsonl`. A rerun resumes (see `run_sweep_rows`): finished members are reused, a killed one
resumes from its `last.ckpt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ce_dynamics._extras import require

require("omegaconf")

from omegaconf import DictConfig

from ce_dynamics.bootstrap import interval_keys, replicates_field
from ce_dynamics.functional import KEYS

FAMILY = "tiny-neox"


def member_name(hidden: int, layers: int) -> str:
    """The `model` field of a member's rows, e.g. ``tiny-neox-h64-l2``."""
    return f"{FAMILY}-h{hidden}-l{layers}"


def member_config(argv: Sequence[str], hidden: int, layers: int) -> DictConfig:
    """The sweep's config (the user's arguments) with this member's shape and output folder, in mode=train."""
    from ce_dynamics.runs.config import load_config

    base = load_config(["experiment=tiny_scaling", *argv])
    heads = 4 if hidden % 4 == 0 else 2
    return load_config([
        "experiment=tiny_scaling", *argv, "mode=train", "ckpt_path=last_or_new",  # a killed member resumes
        f"model.hidden_size={hidden}", f"model.num_hidden_layers={layers}", f"model.num_attention_heads={heads}",
        f"model.intermediate_size={4 * hidden}", f"output_dir={Path(base.output_dir) / member_name(hidden, layers)}",
    ])


def count_non_embedding(cfg: DictConfig) -> int:
    """Non-embedding parameters of the member's architecture (built on the meta device, no memory)."""
    import torch

    from ce_dynamics.runs.module import build_gpt_neox
    from ce_dynamics.analysis.scaling import non_embedding_params
    from ce_dynamics.runs.training import model_shape

    with torch.device("meta"):
        return non_embedding_params(build_gpt_neox(model_shape(cfg)))


def final_rows(cfg: DictConfig, model: str, params: int) -> list[dict]:
    """Rows (one per eval set) from the member's saved state at its last step, via the core's math."""
    from ce_dynamics.analysis.scaling import decompose_arrays, load_arrays

    arrays = load_arrays(cfg.output_dir)
    numbers = decompose_arrays({d: {max(steps): steps[max(steps)]} for d, steps in arrays.items()})  # the last only
    rows = []
    for dataset in cfg.data.eval_sets:
        step = max(numbers[dataset])
        if step != cfg.trainer.max_steps:
            raise RuntimeError(f"{model} in {cfg.output_dir} was last evaluated at step {step}, not at "
                               f"trainer.max_steps={cfg.trainer.max_steps}; give the sweep its own output_dir")
        values = numbers[dataset][step]
        rows.append({
            "model": model, "family": FAMILY, "revision": f"step{step}", "step": step, "dataset": dataset,
            "num_tokens": int(values["num_tokens"]), "non_embedding_params": params,
            **{k: float(values[k]) for k in KEYS}, **{k: float(values[k]) for k in interval_keys() if k in values},
            **replicates_field(values),
        })
    return rows


def run_sweep_rows(argv: Sequence[str] = (), sizes: Sequence[Sequence[int]] | None = None) -> Path:
    """Train (or reuse) every member and add its final rows to ``output_dir/results.jsonl``; returns its path.

    ``sizes`` defaults to the config's ``sweep.sizes`` (``[[hidden_size, num_hidden_layers], ...]``).

    Like a replay, a rerun resumes: members with final arrays are not retrained and rows already in the
    results file are not written again.
    """
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.files import append_result_rows, done_keys
    from ce_dynamics.lightning.sinks import saved_steps
    from ce_dynamics.runs.training import run_training

    base = load_config(["experiment=tiny_scaling", *argv])
    path = Path(base.output_dir) / "results.jsonl"
    sizes = [tuple(size) for size in (base.sweep.sizes if sizes is None else sizes)]
    done = done_keys(path)
    for hidden, layers in sizes:
        cfg = member_config(argv, hidden, layers)
        if cfg.trainer.max_steps not in saved_steps(Path(cfg.output_dir), cfg.data.eval_sets):  # not finished
            code = run_training(cfg)
            if code != 0:
                raise MemberStopped(member_name(hidden, layers), code)
        rows = final_rows(cfg, member_name(hidden, layers), count_non_embedding(cfg))
        new = [r for r in rows if (r["model"], r["revision"], r["dataset"]) not in done]
        if new:
            append_result_rows(path, new)
    return path


class MemberStopped(RuntimeError):
    """A member's training ended with a non-zero exit code (`code`; 128 + signal when it was preempted)."""

    def __init__(self, member: str, code: int) -> None:
        self.member, self.code = member, code
        super().__init__(f"training {member} failed with exit code {code}")


def run_sweep(argv: Sequence[str]) -> int:
    """Train the family, then print the scaling tables and write the figures next to the results (train.py).
    A member stopped by a signal stops the sweep with its exit code (rerun the same command to resume)."""
    from ce_dynamics.analysis import report

    try:
        path = run_sweep_rows(argv)
    except MemberStopped as stop:
        if stop.code <= 128:
            raise
        return stop.code
    print(f"wrote {path}")
    return report.main([str(path)])
