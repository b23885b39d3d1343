"""Real runs of train.py for the crash and fault tests: the shrunk config, launching and killing real processes
(alone or with their DDP children, as a process group), and reading every sink back (W&B with
`wandb leet inspect --json`, the CSV log, the npz arrays) to compare a run with an uninterrupted one."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from test_callback import wandb_history

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("code", "prose")
MAX_STEPS, EVERY = 32, 4
STEPS = list(range(0, MAX_STEPS + 1, EVERY))


def config(out: Path, cache: Path) -> list[str]:
    """The default config (checkpoint.keep=last, W&B offline, CSV), shrunk to seconds."""
    return [
        f"output_dir={out}", f"data.cache_dir={cache}", "model.vocab_size=384", "model.hidden_size=32",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "data.seq_len=32", "data.eval_sequences=24", "data.batch_size=4", "data.train.max_chars=100000",
        "data.tokenizer_train_chars=100000", f"trainer.max_steps={MAX_STEPS}", f"trainer.val_check_interval={EVERY}",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "optim.warmup_steps=2",
    ]


DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]  # 2 gloo processes


def launch(args: list[str], group: bool = False) -> subprocess.Popen:
    """train.py `args` in a real process; `group`: in a new session, so its DDP children share its process group."""
    # Without WANDB_SERVICE: a W&B service this test process started would outlive a killed child and keep its
    # run id "in use"; every real process starts its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env, start_new_session=group,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, moment: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Return as soon as `moment()` holds; fail if the process ended first (a kill must be real) or never."""
    deadline = time.monotonic() + timeout
    while not moment():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before '{what}': {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            stop_group(proc, signal.SIGKILL)
            raise AssertionError(f"'{what}' did not happen within {timeout} s")
        time.sleep(0.005)


def stop_group(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to `proc`'s whole process group (a launch started with `group=True`), else to `proc`."""
    if os.getpgid(proc.pid) == proc.pid:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


def kill_when(proc: subprocess.Popen, moment: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """SIGKILL `proc` (its whole process group when launched with `group=True`) as soon as `moment()` holds."""
    wait_for(proc, moment, what, timeout)
    stop_group(proc, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]


def npz_steps(out: Path, name: str) -> set[int]:
    return {int(p.stem[5:]) for p in (out / "arrays" / name).glob("step_*.npz")}


def ckpt_mtime(out: Path) -> int:
    last = out / "checkpoints" / "last.ckpt"
    return last.stat().st_mtime_ns if last.exists() else 0


def wandb_rows(out: Path, marker: str = "decomp/code/cross_entropy") -> list[dict]:
    """The decomposition rows of every offline segment of the output_dir's one W&B run."""
    segments = sorted((out / "wandb").glob("offline-run-*"))
    assert len({p.name.rsplit("-", 1)[1] for p in segments}) == 1, segments  # one run id: the charts continue
    return [row for seg in segments for row in wandb_history(seg) if marker in row]


def csv_rows(out: Path, marker: str = "decomp/code/cross_entropy") -> list[dict]:
    rows = []
    for path in sorted(out.glob("**/csv/**/metrics.csv")):
        with open(path, newline="") as handle:
            rows += [r for r in csv.DictReader(handle) if r.get(marker)]
    return rows


SCALARS = [f"decomp/{n}/{k}" for n in NAMES for k in ("cross_entropy", "error_entropy", "self_alignment",
                                                      "confidence", "accuracy", "mean_reciprocal_rank",
                                                      "nonfinite_tokens")] + [f"val/loss/{n}" for n in NAMES]
# The bootstrap's intervals (on by default): bit-identical after kills and resumes, as the point estimates.
SCALARS += [f"decomp/{n}/{k}{s}" for n in NAMES for k in ("cross_entropy", "error_entropy", "self_alignment",
                                                        "confidence", "accuracy") for s in ("_se", "_lo", "_hi")]


def by_step(rows: list[dict], step_key: str) -> dict[int, dict]:
    steps = [int(float(r[step_key])) for r in rows]
    assert len(steps) == len(set(steps)), f"a step was recorded twice: {sorted(steps)}"
    return {int(float(r[step_key])): r for r in rows}


def assert_same_record(out: Path, ref: Path, steps: list[int], step_key: str = "trainer/global_step") -> None:
    """W&B, CSV and npz of `out` hold each of `steps` once, with the values of `ref`."""
    got, want = by_step(wandb_rows(out), step_key), by_step(wandb_rows(ref), step_key)
    assert sorted(got) == sorted(want) == steps
    for step in steps:
        for key in SCALARS:
            assert got[step][key] == want[step][key], (step, key)
        assert got[step]["decomp/prose/p_e._type"] == "histogram"
        assert got[step]["decomp/prose/p_e_vs_q_e._type"] == "image-file"
    got, want = by_step(csv_rows(out), "step"), by_step(csv_rows(ref), "step")
    assert sorted(got) == sorted(want) == steps
    for step in steps:
        for key in SCALARS:
            assert float(got[step][key]) == float(want[step][key]), (step, key)
    for name in NAMES:
        assert npz_steps(out, name) == npz_steps(ref, name) == set(steps)
        for step in steps:
            a, b = (np.load(d / "arrays" / name / f"step_{step}.npz") for d in (out, ref))
            assert np.array_equal(a["rank_counts"], b["rank_counts"])
            assert np.array_equal(a["rank_log_score_sum"], b["rank_log_score_sum"])
            for key in ("bootstrap_index", "bootstrap_counts", "bootstrap_log_score_sum"):
                assert np.array_equal(a[key], b[key]), key


