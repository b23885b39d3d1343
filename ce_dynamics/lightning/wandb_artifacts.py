"""The exact state of each validation as a W&B Artifact, so a synced run carries the arrays its charts came from.

One artifact per run (`ce-decomposition-state-<run id>`, type `ce-decomposition-state`), one version per
validation step (alias `step_<N>`), holding `<dataset>/step_<N>.npz` with `rank_counts` and
`rank_log_score_sum`: the same files as `output_dir/arrays/`, from which every logged number is recomputed
with :func:`ce_dynamics.functional.decomposition_from_state`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ARTIFACT_TYPE = "ce-decomposition-state"


def artifact_name(run: Any) -> str:
    """The artifact of `run`: one per run, its versions are the validation steps."""
    return f"{ARTIFACT_TYPE}-{run.id}"


def log_state_artifact(run: Any, states: Mapping[str, tuple[Any, Any]], step: int) -> Any:
    """Log `states` ({dataset: (rank_counts, rank_log_score_sum)}, tensors or arrays) of validation `step` as
    a new version of the run's state artifact; returns the `wandb.Artifact`."""
    import wandb

    if not states:
        raise ValueError("Expected at least one dataset's state, got none.")
    artifact = wandb.Artifact(artifact_name(run), type=ARTIFACT_TYPE,
                              description="per-rank state of the cross-entropy decomposition, one npz per eval set",
                              metadata={"step": int(step), "datasets": sorted(states)})
    with tempfile.TemporaryDirectory(prefix="ce_dynamics_artifact_") as tmp:
        for name, (counts, sums) in states.items():
            path = Path(tmp) / name / f"step_{step}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, rank_counts=_numpy(counts), rank_log_score_sum=_numpy(sums))
            artifact.add_file(str(path), name=f"{name}/step_{step}.npz")  # copied into W&B's staging area now
    run.log_artifact(artifact, aliases=[f"step_{step}", "latest"])
    return artifact


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
