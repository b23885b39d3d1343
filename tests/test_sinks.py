"""The pieces that carry "every validation once in every sink", tested directly (not only through real kills):
the back-fill of each readable logger from the saved states, the CSV reader's rule for a torn last line, and the
W&B transaction-log reader on a torn tail and on a damaged record. Real loggers, a real offline W&B run read back
with `wandb leet inspect --json`; expected numbers from tests/numpy_reference.py."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ce_dynamics.files import save_state
from ce_dynamics.lightning import sinks
from ce_dynamics.lightning.csv_logger import DurableCSVLogger, read_metrics_csv
from ce_dynamics.wandb_history import history_rows, run_files
from numpy_reference import decompose
from test_callback import wandb_history

V = 17
NAMES = ("alpha", "beta")
KEYS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")


def _batch(step: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 * step + len(name))
    return rng.normal(size=(40, V)) * 2, rng.integers(0, V, size=40)


def _save(root: Path, step: int) -> None:
    for name in NAMES:
        ref = decompose(*_batch(step, name))
        save_state(root, name, step, {"rank_counts": ref["rank_counts"],
                                      "rank_log_score_sum": ref["rank_log_score_sum"], "nonfinite_tokens": np.int64(0)})


def _wandb_logger(root: Path):
    """A new process's logger on the one W&B run of `root` (its segments must start in different seconds: W&B names
    a segment's folder by the second it started, and a second segment in the same second replaces the first)."""
    from lightning.pytorch.loggers import WandbLogger

    time.sleep(1.1)
    return WandbLogger(project="t", save_dir=str(root), id="backfill1", resume="allow", mode="offline")


def _check_rows(rows: dict[int, dict], steps: list[int]) -> None:
    assert sorted(rows) == steps
    for step in steps:
        for name in NAMES:
            ref = decompose(*_batch(step, name))
            for key in KEYS:
                assert float(rows[step][f"decomp/{name}/{key}"]) == pytest.approx(ref[key], rel=1e-12, abs=1e-12)


def _once(rows: list[dict], key: str) -> dict[int, dict]:
    steps = [int(float(r[key])) for r in rows]
    assert len(steps) == len(set(steps)), f"a step is held twice: {sorted(steps)}"
    return {int(float(r[key])): r for r in rows}


def test_backfill_gives_each_readable_logger_exactly_the_saved_steps_it_lacks(tmp_path):
    import wandb

    root = tmp_path / "run"
    for step in (0, 4, 8):
        _save(root, step)
    scalars = {step: sinks.scalars_of({n: sinks.results_of(decompose(*_batch(step, n))) for n in NAMES})
               for step in (0, 4)}
    try:  # before: the CSV holds step 4, the W&B run step 0 (a crash left each a different gap)
        first = _wandb_logger(root)
        sinks.log_row(first, 0, scalars[0])
        wandb.finish()
        sinks.log_row(DurableCSVLogger(root), 4, scalars[4])

        csv_logger, wandb_logger = DurableCSVLogger(root), _wandb_logger(root)
        assert sinks.backfill([csv_logger, wandb_logger], root, NAMES, media=None) == [0, 4, 8]
        wandb.finish()
        again = _wandb_logger(root)
        assert sinks.backfill([DurableCSVLogger(root), again], root, NAMES, media=None) == []  # level: nothing to do
    finally:
        wandb.finish()

    _, csv_rows = read_metrics_csv(root / "csv" / "version_0" / "metrics.csv")
    _check_rows(_once(csv_rows, "step"), [0, 4, 8])
    segments = sorted((root / "wandb").glob("offline-run-*"))
    history = [row for seg in segments for row in wandb_history(seg) if "decomp/alpha/cross_entropy" in row]
    _check_rows(_once(history, "trainer/global_step"), [0, 4, 8])


# ------------------------------------------------------------------------------------------------------ CSV


HEADER = "step,decomp/a/cross_entropy\n"


@pytest.mark.parametrize("tail", ["8,2.71", "8,2.71828,9\n", "8\n"])
def test_a_torn_or_malformed_last_csv_line_is_dropped_and_the_next_append_starts_clean(tmp_path, tail):
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(HEADER + "0,3.5\n4,3.25\n" + tail)  # tail: cut mid-line by a crash, or the wrong field count
    assert read_metrics_csv(path) == (["step", "decomp/a/cross_entropy"],
                                      [{"step": "0", "decomp/a/cross_entropy": "3.5"},
                                       {"step": "4", "decomp/a/cross_entropy": "3.25"}])
    logger = DurableCSVLogger(tmp_path)
    logger.log_metrics({"decomp/a/cross_entropy": 2.5}, step=8)
    logger.save()
    assert path.read_text() == HEADER + "0,3.5\n4,3.25\n8,2.5\n"


def test_a_whole_last_csv_line_is_kept(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(HEADER + "0,3.5\n4,3.25\n")
    assert [row["step"] for row in read_metrics_csv(path)[1]] == ["0", "4"]


# ------------------------------------------------------------------------------------------------------ W&B

ROWS = 120
PAD = 900  # ~1 KB per history record: the log spans several 32 KiB blocks


def _marker(i: int) -> str:
    return f"marker-{i:04d}-" + "x" * PAD


@pytest.fixture(scope="module")
def wandb_log(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A real offline W&B run of ROWS history rows; (its transaction log, the rows `wandb leet` reads from it)."""
    import wandb

    root = tmp_path_factory.mktemp("wb")
    run = wandb.init(project="t", dir=str(root), id="readme1", mode="offline")
    for i in range(ROWS):
        run.log({"decomp/a/cross_entropy": 1.0 / (i + 1), "pad": _marker(i), "trainer/global_step": i})
    run.finish()
    (path,) = run_files(root / "wandb", "readme1")
    rows = [r for r in wandb_history(path.parent) if "pad" in r]
    assert [r["trainer/global_step"] for r in rows] == list(range(ROWS))
    return path, rows


def _ours(rows: list[dict]) -> list[tuple[int, str, float]]:
    """The logged values of each history row (None for a value a row lacks: a row read in part)."""
    return [(r.get("trainer/global_step"), r.get("pad"), r.get("decomp/a/cross_entropy")) for r in rows
            if "_step" in r or "pad" in r]


def test_the_reader_reads_what_wandb_reads(wandb_log):
    path, want = wandb_log
    assert _ours(history_rows(path)) == _ours(want)


def test_a_torn_tail_ends_the_log_and_never_yields_part_of_a_row(wandb_log, tmp_path):
    path, want = wandb_log
    data = path.read_bytes()
    torn = tmp_path / "run-torn.wandb"
    full = _ours(want)
    last = data.find(_marker(ROWS - 1).encode())
    counts = []
    for cut in range(last - 2500, len(data), 7):  # cuts through the last two rows, the records after, their headers
        torn.write_bytes(data[:cut])
        got = _ours(history_rows(torn))
        assert got == full[:len(got)], cut  # a prefix of the rows, each whole
        counts.append(len(got))
    assert counts == sorted(counts) and counts[0] < ROWS - 1 and counts[-1] == ROWS  # more bytes never lose a row


def test_a_damaged_record_costs_its_block_not_the_rest_of_the_log(wandb_log, tmp_path):
    path, want = wandb_log
    data = bytearray(path.read_bytes())
    offsets = [data.find(_marker(i).encode()) for i in range(ROWS)]
    block = 32 * 1024
    hit = next(i for i, at in enumerate(offsets) if at > block + 4000)  # a row well inside the second block
    data[offsets[hit] + 3] ^= 0xFF  # one byte of its value: its chunk's CRC no longer matches
    damaged = tmp_path / "run-damaged.wandb"
    damaged.write_bytes(bytes(data))
    got = _ours(history_rows(damaged))
    full = _ours(want)
    assert [row for row in got if row[0] == hit] == []  # the damaged row is not read (nor a mangled copy of it)
    assert set(got) <= set(full)  # every row read is one wandb reads, whole
    kept = {row[0] for row in got}
    assert set(range(hit)) <= kept  # everything before it
    later = [i for i, at in enumerate(offsets) if at // block > offsets[hit] // block and at % block > 2 * (PAD + 200)]
    assert later and set(later) <= kept  # and every row that starts in a later block
    assert os.path.getsize(damaged) == len(data)


def test_the_ledger_of_a_csv_logger_is_the_steps_its_file_holds(tmp_path):
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "decomp/a/cross_entropy", "train/loss"])
        writer.writerows([[0, 3.5, ""], [1, "", 3.0], [4, 3.2, ""], [4, "", 2.9]])
    assert sinks.ledger(DurableCSVLogger(tmp_path)) == {0, 4}  # rows with a decomposition value only
