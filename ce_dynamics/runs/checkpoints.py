"""What a replay walks: the (model, revision) list of hub checkpoints, or a training run's own `.ckpt` files, in
order (:func:`plan`), and where each one's outputs live (:attr:`Checkpoint.folder`, :func:`model_slug`).

Shared by the walk (`runs/replay.py`), the job-array shards (`runs/shards.py`) and the dry run (`runs/plan.py`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass(frozen=True)
class Checkpoint:
    """One thing to evaluate: a hub revision (`path` None) or a Lightning checkpoint file."""

    model: str  # hub id, or the checkpoint directory
    revision: str  # "stepN", or "main" (a model's final weights; no step known)
    step: int | None
    path: Path | None = None

    @property
    def named(self) -> bool:
        """A revision that is not a `stepN` branch (`main`): recorded apart from the model's training steps."""
        return self.step is None

    @property
    def folder(self) -> str:
        """The folder of output_dir holding this checkpoint's W&B run, CSV log and arrays: the model's, or for a
        named revision its own, `<model slug>@<revision>`."""
        return model_slug(self.model) + (f"@{re.sub(r'[^A-Za-z0-9._-]+', '-', self.revision)}" if self.named else "")

    @property
    def run_name(self) -> str:
        """The W&B run name of :attr:`folder`."""
        return f"replay {self.model}" + (f"@{self.revision}" if self.named else "")


def _hub_revisions(revisions: Iterable[Any]) -> list[tuple[str, int]]:
    out = []
    for rev in revisions:
        if isinstance(rev, int) and not isinstance(rev, bool) and rev >= 0:
            out.append((f"step{rev}", rev))
        elif isinstance(rev, str) and re.fullmatch(r"step\d+", rev):
            out.append((rev, int(rev[4:])))
        elif rev == "main":  # released models without step branches (GPT-2, OPT, Qwen, ...): their final weights
            out.append((rev, None))
        else:
            raise ValueError(f"replay.revisions entries must be training steps (0, 16, ...), 'stepN' or 'main'; "
                             f"got {rev!r}")
    return out


def _lightning_checkpoints(directory: str | os.PathLike) -> list[Checkpoint]:
    """The `*.ckpt` files under `directory`, one per global step (a named file beats `last*.ckpt`)."""
    import torch

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ValueError(f"replay.checkpoints must be a directory of Lightning .ckpt files; {root} is not a directory")
    by_step: dict[int, Path] = {}
    for path in sorted(root.rglob("*.ckpt"), key=lambda p: (p.name.startswith("last"), str(p))):
        try:
            meta = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad file
            raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
        step = int(meta.get("global_step", -1)) if isinstance(meta, dict) else -1
        if step < 0:
            raise ValueError(f"{path} has no global_step; is it a Lightning checkpoint?")
        by_step.setdefault(step, path)
    if not by_step:
        raise ValueError(f"no *.ckpt files under {root}")
    model = str(root.resolve())
    return [Checkpoint(model, f"step{s}", s, by_step[s]) for s in sorted(by_step)]


def plan(cfg: DictConfig) -> list[Checkpoint]:
    """What the walk evaluates, in order: models x revisions, or the checkpoints of `replay.checkpoints`."""
    if cfg.replay.checkpoints:
        return _lightning_checkpoints(cfg.replay.checkpoints)
    models = list(cfg.replay.models) or ([cfg.model.hub_id] if cfg.model.hub_id else [])
    if not models:
        raise ValueError("nothing to replay: set replay.models=[ORG/NAME,...], model.hub_id, or replay.checkpoints=DIR")
    if isinstance(cfg.replay.revisions, str):
        if cfg.replay.revisions != "all":
            raise ValueError(f"replay.revisions must be a list of training steps or 'all', got {cfg.replay.revisions!r}")
        from ce_dynamics.runs.revisions import step_revisions

        return [Checkpoint(str(m), rev, step) for m in models for rev, step in step_revisions(str(m))]
    revisions = _hub_revisions(cfg.replay.revisions)
    if not revisions:
        raise ValueError("replay.revisions is empty; give training steps, e.g. replay.revisions=[0,1000]")
    return [Checkpoint(str(m), rev, step) for m in models for rev, step in revisions]


def model_slug(model: str) -> str:
    """A folder name for a model: `EleutherAI/pythia-160m` -> `EleutherAI--pythia-160m`."""
    if Path(model).is_absolute():  # a checkpoint directory: its last parts plus a short hash of the path
        tail = "--".join(Path(model).parts[-3:])
        return "ckpt--" + re.sub(r"[^A-Za-z0-9._-]+", "-", tail) + "--" + hashlib.sha1(model.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--"))
