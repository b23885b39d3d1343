"""The end-of-run summary of `train.py` / `ce-dynamics`: what the run measured, where it went, what to run next.

Built only from what the run wrote in `output_dir` (the npz arrays of a training run, `results.jsonl` of a
replay or sweep, the W&B, CSV and checkpoint folders), so it says what is on disk, not what was intended.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ce_dynamics.bootstrap import summary_of_state
from ce_dynamics.files import ResultsError, load_state, state_files
from ce_dynamics.functional import decomposition_from_state
from ce_dynamics.runs.commands import rerun, shown_path, tool

_COLUMNS = (("cross_entropy", "CE"), ("error_entropy", "EE"), ("self_alignment", "SA"), ("confidence", "Conf"),
            ("accuracy", "acc"), ("num_tokens", "tokens"))
_MAX_ROWS = 12


def last_arrays(arrays_dir: Path) -> dict[str, tuple[int, Path]]:
    """Per eval set under `arrays_dir`, the highest step's `step_<N>.npz`: {set: (N, path)}."""
    found: dict[str, tuple[int, Path]] = {}
    if not arrays_dir.is_dir():
        return found
    for folder in sorted(p for p in arrays_dir.iterdir() if p.is_dir()):
        steps = state_files(folder)
        if steps:
            found[folder.name] = max(steps.items())
    return found


def decomposition_rows(output_dir: Path) -> list[dict[str, Any]]:
    """The last decomposition per eval set: from `results.jsonl` (replay, sweep: the highest step per model
    and dataset, and each named revision such as `main` on its own) if there is one, else from the last npz
    arrays of a training run."""
    from ce_dynamics.files import read_results

    results = output_dir / "results.jsonl"
    if results.is_file():
        last: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in read_results(results):
            named = not str(row["revision"]).startswith("step")  # `main`: a point of its own, step known or not
            key = (str(row["model"]), str(row["dataset"]), str(row["revision"]) if named else "")
            if key not in last or named or int(row["step"]) >= int(last[key]["step"]):
                last[key] = row
        return [{**row, "name": f"{row['model']} {row['revision']} {row['dataset']}"} for row in last.values()]
    rows = []
    for name, (step, path) in last_arrays(output_dir / "arrays").items():
        data = load_state(path)  # DamagedFileError names a file that cannot be read
        out = decomposition_from_state(data["rank_counts"], data["rank_log_score_sum"])
        out.update(summary_of_state(data))  # the intervals, when the run kept the bootstrap's state
        rows.append({"name": f"{name} step {step}", **{k: float(out[k]) for k, _ in _COLUMNS[:-1]},
                     **{f"{k}_se": float(out[f"{k}_se"]) for k, _ in _COLUMNS[:-1] if f"{k}_se" in out},
                     "num_tokens": int(out["num_tokens"])})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of `rows` (CE = EE + SA - Conf in nats per token); a value with a bootstrap
    standard error (`<key>_se`) reads `5.0712 +- 0.0213`."""
    shown = list(rows)[-_MAX_ROWS:]
    header = ["", *(label for _, label in _COLUMNS)]
    body = [[str(r["name"]), *(f"{int(r[k]):,}" if k == "num_tokens" else _cell(r, k) for k, _ in _COLUMNS)]
            for r in shown]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    if len(rows) > len(shown):
        lines.append(f"({len(rows) - len(shown)} earlier rows in results.jsonl)")
    return "\n".join(lines)


def _cell(row: Mapping[str, Any], key: str) -> str:
    se = row.get(f"{key}_se")
    text = f"{float(row[key]):.4f}"
    return f"{text} +- {float(se):.4f}" if isinstance(se, (int, float)) and np.isfinite(se) else text


def _newest(paths: Sequence[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def locations(output_dir: Path) -> dict[str, Path]:
    """Where the run's outputs went (only those that exist)."""
    found: dict[str, Path] = {}
    wandb_runs = [p for p in output_dir.glob("**/wandb/*run-*") if p.is_dir()]
    if (run := _newest(wandb_runs)) is not None:
        found["W&B run"] = run
    if (csv := _newest(list(output_dir.glob("**/csv/version_*/metrics.csv")))) is not None:
        found["CSV log"] = csv
    arrays = sorted(output_dir.glob("**/arrays"))
    if arrays:
        found["arrays"] = arrays[0] if len(arrays) == 1 else output_dir
    if (output_dir / "results.jsonl").is_file():
        found["results"] = output_dir / "results.jsonl"
    figures = sorted(output_dir.glob("*.png"))
    if figures:
        found["figures"] = output_dir if len(figures) > 1 else figures[0]
    if (output_dir / "checkpoints").is_dir():
        found["checkpoints"] = output_dir / "checkpoints"
    return found


def next_commands(mode: str, argv: Sequence[str], output_dir: Path, where: Mapping[str, Path], exit_code: int = 0,
                  prog: str = "train.py") -> list[str]:
    """The commands a user is likely to want next, each runnable as printed (see `ce_dynamics.runs.commands`):
    after a failure only the rerun that resumes; after a success the ways to look at what the run wrote."""
    args = [a for a in argv if not a.startswith(("ckpt_path=", "overwrite="))]
    if exit_code != 0:
        if mode == "train" and any((output_dir / name).exists() for name in ("checkpoints", "arrays")):
            return [f"resume:     {rerun([*args, 'ckpt_path=last'], prog)}"]
        if mode in ("replay", "sweep") and (output_dir / "results.jsonl").is_file():
            return [f"rerun:      {rerun(args, prog)}   (does only what is missing)"]
        return []
    commands = []
    wandb = tool("wandb")
    if "W&B run" in where and wandb:
        run = where["W&B run"]
        commands.append(f"metrics:    {wandb} leet inspect --summary {shlex.quote(shown_path(run))}")
        commands.append(f"browse:     {wandb} leet {shlex.quote(shown_path(run.parent))}   (terminal UI; q quits)")
        if run.name.startswith("offline-run-"):
            commands.append(f"upload:     {wandb} sync {shlex.quote(shown_path(run))}   (after wandb login)")
    if "results" in where and mode == "replay":  # a sweep printed its scaling tables already
        commands.append(f"scaling:    {scaling_command(where['results'])}")
    notebook = "scaling_law" if "results" in where else "training_dynamics"
    papermill = tool("papermill")
    if (Path("notebooks") / f"{notebook}.ipynb").is_file() and papermill and (where.get("results") or "arrays" in where):
        parameter = (f"results_path {shlex.quote(shown_path(where['results']))}" if "results" in where
                     else f"run_dir {shlex.quote(shown_path(output_dir))}")
        commands.append(f"notebook:   {papermill} notebooks/{notebook}.ipynb "
                        f"{shlex.quote(shown_path(output_dir / f'{notebook}.ipynb'))} -p {parameter}")
    return commands


def scaling_command(results: Path) -> str:
    """`ce-dynamics scaling RESULTS` as this environment runs it."""
    return f"{tool('ce-dynamics') or 'ce-dynamics'} scaling {shlex.quote(shown_path(results))}"


def summary_text(mode: str, output_dir: str | Path, argv: Sequence[str] = (), exit_code: int = 0,
                 prog: str = "train.py") -> str:
    """The summary as text (see the module docstring)."""
    out = Path(output_dir)
    status = "finished" if exit_code == 0 else f"ended with exit code {exit_code}"
    lines = [f"== ce-dynamics {mode} {status}: {out}"]
    try:
        rows = decomposition_rows(out) if out.is_dir() else []
    except ResultsError as err:  # a damaged results or state file: say which, and go on with the rest
        rows = []
        lines += ["", f"cannot show the last decomposition: {err}"]
    if rows:
        lines += ["", "last decomposition (nats/token; CE = EE + SA - Conf):", format_table(rows)]
    elif not lines[-1].startswith("cannot show"):
        lines += ["", "no decomposition was written (no arrays, no results.jsonl)"]
    where = locations(out) if out.is_dir() else {}
    if where:
        width = max(len(k) for k in where)
        lines += ["", "outputs:", *(f"  {k.ljust(width)}  {v}" for k, v in where.items())]
    commands = next_commands(mode, argv, out, where, exit_code, prog)
    if commands:
        lines += ["", "next:", *(f"  {c}" for c in commands)]
    return "\n".join(lines)


def print_summary(cfg: Any, argv: Sequence[str] = (), exit_code: int = 0, file: TextIO | None = None,
                  prog: str = "train.py") -> None:
    """Print :func:`summary_text` for a composed config (global rank zero only, under DDP)."""
    try:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank != 0:
            return
    except ImportError:
        pass
    print("\n" + summary_text(str(cfg.mode), cfg.output_dir, argv, exit_code, prog), file=file or sys.stdout, flush=True)
