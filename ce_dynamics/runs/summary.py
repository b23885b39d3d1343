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

from ce_dynamics.files import ResultsError, load_state, state_files
from ce_dynamics.functional import decomposition_from_state

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
        rows.append({"name": f"{name} step {step}", **{k: float(out[k]) for k, _ in _COLUMNS[:-1]},
                     "num_tokens": int(out["num_tokens"])})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of `rows` (CE = EE + SA - Conf in nats per token)."""
    shown = list(rows)[-_MAX_ROWS:]
    header = ["", *(label for _, label in _COLUMNS)]
    body = [[str(r["name"]), *(f"{int(r[k]):,}" if k == "num_tokens" else f"{float(r[k]):.4f}" for k, _ in _COLUMNS)]
            for r in shown]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    if len(rows) > len(shown):
        lines.append(f"({len(rows) - len(shown)} earlier rows in results.jsonl)")
    return "\n".join(lines)


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
    if (output_dir / "checkpoints").is_dir():
        found["checkpoints"] = output_dir / "checkpoints"
    return found


def next_commands(mode: str, argv: Sequence[str], output_dir: Path, where: Mapping[str, Path]) -> list[str]:
    """The commands a user is likely to want next."""
    args = [a for a in argv if not a.startswith(("ckpt_path=", "mode="))]
    commands = []
    if mode == "train" and (output_dir / "checkpoints" / "last.ckpt").is_file():
        commands.append(f"resume:     ce-dynamics train {shlex.join([*args, 'ckpt_path=last'])}".rstrip())
    if mode == "replay":
        commands.append(f"rerun:      ce-dynamics replay {shlex.join(args)}   (skips the rows already done)".rstrip())
    if "W&B run" in where:
        run = where["W&B run"]
        commands.append(f"browse:     wandb leet {shlex.quote(str(run.parent))}")
        if run.name.startswith("offline-run-"):
            commands.append(f"upload:     wandb sync {shlex.quote(str(run))}")
    if "results" in where:
        commands.append(f"scaling:    ce-dynamics scaling {shlex.quote(str(where['results']))}")
    notebook = "scaling_law" if "results" in where else "training_dynamics"
    commands.append(f"notebook:   jupyter execute notebooks/{notebook}.ipynb   "
                    f"(set {'results_path' if 'results' in where else 'run_dir'} = {str(output_dir)!r})")
    return commands


def summary_text(mode: str, output_dir: str | Path, argv: Sequence[str] = (), exit_code: int = 0) -> str:
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
    lines += ["", "next:", *(f"  {c}" for c in next_commands(mode, argv, out, where))]
    return "\n".join(lines)


def print_summary(cfg: Any, argv: Sequence[str] = (), exit_code: int = 0, file: TextIO | None = None) -> None:
    """Print :func:`summary_text` for a composed config (global rank zero only, under DDP)."""
    try:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank != 0:
            return
    except ImportError:
        pass
    print("\n" + summary_text(str(cfg.mode), cfg.output_dir, argv, exit_code), file=file or sys.stdout, flush=True)
