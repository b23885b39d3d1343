"""Real crashes: `train.py` and a replay walk killed with SIGKILL at awkward moments, then resumed with
`ckpt_path=last` (or rerun), end with every validation exactly once in every sink (W&B read back with
`wandb leet inspect --json`, the CSV log, the npz arrays, results.jsonl), with an uninterrupted run's values."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from crash_helpers import (MAX_STEPS, NAMES, STEPS, assert_same_record, ckpt_mtime, config, finish, kill_when, launch,
                           npz_steps)
from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

pytestmark = pytest.mark.slow  # real processes killed and resumed: minutes (make test-fast leaves them out)


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
    from ce_dynamics.runs.checkpoints import model_slug
    from ce_dynamics.runs.replay import read_results

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
