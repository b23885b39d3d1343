"""Job arrays for replay: `replay.shard=i/n` walks a deterministic slice of the (model, revision) list, and
`replay.shard=merge` combines the slices into the one `results.jsonl` a single walk would have written.

Shard `i` of `n` takes the checkpoints at positions `i, i + n, i + 2n, ...` of the walk (round robin, so a
list ordered by model size spreads the large models over the shards). Each shard is a replay of its own in
`output_dir/shards/<i>of<n>/` (results, per-model arrays, W&B runs, lock): shards never write the same file, a
rerun of a shard resumes from its own results, and any launcher runs them side by side (`sbatch --array=0-3`
with `replay.shard=$SLURM_ARRAY_TASK_ID/4`).

The merge checks that the shard folders present are exactly `0ofN ... (N-1)ofN` for one N, that every shard
holds every row of its slice and no row of another, and then writes `output_dir/results.jsonl` in the walk's
order (checkpoint, then eval set) and copies each model's `arrays/` beside it. It refuses, naming the shards,
when a shard is missing or incomplete, or when shards overlap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SHARDS = "shards"  # output_dir/shards/<i>of<n>/
MERGE = "merge"
_SHARD = re.compile(r"(\d+)/(\d+)")
_FOLDER = re.compile(r"(\d+)of(\d+)")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` (0-based)."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.index}of{self.count}"

    def take(self, walk: Sequence[T]) -> list[T]:
        """This shard's items of `walk`, in walk order."""
        return list(walk[self.index::self.count])


def parse_shard(value: str) -> Shard:
    """`"i/n"` -> Shard(i, n); ValueError unless 0 <= i < n."""
    match = _SHARD.fullmatch(str(value).strip())
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"replay.shard={value!r}: expected i/n with 0 <= i < n (e.g. 0/4), or 'merge'")
    return Shard(int(match.group(1)), int(match.group(2)))


def is_shard_value(value: Any) -> bool:
    """What `replay.shard` accepts: null, `merge`, or `i/n` with 0 <= i < n (config_schema's rule)."""
    if value is None or value == MERGE:
        return True
    try:
        parse_shard(value)
    except ValueError:
        return False
    return isinstance(value, str)


def shard_dir(output_dir: str | os.PathLike, shard: Shard) -> Path:
    """Where shard `shard` of a walk into `output_dir` writes everything it writes."""
    return Path(output_dir) / SHARDS / shard.name


class MergeError(ValueError):
    """Shards that cannot be merged into one walk; the message names the shards and what to run."""


def _present(output_dir: Path) -> dict[str, Shard]:
    root = output_dir / SHARDS
    found = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        match = _FOLDER.fullmatch(entry.name)
        if entry.is_dir() and match:
            found[entry.name] = Shard(int(match.group(1)), int(match.group(2)))
    return found


def merge_shards(output_dir: str | os.PathLike, walk: Sequence[tuple[str, str]], eval_sets: Sequence[str],
                 rerun: str = "ce-dynamics replay ... replay.shard={i}/{n}") -> Path:
    """Merge `output_dir/shards/*` into `output_dir/results.jsonl` (see the module docstring); its path.

    `walk`: the (model, revision) list of one walk, in order, as `checkpoints.plan` gives it; `rerun`: the command a
    message suggests for a missing or incomplete shard (`{i}`, `{n}` filled in). Raises MergeError.
    """
    from ce_dynamics.files import atomic_open, read_results  # imports torch: not when the config is checked

    out = Path(output_dir)
    present = _present(out)
    if not present:
        raise MergeError(f"no shards to merge: {out / SHARDS} holds no <i>of<n> folders; run the shards first "
                         f"({rerun.format(i='I', n='N')} for I in 0..N-1)")
    counts = sorted({s.count for s in present.values()})
    if len(counts) > 1:
        groups = "; ".join(f"n={n}: {', '.join(k for k, s in present.items() if s.count == n)}" for n in counts)
        raise MergeError(f"overlapping shards in {out / SHARDS}: slices of different n cover the same rows ({groups});"
                         " keep the folders of one n and move the others away")
    n = counts[0]
    missing = [Shard(i, n) for i in range(n) if Shard(i, n).name not in present]
    if missing:
        raise MergeError(f"missing shard(s) {', '.join(s.name for s in missing)} of {n} in {out / SHARDS}; run "
                         + "; ".join(rerun.format(i=s.index, n=n) for s in missing))

    position = {(m, r, d): (k, j) for k, (m, r) in enumerate(walk) for j, d in enumerate(eval_sets)}
    holders: dict[tuple, list[str]] = {}
    rows: dict[tuple, dict[str, Any]] = {}
    for name, shard in present.items():
        expected = {(m, r, d) for m, r in shard.take(walk) for d in eval_sets}
        got = {}
        for row in read_results(out / SHARDS / name / "results.jsonl"):
            key = (row.get("model"), row.get("revision"), row.get("dataset"))
            got[key] = row
            holders.setdefault(key, []).append(name)
        outside = [k for k in got if k not in expected]
        overlap = {k: v for k, v in holders.items() if len(v) > 1}
        if overlap:
            key, names = next(iter(overlap.items()))
            raise MergeError(f"overlapping shards {' and '.join(names)}: both hold the row {_show(key)} "
                             f"({len(overlap)} such row(s))")
        if outside:
            raise MergeError(f"shard {name} holds {len(outside)} row(s) outside its slice, e.g. {_show(outside[0])}: "
                             "it was run with another replay.models/revisions/eval_sets or another n")
        absent = sorted((k for k in expected if k not in got), key=position.__getitem__)
        if absent:
            raise MergeError(f"shard {name} is incomplete: {len(absent)} of {len(expected)} row(s) missing, e.g. "
                             f"{_show(absent[0])}; rerun it (it resumes): {rerun.format(i=shard.index, n=n)}")
        rows.update(got)

    merged = [rows[k] for k in sorted(rows, key=position.__getitem__)]
    target = out / "results.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in merged)
    if target.exists() and target.read_text(encoding="utf-8") != text:
        raise MergeError(f"{target} exists and differs from the merge of {', '.join(present)}; move it away first "
                         "(the merge never overwrites other results)")
    with atomic_open(target, "w") as handle:
        handle.write(text)
    for name in present:
        _copy_arrays(out / SHARDS / name, out)
    return target


def _show(key: tuple) -> str:
    return "(model {!r}, revision {!r}, dataset {!r})".format(*key)


def _copy_arrays(shard_root: Path, out: Path) -> None:
    """`<shard>/<model>/arrays/**` -> `<out>/<model>/arrays/**` (each file atomically, skipped when equal)."""
    from ce_dynamics.files import atomic_path

    for source in sorted(shard_root.glob("*/arrays/*/*.npz")):
        target = out / source.relative_to(shard_root)
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
