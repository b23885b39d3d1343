"""The fault matrix: real `train.py` processes, {1 process, 2-process gloo DDP} x {SIGKILL, SIGTERM}, resumed with
`ckpt_path=last`, end with every sink (W&B read with `wandb leet inspect --json`, the CSV log, the npz arrays) equal
to an uninterrupted run of the same world size; plus two starts into one output_dir at once.

Every launch runs in its own process group, so a signal reaches rank zero and its DDP children at once (what a
scheduler or Ctrl-C does); a signal is also sent to rank zero alone (what Kubernetes does): the ranks must agree.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from ce_dynamics.lightning.csv_logger import read_metrics_csv
from crash_helpers import (DDP, EVERY, NAMES, assert_same_record, by_step, ckpt_mtime, config, csv_rows, finish,
                           kill_when, launch, npz_steps, stop_group, wait_for, wandb_rows)

pytestmark = pytest.mark.slow
WORLDS = {1: [], 2: DDP}
MAX_STEPS = 16  # room for a stop between validations, one during a validation, and the rest after the resume
STEPS = list(range(0, MAX_STEPS + 1, EVERY))


def run_config(out: Path, cache: Path, world: int) -> list[str]:
    return [*config(out, cache), f"trainer.max_steps={MAX_STEPS}", *WORLDS[world]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict[int, Path]:
    """One uninterrupted run per world size, made on first use and shared by the whole matrix."""
    class Runs(dict):
        def __missing__(self, world: int) -> Path:
            out = self[world] = tmp_path_factory.mktemp(f"ref{world}") / "out"
            finish(launch(run_config(out, cache, world), group=True))
            return out

    return Runs()


def last_train_step(out: Path) -> int:
    """The step of the last `train/loss` row the CSV holds on disk (-1 before the first)."""
    _, rows = read_metrics_csv(out / "csv" / "version_0" / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    return max(steps, default=-1)


def ended(proc) -> None:
    """Wait until no process of `proc`'s group is left (DDP children included)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of the launch {proc.pid} outlived it")


def stopped_at(proc, code: int) -> int:
    """Wait for a signalled run; check its exit code and its one-line note; the step it stopped at."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-4000:]
    found = re.findall(r"stopped by SIG\w+ at step (\d+); exit code (\d+)", err)
    assert found and int(found[-1][1]) == code, err[-3000:]
    ended(proc)
    return int(found[-1][0])


def signal_between_validations(proc, out: Path, signum: int, whole_group: bool) -> None:
    """Freeze the launch while the step in progress is no validation step, send `signum`, let it go."""
    while True:
        wait_for(proc, lambda: last_train_step(out) % EVERY == 1, "a training step after a validation")
        stop_group(proc, signal.SIGSTOP)
        if last_train_step(out) % EVERY == 1:  # still so, now that nothing moves
            break
        stop_group(proc, signal.SIGCONT)
    if whole_group:
        stop_group(proc, signum)
    else:
        proc.send_signal(signum)
    stop_group(proc, signal.SIGCONT)


@pytest.mark.parametrize("world", [1, 2])
def test_sigint_and_sigterm_stop_with_128_plus_signal_resumably_and_the_resume_is_exact(world, reference, cache,
                                                                                        tmp_path):
    out = tmp_path / "out"
    args = run_config(out, cache, world)
    resume = [*args, "ckpt_path=last"]
    # 1. SIGINT between validations, to rank zero alone: every rank stops after the step in progress, last.ckpt there
    proc = launch(args, group=True)
    signal_between_validations(proc, out, signal.SIGINT, whole_group=False)
    step = stopped_at(proc, 128 + signal.SIGINT)
    assert step % EVERY and torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    # 2. SIGTERM to the whole group during a validation: it finishes (every set recorded), then the run stops
    seen = npz_steps(out, "code")
    proc = launch(resume, group=True)
    wait_for(proc, lambda: bool(npz_steps(out, "code") - seen), "a validation")
    stop_group(proc, signal.SIGTERM)
    step = stopped_at(proc, 128 + signal.SIGTERM)
    last = {max(npz_steps(out, name)) for name in NAMES}  # the validation under way finished: every set saved
    assert len(last) == 1 and last.pop() <= step < MAX_STEPS
    saved = sorted(npz_steps(out, "code"))  # flushed on the way out: every sink holds every saved step already
    assert sorted(by_step(csv_rows(out), "step")) == sorted(by_step(wandb_rows(out), "trainer/global_step")) == saved
    finish(launch(resume, group=True))
    assert_same_record(out, reference[world], STEPS)


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_of_the_whole_launch_twice_then_the_resume_is_exact(world, reference, cache, tmp_path):
    out = tmp_path / "out"
    args = run_config(out, cache, world)
    resume = [*args, "ckpt_path=last"]
    # 1. right after a checkpoint lands
    kill_when(launch(args, group=True), lambda: ckpt_mtime(out) != 0, "the first checkpoint")
    # 2. mid-validation: the first eval set's arrays of a new step are on disk, the second's not yet
    seen = npz_steps(out, "code")
    kill_when(launch(resume, group=True), lambda: bool(npz_steps(out, "code") - seen), "mid-validation")
    assert max(npz_steps(out, "code")) < MAX_STEPS
    finish(launch(resume, group=True))
    assert_same_record(out, reference[world], STEPS)


def test_two_starts_at_once_one_runs_the_other_exits_2_naming_the_holder(cache, tmp_path):
    out = tmp_path / "out"
    args = [*config(out, cache), "trainer.max_steps=4"]
    first, second = launch(args), launch(args)
    results = [(proc, *proc.communicate(timeout=300)) for proc in (first, second)]
    codes = sorted(proc.returncode for proc, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    winner = next(proc for proc, _, _ in results if proc.returncode == 0)
    loser_err = next(err for proc, _, err in results if proc.returncode == 2)
    assert loser_err.count("\n") == 1 and "Traceback" not in loser_err
    assert f"output_dir {out} is in use by another run (pid {winner.pid}," in loser_err
    assert sorted(by_step(wandb_rows(out), "trainer/global_step")) == [0, 4]  # each step once
