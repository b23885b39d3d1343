"""DurableCSVLogger: one ``metrics.csv`` per run, kept across resumes, never torn by a crash.

Lightning's ``CSVLogger`` starts a new ``version_N`` folder in every process, buffers rows, and rewrites its file
in place when a new column appears, so a killed run can lose rows or leave half a file. This logger keeps one
file per run (``<save_dir>/<name>/version_0/metrics.csv``), reads it back on start, appends whole lines with an
fsync at every ``save()`` (Lightning saves after each logging call), rewrites atomically when the columns grow,
and drops a torn last line on reading.
"""

from __future__ import annotations

from ce_dynamics._extras import require

require("lightning")

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from ce_dynamics.files import atomic_open, read_text

CSV_REMEDY = ("cut the file before the bad bytes (the rows before them are intact) or move it aside; the "
              "decomposition rows are then back-filled from arrays/ on the next start")


def read_metrics_csv(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a metrics CSV; a last line cut short by a crash (wrong field count) is dropped.
    ``DamagedFileError`` (naming the file) when it holds bytes that are not UTF-8."""
    path = Path(path)
    if not path.exists():
        return [], []
    text = read_text(path, CSV_REMEDY)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # torn by a crash mid-write
    reader = csv.reader(lines)
    header = next(reader, [])
    rows = [dict(zip(header, values)) for values in reader if len(values) == len(header)]
    return header, rows


class DurableCSVLogger(Logger):
    """A CSV logger whose file holds every row it was given once ``save()`` returned, across crashes and resumes.

    Args:
        save_dir: parent folder; the file is ``save_dir/name/version_0/metrics.csv``.
        name: sub-folder name (``csv``).
    """

    def __init__(self, save_dir: str | os.PathLike, name: str = "csv") -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self._name = name
        self._columns: list[str] | None = None  # as on disk; None: not read yet
        self._rows: list[dict[str, Any]] = []  # every row of the file (read back, then appended)
        self._unsaved: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name, "version_0")

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    @property
    @rank_zero_experiment
    def experiment(self) -> DurableCSVLogger:
        return self

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the file, with what this process logged since (saved or not)."""
        self._load()
        return [*self._rows, *self._unsaved]

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run's config is saved by train.py (W&B config); a CSV of metrics holds metrics only

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row: dict[str, Any] = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self.rows())
        self._unsaved.append(row)

    @rank_zero_only
    def save(self) -> None:
        self._load()
        if not self._unsaved:
            return
        new_columns = [k for row in self._unsaved for k in row]
        columns = list(dict.fromkeys([*(self._columns or []), *new_columns]))
        rows = [*self._rows, *self._unsaved]
        path = self.metrics_path
        if columns == self._columns and path.exists():
            with open(path, "a", encoding="utf-8", newline="") as handle:
                handle.write(_csv_text(columns, self._unsaved, header=False))
                handle.flush()
                os.fsync(handle.fileno())
        else:
            with atomic_open(path, "w") as handle:
                handle.write(_csv_text(columns, rows, header=True))
        self._rows, self._unsaved, self._columns = rows, [], columns

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _load(self) -> None:
        if self._columns is None:
            columns, rows = read_metrics_csv(self.metrics_path)
            self._columns, self._rows = columns, rows
            if self.metrics_path.exists():  # rewrite without a torn tail, so appends start on a fresh line
                with atomic_open(self.metrics_path, "w") as handle:
                    handle.write(_csv_text(columns, rows, header=True))


def _csv_text(columns: list[str], rows: list[Mapping[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
