"""Where each validation's record goes, exactly once: the ``.npz`` state first (the truth), then every logger.

A validation is recorded as one row per logger at one step: ``decomp/<set>/<key>`` for every eval set (plus
``decomp/<set>/nonfinite_tokens``, ``decomp/<set>/<key>_bpb`` when the datamodule knows the eval text's bytes,
and, when ``validation_step`` returned a loss, ``val/loss/<set>``), and on W&B
the p_e/q_e histograms and image. The state behind the row is written first, atomically, to
``arrays/<set>/step_<N>.npz``. Loggers that can be read back (W&B, from its transaction logs; the
:class:`~ce_dynamics.lightning.csv_logger.DurableCSVLogger`) keep a ledger of the steps they durably hold: a row is never
logged to a logger that already holds its step, and on (re)start every saved step a logger lacks is logged to it
from the ``.npz`` files (:func:`backfill`). Whatever kills the process, each sink ends with each step once.
"""

from __future__ import annotations

from ce_dynamics._extras import require

require("lightning")

import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from ce_dynamics.bootstrap import interval_keys, replicates_field, summary_of_state
from ce_dynamics.bpb import bits_per_byte
from ce_dynamics.lightning.csv_logger import DurableCSVLogger
from ce_dynamics.files import DamagedFileError, load_state, saved_steps, set_aside, set_aside_damaged_states, state_path
from ce_dynamics.functional import KEYS, decomposition_from_state
from ce_dynamics.wandb_history import logged_steps, run_files

ROW_PREFIX = "decomp/"
_LEDGERS: weakref.WeakKeyDictionary[Logger, set[int]] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------- state files
# (the files themselves: ce_dynamics.files.state_path / save_state / load_state / saved_steps)


def recorded(root: Path, names: Iterable[str], step: int) -> bool:
    """Whether every one of ``names`` has its state of ``step`` saved under ``root/arrays``: a validation at that
    step is recorded, and a later one at the same step is not (the first validation at a step wins in every sink)."""
    return all(state_path(root, name, step).exists() for name in names)


def results_of(state: Mapping[str, Any]) -> dict[str, Any]:
    """The decomposition dict of a saved state (plus its ``loss``, when it has one, and the bootstrap's
    intervals, recomputed from the state's per-group arrays, when it has them)."""
    out = decomposition_from_state(torch.as_tensor(state["rank_counts"]), torch.as_tensor(state["rank_log_score_sum"]),
                                   int(state.get("nonfinite_tokens", 0)))
    out.update(summary_of_state(state, keep_replicates=True))
    for key, kind in (("loss", float), ("num_bytes", int)):
        if key in state:
            out[key] = kind(state[key])
    return out


def bpb_of(results: Mapping[str, Any]) -> dict[str, float]:
    """``<component>_bpb`` (bits per UTF-8 byte of the evaluated text) when the state knows its bytes, else {}."""
    if not results.get("num_bytes") or not int(results["num_tokens"]):
        return {}
    return bits_per_byte({key: float(results[key]) for key in KEYS}, int(results["num_bytes"]),
                         num_tokens=int(results["num_tokens"]))


def intervals_of(results: Mapping[str, Any]) -> dict[str, float]:
    """The bootstrap's keys of one decomposition dict (``<key>_se``, ``_lo``, ``_hi`` and the bias-corrected
    Error-Entropy), as floats; {} when the bootstrap was off."""
    return {key: float(results[key]) for key in interval_keys() if key in results}


def scalars_of(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The row's scalars: ``decomp/<set>/<key>``, ``decomp/<set>/nonfinite_tokens`` and ``val/loss/<set>``."""
    row: dict[str, float] = {}
    for name, out in results.items():
        row.update({f"{ROW_PREFIX}{name}/{key}": float(out[key]) for key in KEYS})
        row.update({f"{ROW_PREFIX}{name}/{key}": value for key, value in bpb_of(out).items()})
        row.update({f"{ROW_PREFIX}{name}/{key}": value for key, value in intervals_of(out).items()})
        row[f"{ROW_PREFIX}{name}/nonfinite_tokens"] = int(out.get("nonfinite_tokens", 0))
        if out.get("loss") is not None:
            row[f"val/loss/{name}"] = float(out["loss"])
    return row


# ------------------------------------------------------------------------------------------------ ledger


def ledger(logger: Logger) -> set[int] | None:
    """The steps whose row ``logger`` durably holds (read back once, then kept up to date); None for a logger
    that cannot be read back (it gets every row, and nothing is back-filled into it)."""
    if logger in _LEDGERS:
        return _LEDGERS[logger]
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        steps = logged_steps(run_files(Path(run.dir).parent.parent, run.id), ROW_PREFIX)
    elif isinstance(logger, DurableCSVLogger):
        steps = {int(float(row["step"])) for row in logger.rows()
                 if any(k.startswith(ROW_PREFIX) and row[k] not in ("", None) for k in row)}
    else:
        return None
    _LEDGERS[logger] = steps
    return steps


def holds(logger: Logger, step: int) -> bool:
    steps = ledger(logger)
    return steps is not None and step in steps


def log_row(logger: Logger, step: int, scalars: Mapping[str, float], media: Mapping[str, Any] | None = None) -> None:
    """Log one validation's row to ``logger`` at ``step`` and note it in the logger's ledger."""
    if isinstance(logger, WandbLogger):
        logger.experiment.log({**scalars, **(media or {}), "trainer/global_step": step})
    else:
        logger.log_metrics(dict(scalars), step=step)
        logger.save()
    steps = ledger(logger)
    if steps is not None:
        steps.add(step)


# ----------------------------------------------------------------------------------------------- W&B media


class WandbMedia:
    """The p_e/q_e histograms (rank buckets on a log10(rank + 1) axis) and the p_e-vs-q_e image of a validation's row."""

    def __init__(self, max_buckets: int = 512) -> None:
        self.max_buckets = max_buckets
        self._renderers: dict[str, Any] = {}  # per eval set: PEQERenderer, which caches the figure's background

    def __call__(self, distributions: Mapping[str, tuple[np.ndarray, np.ndarray]], step: int,
                 max_buckets: int | None = None) -> dict[str, Any]:
        import wandb

        from ce_dynamics.plotting import PEQERenderer, wandb_rank_histograms

        media: dict[str, Any] = {}
        for name, (p_e, q_e, *values) in distributions.items():  # values: the scalars, for the image's panel
            for key, histogram in wandb_rank_histograms(p_e, q_e, self.max_buckets if max_buckets is None else max_buckets).items():  # x: log10(rank + 1)
                media[f"{ROW_PREFIX}{name}/{key}"] = histogram
            renderer = self._renderers.setdefault(name, PEQERenderer())
            media[f"{ROW_PREFIX}{name}/p_e_vs_q_e"] = wandb.Image(renderer.render(p_e, q_e, title=f"{name}, step {step}",
                                                                                  values=values[0] if values else None))
        return media


def distributions_of(results: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Per eval set: ``(p_e, q_e, {0-dim result: float})`` for the W&B media."""
    return {name: (out["p_e"].cpu().numpy(), out["q_e"].cpu().numpy(),
                   {k: float(v) for k, v in out.items() if getattr(v, "ndim", 1) == 0}) for name, out in results.items()}


# --------------------------------------------------------------------------------------------- back-fill


def backfill(loggers: Iterable[Logger], root: Path, names: Iterable[str],
             media: Callable[[dict[str, Any], int], dict[str, Any]] | None) -> list[int]:
    """Log every step saved under ``root/arrays`` (for all of ``names``) to each readable logger lacking it.

    Returns the steps that were logged somewhere. ``media`` None: W&B rows get scalars only. A state file that
    cannot be read is moved aside to ``<file>.damaged`` with a warning naming it (:func:`report_damaged`), and
    its step is logged nowhere: no logger is told of a row without the state behind it.
    """
    names = list(names)
    loggers = list(loggers)
    for path, why in set_aside_damaged_states(root, names):
        report_damaged(path, why, loggers)
    readable = [lg for lg in loggers if ledger(lg) is not None]
    done = []
    for step in saved_steps(root, names) if readable else []:
        lacking = [lg for lg in readable if not holds(lg, step)]
        if not lacking:
            continue
        try:
            results = {name: results_of(load_state(state_path(root, name, step))) for name in names}
        except DamagedFileError as err:  # the zip directory was whole but an array is not
            report_damaged(set_aside(err.path), err.reason, loggers)
            continue
        scalars = scalars_of(results)
        for logger in lacking:
            extra = media(distributions_of(results), step) if media and isinstance(logger, WandbLogger) else None
            log_row(logger, step, scalars, extra)
        done.append(step)
    return done


def report_damaged(moved: Path, why: str, loggers: Iterable[Logger]) -> None:
    """Say, loudly, that a state file was damaged and moved aside, and what that means for the record."""
    import re
    import sys
    import warnings

    match = re.fullmatch(r"step_(\d+)\.npz\.damaged", moved.name)
    step = int(match.group(1)) if match else None
    holding = [type(lg).__name__ for lg in loggers if step is not None and holds(lg, step)]
    consequence = (f"{', '.join(holding)} already hold(s) a row for step {step} that no saved state backs"
                   if holding else f"step {step} is logged to no logger that lacks it")
    message = (f"damaged state file {moved.with_suffix('')} ({why}) moved aside to {moved}; {consequence}. "
               "Re-evaluate that step (replay its checkpoint) to restore it.")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    print(f"ce-dynamics: warning: {message}", file=sys.stderr, flush=True)  # loud even where warnings are off
