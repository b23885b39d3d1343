"""The instance bootstrap in the metric: point estimates unchanged, per-group state as numpy derives it, intervals
that numpy re-derives from the same draws, and that do not depend on batching, order, processes (real DDP, 2 gloo
processes) or a round trip through the saved state."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy_reference import decomposition, ranks_and_log_scores

from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.bootstrap import (
    BOOTSTRAP_KEYS,
    FIXED_POINT,
    instance_groups,
    interval_keys,
    replicate_weights,
    summary_of_state,
)
from ce_dynamics.files import load_state, save_state
from ce_dynamics.functional import KEYS

REPO = Path(__file__).resolve().parent.parent
V, DOCS, T = 29, 48, 12


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # documents of different difficulty, so that tokens of one document are alike
    logits = torch.randn(DOCS, T, V, generator=g) * torch.rand(DOCS, 1, 1, generator=g) * 4
    target = torch.randint(0, V, (DOCS, T), generator=g)
    target[0, :3] = -100
    return logits, target, torch.arange(DOCS) * 7 + 1000  # any integer ids


def intervals(out: dict) -> dict[str, float]:
    return {key: float(out[key]) for key in interval_keys()}


def test_point_estimates_are_unchanged_and_the_interval_keys_are_added() -> None:
    logits, target, ids = data()
    plain, boot = CrossEntropyDecomposition(V), CrossEntropyDecomposition(V, bootstrap=50)
    plain.update(logits, target)
    boot.update(logits, target, ids)
    a, b = plain.compute(), boot.compute()
    assert set(b) == set(a) | set(interval_keys())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in BOOTSTRAP_KEYS:
        assert float(b[f"{key}_lo"]) < float(b[f"{key}_hi"]) and float(b[f"{key}_se"]) > 0, key


def test_group_state_and_intervals_match_a_numpy_rederivation_from_the_same_draws() -> None:
    logits, target, ids = data()
    metric = CrossEntropyDecomposition(V, bootstrap=40, bootstrap_groups=8, bootstrap_seed=3)
    metric.update(logits, target, ids)
    out = metric.compute()
    ranks, log_scores = ranks_and_log_scores(logits.numpy(), target.numpy())
    kept = target.numpy().reshape(-1) != -100
    groups = instance_groups(ids.repeat_interleave(T), 8, seed=3).numpy()[kept]
    assert groups.min() >= 0 and groups.max() < 8
    flat = groups * V + ranks
    np.testing.assert_array_equal(metric.group_rank_counts.numpy().reshape(-1), np.bincount(flat, minlength=8 * V))
    sums = metric.group_rank_log_score_sum.numpy().reshape(-1) / FIXED_POINT
    np.testing.assert_allclose(sums, np.bincount(flat, weights=log_scores, minlength=8 * V), rtol=1e-6, atol=1e-5)

    # every replicate: the tokens of each group repeated as often as the group was drawn, decomposed by numpy
    weights = replicate_weights(8, 40, seed=3)
    reps = {key: [] for key in BOOTSTRAP_KEYS}
    for w in weights:
        repeat = w[groups]
        d = decomposition(np.repeat(ranks, repeat), np.repeat(log_scores, repeat), V)
        for key in BOOTSTRAP_KEYS:
            reps[key].append(d[key])
    whole = decomposition(ranks, log_scores, V)
    for key in BOOTSTRAP_KEYS:
        values = np.asarray(reps[key])
        lo, hi = np.quantile(values, [0.025, 0.975])
        assert float(out[f"{key}_se"]) == pytest.approx(values.std(ddof=1), rel=1e-6, abs=1e-9), key
        assert float(out[f"{key}_lo"]) == pytest.approx(2 * whole[key] - hi, rel=1e-6, abs=1e-7), key
        assert float(out[f"{key}_hi"]) == pytest.approx(2 * whole[key] - lo, rel=1e-6, abs=1e-7), key
    ee = whole["error_entropy"]
    assert float(out["error_entropy_bc"]) == pytest.approx(2 * ee - np.mean(reps["error_entropy"]), rel=1e-6)
    assert float(out["error_entropy_mm"]) == pytest.approx(ee + (len(np.unique(ranks)) - 1) / (2 * len(ranks)))


def test_intervals_do_not_depend_on_batching_order_or_a_trip_through_the_saved_state(tmp_path: Path) -> None:
    logits, target, ids = data()
    whole = CrossEntropyDecomposition(V, bootstrap=64)
    whole.update(logits, target, ids)
    pieces = CrossEntropyDecomposition(V, bootstrap=64)
    for chunk in torch.randperm(DOCS, generator=torch.Generator().manual_seed(1)).split(5):
        pieces.update(logits[chunk], target[chunk], ids[chunk])
    flat = CrossEntropyDecomposition(V, bootstrap=64)  # per-token ids on flattened tokens
    flat.update(logits.reshape(-1, V), target.reshape(-1), ids.repeat_interleave(T))
    expected = intervals(whole.compute())
    assert intervals(pieces.compute()) == expected
    assert intervals(flat.compute()) == expected
    save_state(tmp_path, "set", 0, {"rank_counts": whole.rank_counts,
                                     "rank_log_score_sum": whole.rank_log_score_sum, **whole.bootstrap_state()})
    assert intervals(summary_of_state(load_state(tmp_path / "arrays" / "set" / "step_0.npz"))) == expected


def test_update_from_hidden_keeps_the_same_group_state_as_the_logits() -> None:
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    target = torch.randint(0, V, (6, 5), generator=g)
    target[1, 2] = -100
    ids = torch.arange(6)
    a, b = CrossEntropyDecomposition(V, bootstrap=10), CrossEntropyDecomposition(V, bootstrap=10)
    a.update(hidden @ weight.T, target, ids)
    b.update_from_hidden(hidden, weight, target, instance_ids=ids)
    assert torch.equal(a.group_rank_counts, b.group_rank_counts)


def test_bad_bootstrap_arguments_and_instance_ids_are_refused_clearly() -> None:
    logits, target, ids = data()
    with pytest.raises(ValueError, match="at least 2 replicates"):
        CrossEntropyDecomposition(V, bootstrap=1)
    with pytest.raises(ValueError, match="bootstrap_groups"):
        CrossEntropyDecomposition(V, bootstrap=10, bootstrap_groups=1)
    metric = CrossEntropyDecomposition(V, bootstrap=10)
    with pytest.raises(ValueError, match="leading part"):
        metric.update(logits, target, ids[:-1])
    with pytest.raises(TypeError, match="integer `instance_ids`"):
        metric.update(logits, target, ids.float())
    assert int(metric.rank_counts.sum()) == 0  # a refused batch adds nothing


def test_without_instance_ids_rows_are_instances_and_a_warning_says_so() -> None:
    logits, target, ids = data()
    metric = CrossEntropyDecomposition(V, bootstrap=20)
    with pytest.warns(UserWarning, match="no instance_ids"):
        metric.update(logits, target)
    given = CrossEntropyDecomposition(V, bootstrap=20)
    given.update(logits, target, torch.arange(DOCS))
    assert intervals(metric.compute()) == intervals(given.compute())


DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from ce_dynamics import CEDecompositionCallback

    V = 23
    x = torch.load(sys.argv[2])
    devices = int(sys.argv[3])

    class Bigram(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(V, V)

        def validation_step(self, batch, batch_idx):
            ids, rows = batch
            return {"logits": self.table(rows[:, :-1]), "labels": rows[:, 1:], "instance_ids": ids}

        def val_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            ids = torch.arange(len(x))
            # each rank: an interleaved share, in its own batch sizes and order
            share = ids[rank::world].flip(0) if world > 1 else ids
            return DataLoader(TensorDataset(share, x[share]), batch_size=3 + rank)

    if __name__ == "__main__":
        callback = CEDecompositionCallback(output_dir=sys.argv[1], dataset_names=["alpha"], bootstrap=100)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                            use_distributed_sampler=False, callbacks=[callback], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=sys.argv[1])
        trainer.validate(Bigram(), verbose=False)
        with open(f"{sys.argv[1]}/results_rank{trainer.global_rank}.json", "w") as fh:
            json.dump(callback.last_results, fh)
''')


@pytest.mark.slow
def test_ddp_two_processes_give_bit_identical_intervals_to_one_process(tmp_path: Path) -> None:
    x = torch.randint(0, 23, (20, 9), generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "data.pt")
    (tmp_path / "script.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        out.mkdir()
        proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(out), str(tmp_path / "data.pt"),
                               str(devices)], capture_output=True, text=True, timeout=240, env=env, cwd=out)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[devices] = json.loads((out / "results_rank0.json").read_text())["alpha"]
        if devices == 2:
            assert json.loads((out / "results_rank1.json").read_text())["alpha"] == results[2]
    one, two = results[1], results[2]
    for key in interval_keys():
        assert two[key] == one[key], key  # bit for bit
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-12)
    a, b = (load_state(tmp_path / f"devices{d}" / "arrays" / "alpha" / "step_0.npz") for d in (1, 2))
    for key in ("bootstrap_index", "bootstrap_counts", "bootstrap_log_score_sum"):
        np.testing.assert_array_equal(a[key], b[key])


def test_the_bootstrap_update_reads_no_value_back_without_validate_args() -> None:
    # Meta tensors have no data: any host read (.item(), bool(), nonzero) fails on them. Off CPU the torch backend
    # takes the GPU's path (every row, masks), so this checks the GPU path keeps no host synchronisation.
    metric = CrossEntropyDecomposition(V, validate_args=False, nan_strategy="ignore", bootstrap=20).to("meta")
    logits = torch.empty(3, 6, V, device="meta", dtype=torch.bfloat16)
    target = torch.empty(3, 6, device="meta", dtype=torch.int64)
    metric.update(logits, target, torch.empty(3, device="meta", dtype=torch.int64))
    metric.update(logits[:, :-1], target[:, 1:], torch.empty(3, 5, device="meta", dtype=torch.int64))
    assert metric.group_rank_counts.device.type == "meta" and metric.group_rank_counts.shape == (64, V)


def test_sample_sufficiency_readout_moves_as_half_the_instances_should() -> None:
    # 400 documents: the plug-in EE of half of them is lower (entropy is concave: the whole is the mixture of its
    # halves), and the standard error at half the instances is about sqrt(2) times the full one.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(400, 8, V, generator=g) * 2
    target = torch.randint(0, V, (400, 8), generator=g)
    # documents of different difficulty (the right token's logit raised by 0 to 4): a skewed p_e, far from the
    # uniform one, where EE's sampling error is first-order (near uniform it scales like 1/N, not 1/sqrt(N))
    logits.scatter_add_(2, target[..., None], torch.rand(400, 1, 1, generator=g).expand(400, 8, 1) * 4)
    metric = CrossEntropyDecomposition(V, bootstrap=200)
    metric.update(logits, target, torch.arange(400))
    out = metric.compute()
    assert float(out["error_entropy_half"]) < float(out["error_entropy"])
    assert 1.1 < float(out["error_entropy_half_se"]) / float(out["error_entropy_se"]) < 2.0
    assert float(out["error_entropy_mm"]) > float(out["error_entropy"])


def test_no_finite_token_gives_nan_intervals_not_an_error() -> None:
    metric = CrossEntropyDecomposition(V, nan_strategy="ignore", bootstrap=20)
    metric.update(torch.full((2, 3, V), float("nan")), torch.zeros(2, 3, dtype=torch.int64), torch.arange(2))
    with pytest.warns(UserWarning, match="No tokens"):
        out = metric.compute()
    assert all(math.isnan(float(out[key])) for key in interval_keys())
