"""Output files that survive crashes: atomic writes, and the rows of ``results.jsonl`` (DESIGN.md).

Everything this package writes for later (arrays, results, figures, tokenizers, run ids) goes through
:func:`atomic_path`: a temporary file in the same folder, renamed over the target only once it is complete,
so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from ce_dynamics.functional import KEYS

RESULT_FIELDS = ("model", "revision", "step", "dataset", "num_tokens", "non_embedding_params", *KEYS)
# With the bootstrap on (replay's and the sweep's default), rows also hold its keys: <key>_se, <key>_lo, <key>_hi
# for ce_dynamics.bootstrap.BOOTSTRAP_KEYS, error_entropy_mm/_bc/_half/_half_se (ce_dynamics.bootstrap.interval_keys),
# and "replicates": {key: [B values]}, the bootstrap replicates, paired across models (same instances, same draws).


class ResultsError(ValueError):
    """A results file or arrays folder that cannot be read; the message says what and where."""


class DamagedFileError(ResultsError):
    """A file this package wrote that cannot be read back (emptied, truncated, overwritten with other bytes).

    The message names the file, what is wrong with it and what to do; ``path`` is the file, ``reason`` what is
    wrong with it."""

    def __init__(self, path: str | os.PathLike, reason: str, remedy: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path} is damaged ({reason}); {remedy}")


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_text(path: str | os.PathLike, remedy: str) -> str:
    """A UTF-8 text file's contents; :class:`DamagedFileError` (naming the file, the first bad byte and
    ``remedy``) when it holds bytes that are not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        lines = data[:err.start].count(b"\n")
        raise DamagedFileError(path, f"bytes that are not UTF-8 at offset {err.start}, after {lines} complete "
                                     "line(s)", remedy) from None


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged file to ``<name>.damaged`` beside it (kept for inspection, no longer read); the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    return target


_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # atomic_path's names: .<target name>.<random>.tmp


_RUN_FOLDERS = ("arrays", "checkpoints", "csv")  # what a run writes below its directory (W&B keeps its own)


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_path` write left in a run directory ``root``:
    beside its own files, in its ``arrays/``, ``checkpoints/`` and ``csv/``, and the same in each sub-folder
    holding a run of its own (replay's per-model folders); the paths removed. Only for a directory no other
    process is writing."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [root, *(d for d in root.iterdir() if d.is_dir() and any((d / f).is_dir() for f in _RUN_FOLDERS))]
    removed = []
    for run in runs:
        folders = [run, *(d for f in _RUN_FOLDERS if (run / f).is_dir() for d, _, _ in os.walk(run / f))]
        for folder in map(Path, folders):
            for path in folder.iterdir():
                if path.is_file() and _TEMPORARY.fullmatch(path.name):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return sorted(removed)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open`` for writing that lands atomically (see :func:`atomic_path`), flushed to disk first."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def iter_result_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each JSON object line of a results file; ``ResultsError`` on a bad line."""
    path = Path(path)
    text = read_text(path, "remove the bad bytes (the lines before them are intact) and rerun")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ResultsError(f"{path}:{lineno}: not a JSON line ({err.msg}); expected one result row per line") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``results.jsonl``; ``[]`` when the file does not exist yet."""
    return [row for _, row in iter_result_rows(path)] if Path(path).exists() else []


def done_keys(path: str | os.PathLike) -> set[tuple[Any, Any, Any]]:
    """The ``(model, revision, dataset)`` of every row already in a results file: what a rerun skips."""
    return {(row.get("model"), row.get("revision"), row.get("dataset")) for row in read_results(path)}


def append_result_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append ``rows`` to a JSON-lines file atomically: a crash leaves the old file or the new one, never half."""
    for row in rows:
        missing = [k for k in RESULT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"result row is missing {missing}; every row needs {list(RESULT_FIELDS)}")
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    with atomic_open(path) as handle:
        handle.write(old + "".join(json.dumps(dict(row)) + "\n" for row in rows).encode())


def append_result_row(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one row atomically (see :func:`append_result_rows`)."""
    append_result_rows(path, [row])


# ------------------------------------------------------------------------------ per-validation state files
# ``<root>/arrays/<eval set>/step_<N>.npz``: ``rank_counts``, ``rank_log_score_sum`` and extras, written by the
# Lightning callback and the Hugging Face Trainer callback, read by replay, sweeps, the summary and scaling.

_STATE_FILE = re.compile(r"step_(\d+)\.npz")


def state_path(root: str | os.PathLike, name: str, step: int) -> Path:
    """Where eval set ``name``'s state of the validation at ``step`` lives under a run directory ``root``."""
    return Path(root) / "arrays" / name / f"step_{step}.npz"


def save_state(root: str | os.PathLike, name: str, step: int, state: Mapping[str, Any]) -> None:
    """Write one eval set's state of one validation (``rank_counts``, ``rank_log_score_sum``, extras) atomically;
    values may be tensors (on any device) or arrays."""
    arrays = {key: value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
              for key, value in state.items()}
    with atomic_open(state_path(root, name, step)) as handle:
        np.savez_compressed(handle, **arrays)  # the per-group bootstrap state is mostly zeros


STATE_REMEDY = ("move it aside (e.g. to <name>.damaged) or delete it; that validation is then missing from the "
                "record (rerun it, e.g. with replay.checkpoints=<the run's checkpoints>, to get it back)")
STATE_ARRAYS = ("rank_counts", "rank_log_score_sum")


def load_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of one state file; :class:`DamagedFileError` naming the file when it cannot be read or lacks
    ``rank_counts``/``rank_log_score_sum``. (``FileNotFoundError`` when there is no such file.)"""
    try:
        with np.load(path) as npz:
            state = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - numpy and zipfile raise many types for bad bytes
        raise DamagedFileError(path, f"not a readable .npz: {_reason(err)}", STATE_REMEDY) from None
    missing = [key for key in STATE_ARRAYS if key not in state]
    if missing:
        raise DamagedFileError(path, f"missing array(s) {missing}", STATE_REMEDY)
    return state


def check_state_file(path: str | os.PathLike) -> None:
    """Cheaply check that a state file is a whole ``.npz`` holding the state arrays (its zip directory, which is
    written last, is read; the arrays are not): :class:`DamagedFileError` if not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile raises BadZipFile, OSError, EOFError, ...
        raise DamagedFileError(path, f"not a readable .npz: {_reason(err)}", STATE_REMEDY) from None
    missing = [key for key in STATE_ARRAYS if f"{key}.npy" not in names]
    if missing:
        raise DamagedFileError(path, f"missing array(s) {missing}", STATE_REMEDY)


def state_files(folder: str | os.PathLike) -> dict[int, Path]:
    """``{step: path}`` of the ``step_<N>.npz`` files in one eval set's folder (empty if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _STATE_FILE.fullmatch(p.name))}


def set_aside_damaged_states(root: str | os.PathLike, names: Iterable[str]) -> list[tuple[Path, str]]:
    """Move every state file under ``root/arrays/<name>/`` that :func:`check_state_file` rejects to
    ``<file>.damaged``, so nothing takes it for a saved step; ``(new path, why)`` of each."""
    moved = []
    for name in names:
        for path in state_files(Path(root) / "arrays" / name).values():
            try:
                check_state_file(path)
            except DamagedFileError as err:
                moved.append((set_aside(path), err.reason))
    return moved


def saved_steps(root: str | os.PathLike, names: Iterable[str]) -> list[int]:
    """Steps whose state is saved for every one of ``names`` (a validation killed half-way is not among them)."""
    steps: set[int] | None = None
    for name in names:
        found = set(state_files(Path(root) / "arrays" / name))
        steps = found if steps is None else steps & found
    return sorted(steps or ())
