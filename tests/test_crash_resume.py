"""Real crashes: `train.py` and a replay walk killed with SIGKILL at awkward moments, then resumed with
`ckpt_path=last` (or rerun), end with every validation exactly once in every sink (W&B read back with
`wandb leet inspect --json`, the CSV log, the npz arrays, results.jsonl), with an uninterrupted run's values."""

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
import pytest

from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture
from test_callback import wandb_history

pytestmark = pytest.mark.slow  # real processes killed and resumed: minutes (make test-fast leaves them out)

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


def launch(args: list[str]) -> subprocess.Popen:
    # Without WANDB_SERVICE: a W&B service this test process started would outlive a killed child and keep its
    # run id "in use"; every real process starts its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, moment: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as `moment()` holds; fail if the process ended first (the kill must be real)."""
    deadline = time.monotonic() + timeout
    while not moment():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before '{what}': {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"'{what}' did not happen within {timeout} s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    finish(launch(config(out, cache)))
    return out


def test_training_killed_five_times_records_every_validation_once(uninterrupted, cache, tmp_path):
    out = tmp_path / "out"
    args = config(out, cache)
    resume = [*args, "ckpt_path=last"]
    # 1. right after the step-4 validation saved its arrays, before its checkpoint
    kill_when(launch(args), lambda: all(4 in npz_steps(out, n) for n in NAMES), "validation at step 4 saved")
    assert not (out / "checkpoints" / "last.ckpt").exists()
    # 2. no checkpoint yet, so a restart from scratch; killed while a checkpoint is being written (or just after)
    before = ckpt_mtime(out)
    kill_when(launch(resume), lambda: any((out / "checkpoints").glob(".last.ckpt.*")) or ckpt_mtime(out) != before,
              "writing a checkpoint")
    # 3. right after the next checkpoint lands
    before = ckpt_mtime(out)
    kill_when(launch(resume), lambda: ckpt_mtime(out) != before, "a new checkpoint")
    # 4. mid-validation: the first eval set's arrays of a new step are on disk, the second's not yet
    seen = npz_steps(out, "code")
    kill_when(launch(resume), lambda: bool(npz_steps(out, "code") - seen), "mid-validation")
    # 5. between validations: a while after a new checkpoint
    before = ckpt_mtime(out)
    kill_when(launch(resume), lambda: ckpt_mtime(out) != before and time.sleep(0.3) is None, "between validations")
    assert max(npz_steps(out, "code")) < MAX_STEPS  # every kill was before the end
    finish(launch(resume))
    finish(launch(resume))  # resuming a finished run changes nothing
    assert_same_record(out, uninterrupted, STEPS)


def test_replay_killed_mid_walk_records_every_checkpoint_once(tiny_hub: HubCache, tmp_path):
    from ce_dynamics.runs.replay import model_slug, read_results

    def walk(out: Path) -> subprocess.Popen:
        return launch(["mode=replay", f"output_dir={out}", f"data.cache_dir={tmp_path / 'tok'}",
                       f"replay.models=[{tiny_hub.hub_id}]", "replay.revisions=[0,2,4]", "data.seq_len=32",
                       "data.eval_sequences=4", "data.batch_size=4", "trainer.accelerator=cpu",
                       "trainer.enable_progress_bar=false"])

    ref, out = tmp_path / "ref", tmp_path / "out"
    with offline_hub(tiny_hub.root):
        finish(walk(ref))
        model = out / model_slug(tiny_hub.hub_id)
        # killed right after revision step2's arrays are saved, before its results rows are written
        kill_when(walk(out), lambda: all(2 in npz_steps(model, n) for n in NAMES), "step2 evaluated")
        finish(walk(out))
    keys = [(r["revision"], r["dataset"]) for r in read_results(out / "results.jsonl")]
    assert sorted(keys) == sorted((f"step{s}", d) for s in (0, 2, 4) for d in NAMES)
    assert_same_record(model, ref / model_slug(tiny_hub.hub_id), [0, 2, 4])
