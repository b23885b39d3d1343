"""Readable W&B: histogram edges on log10(rank + 1) with rank 0 alone in the first bucket, and the npz state of
a validation logged as a W&B Artifact (offline run, real wandb)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ce_dynamics.functional import decomposition_from_state
from ce_dynamics.plotting import bucket_sums, log_rank_edges, rank_bucket_edges, wandb_rank_histograms


@pytest.mark.parametrize("vocab", [7, 50304])
def test_histogram_edges_are_log10_rank_plus_one_with_rank_zero_first(vocab):
    edges = rank_bucket_edges(vocab, 512)
    x = log_rank_edges(edges)
    assert x[0] == 0.0 and x[1] == pytest.approx(math.log10(2))  # bucket 0 = rank 0 alone
    assert x[-1] == pytest.approx(math.log10(vocab + 1))
    assert np.all(np.diff(x) > 0)
    if vocab > 512:  # rank 0's bucket: 1/50304 of a raw-rank axis, a visible 6% of this one
        assert x[1] / x[-1] > 0.06 and (edges[1] - edges[0]) / edges[-1] < 1e-4
    p = np.zeros(vocab)
    p[0], p[3], p[-1] = 0.7, 0.2, 0.1
    hist = wandb_rank_histograms(p, p, max_buckets=512)["p_e"]
    counts, bins = hist.histogram, hist.bins
    assert counts[0] == pytest.approx(0.7) and sum(counts) == pytest.approx(1.0)
    assert bins == pytest.approx(list(x))
    assert np.allclose(counts, bucket_sums(p, edges))
    with pytest.raises(ValueError, match="starting at 0"):
        log_rank_edges(np.array([1, 2, 3]))


def test_state_artifact_holds_each_datasets_npz(tmp_path, monkeypatch):
    import wandb

    from ce_dynamics.lightning.wandb_artifacts import ARTIFACT_TYPE, log_state_artifact

    rng = np.random.default_rng(0)
    states = {name: (torch.from_numpy(rng.integers(0, 9, 11)), torch.from_numpy(-rng.uniform(0, 5, 11)))
              for name in ("code", "prose")}
    run = wandb.init(mode="offline", dir=str(tmp_path), project="ce-dynamics-test")
    try:
        artifact = log_state_artifact(run, states, step=40)
    finally:
        run.finish()
    assert artifact.type == ARTIFACT_TYPE and artifact.name.startswith(f"{ARTIFACT_TYPE}-{run.id}")
    assert artifact.metadata == {"step": 40, "datasets": ["code", "prose"]}
    entries = artifact.manifest.entries
    assert sorted(entries) == ["code/step_40.npz", "prose/step_40.npz"]
    for name, (counts, sums) in states.items():
        with np.load(entries[f"{name}/step_40.npz"].local_path) as data:
            np.testing.assert_array_equal(data["rank_counts"], counts.numpy())
            np.testing.assert_array_equal(data["rank_log_score_sum"], sums.numpy())
            out = decomposition_from_state(torch.from_numpy(data["rank_counts"]),
                                           torch.from_numpy(data["rank_log_score_sum"]))
        assert float(out["cross_entropy"]) == pytest.approx(float(-sums.sum() / counts.sum()))
