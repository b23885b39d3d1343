"""Damaged files are named, never skipped in silence: an unreadable state file, CSV log, results file or
last.ckpt is reported with its path and what to do; on start a damaged state file is moved aside to
`*.damaged` (loudly) and no logger is told of a row it cannot back; stale temporary files of an interrupted
atomic write are removed on start."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ce_dynamics.files import (DamagedFileError, atomic_open, check_state_file, iter_result_rows, load_state,
                               remove_stale_temporaries, save_state, set_aside_damaged_states, state_path)

ROOT = Path(__file__).resolve().parent.parent
V = 8


def state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"rank_counts": rng.integers(0, 50, V), "rank_log_score_sum": -rng.random(V) * 10}


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a zip" * 20}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_readers_name_the_damaged_state_file_and_what_to_do(how: str, tmp_path: Path):
    from ce_dynamics.analysis.scaling import load_arrays
    from ce_dynamics.runs.summary import summary_text

    save_state(tmp_path, "code", 0, state(0))
    save_state(tmp_path, "code", 8, state(1))
    bad = state_path(tmp_path, "code", 8)
    damage(bad, how)
    for read in (load_state, check_state_file):
        with pytest.raises(DamagedFileError, match="move it aside") as err:
            read(bad)
        assert str(bad) in str(err.value) and err.value.path == bad
    with pytest.raises(DamagedFileError) as err:
        load_arrays(tmp_path)
    assert str(bad) in str(err.value)
    text = summary_text("train", tmp_path)  # the end-of-run summary says which file instead of crashing
    assert f"cannot show the last decomposition: {bad} is damaged" in text


def test_a_state_file_without_the_arrays_is_damaged(tmp_path: Path):
    path = state_path(tmp_path, "code", 0)
    path.parent.mkdir(parents=True)
    np.savez(path, other=np.zeros(3))
    with pytest.raises(DamagedFileError, match=r"missing array\(s\) \['rank_counts', 'rank_log_score_sum'\]"):
        load_state(path)
    assert [p.name for p, _ in set_aside_damaged_states(tmp_path, ["code"])] == ["step_0.npz.damaged"]


def test_csv_and_results_files_with_bytes_that_are_not_utf8_are_named(tmp_path: Path):
    from ce_dynamics.lightning.csv_logger import read_metrics_csv

    metrics = tmp_path / "metrics.csv"
    metrics.write_bytes(b"step,decomp/code/cross_entropy\n0,1.5\n" + b"\xff\xfe2,1.4\n")
    with pytest.raises(DamagedFileError, match="not UTF-8 at offset 37, after 2 complete line") as err:
        read_metrics_csv(metrics)
    assert str(metrics) in str(err.value)
    results = tmp_path / "results.jsonl"
    results.write_bytes(b'{"a": 1}\n\x80\n')
    with pytest.raises(DamagedFileError, match="results.jsonl is damaged"):
        list(iter_result_rows(results))


def test_backfill_sets_damaged_states_aside_and_logs_only_what_a_state_backs(tmp_path: Path, capsys):
    """A CSV log lacking steps 0, 2, 4 whose step 2 state is emptied: 0 and 4 are back-filled (with the values of
    their states), 2 is moved aside with a warning naming it and logged nowhere."""
    from ce_dynamics.functional import decomposition_from_state
    from ce_dynamics.lightning import sinks
    from ce_dynamics.lightning.csv_logger import DurableCSVLogger, read_metrics_csv

    for step in (0, 2, 4):
        save_state(tmp_path, "code", step, state(step))
    damage(state_path(tmp_path, "code", 2), "empty")
    logger = DurableCSVLogger(tmp_path / "log")
    with pytest.warns(RuntimeWarning, match="step_2.npz"):
        assert sinks.backfill([logger], tmp_path, ["code"], None) == [0, 4]
    err = capsys.readouterr().err
    assert f"damaged state file {state_path(tmp_path, 'code', 2)}" in err and "step_2.npz.damaged" in err
    assert (tmp_path / "arrays" / "code" / "step_2.npz.damaged").is_file()
    _, rows = read_metrics_csv(logger.metrics_path)
    assert [int(r["step"]) for r in rows] == [0, 4]
    for row in rows:
        s = state(int(row["step"]))
        ce = float(-s["rank_log_score_sum"].sum() / s["rank_counts"].sum())
        assert float(row["decomp/code/cross_entropy"]) == pytest.approx(ce, rel=1e-12)
        assert ce == pytest.approx(float(decomposition_from_state(s["rank_counts"], s["rank_log_score_sum"])
                                         ["cross_entropy"]), rel=1e-12)


_KILLED_MID_WRITE = """
import os, signal, sys
from ce_dynamics.files import atomic_open
with atomic_open(sys.argv[1]) as handle:
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_temporaries_of_a_killed_atomic_write_are_removed(tmp_path: Path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(target)], timeout=60)
    assert proc.returncode == -9
    (stale,) = (tmp_path / "checkpoints").iterdir()
    assert stale.name.startswith(".last.ckpt.") and stale.name.endswith(".tmp") and not target.exists()
    keep = [tmp_path / "notes.tmp", tmp_path / "wandb" / ".run.abcdefgh.tmp", tmp_path / "checkpoints" / "step_2.ckpt",
            tmp_path / "src" / ".a.py.abcdefgh.tmp"]  # not the package's: W&B's own folder, a user's folder
    nested = [tmp_path / "org--model" / "arrays" / "code" / ".step_4.npz.abcd_123.tmp",  # replay's per-model run
              tmp_path / ".results.jsonl.zzzzzzzz.tmp"]
    for path in keep + nested:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == sorted([stale, *nested])
    assert not any(p.exists() for p in nested)
    assert all(p.exists() for p in keep) and not stale.exists()
    with atomic_open(target) as handle:  # and a whole write leaves no temporary behind
        handle.write(b"ok")
    assert remove_stale_temporaries(tmp_path) == []


def _train(*args: str) -> subprocess.CompletedProcess:
    from test_train_e2e import small  # noqa: F401 - the shared tiny config

    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow
def test_a_resume_names_damaged_files_and_never_skips_them_in_silence(tmp_path: Path):
    from test_train_e2e import small

    out, cache = tmp_path / "out", tmp_path / "cache"
    base = [*small(out, cache), "logger.wandb.mode=disabled", "data.eval_sets=[code]"]
    first = _train(*base, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    last, metrics = out / "checkpoints" / "last.ckpt", out / "csv" / "version_0" / "metrics.csv"

    good = last.read_bytes()  # an emptied last.ckpt: one line, exit 2, what to do
    last.write_bytes(b"")
    proc = _train(*base, "trainer.max_steps=4", "ckpt_path=last")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"{last} is damaged" in proc.stderr and "ckpt_path=<file>" in proc.stderr
    last.write_bytes(good)

    text = metrics.read_bytes()  # bytes that are not UTF-8 in the CSV log: named, exit 2
    metrics.write_bytes(text + b"\xff\xfe\n")
    proc = _train(*base, "trainer.max_steps=4", "ckpt_path=last")
    assert proc.returncode == 2 and f"{metrics} is damaged (bytes that are not UTF-8" in proc.stderr, proc.stderr
    metrics.write_bytes(text)

    step2 = state_path(out, "code", 2)  # an emptied state file and a stale temporary of a killed checkpoint write
    step2.write_bytes(b"")
    stale = out / "checkpoints" / ".last.ckpt.k1ll3d00.tmp"
    stale.write_bytes(b"half")
    proc = _train(*base, "trainer.max_steps=4", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"damaged state file {step2}" in proc.stderr and "DurableCSVLogger already hold(s) a row for step 2" \
        in proc.stderr, proc.stderr[-3000:]
    assert not step2.exists() and step2.with_name("step_2.npz.damaged").stat().st_size == 0
    assert not stale.exists() and "removed" in proc.stderr
    with metrics.open(newline="", encoding="utf-8") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("decomp/code/cross_entropy")]
    assert steps == [0, 2, 4]  # each once; 4 evaluated after the resume
    assert sorted(p.name for p in step2.parent.iterdir()) == ["step_0.npz", "step_2.npz.damaged", "step_4.npz"]
