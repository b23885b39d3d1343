"""Vocab-sharded DTensor logits and the all-reduce state sync, in 2 real gloo processes on CPU.

One spawn runs every scenario (starting processes costs seconds); the tests check what each rank saved against
numpy on the full logits.
"""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ce_dynamics.metric import CrossEntropyDecomposition

pytestmark = pytest.mark.slow  # two gloo processes (make test-fast leaves them out)

VOCAB = 101  # odd: torch.chunk's split gives the ranks 51 and 50 columns
IGNORE = -100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _full_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same [2, 6, V] logits and targets on every rank: half the rows on a coarse grid (ties, also with the
    target's logit), targets in both shards, some positions ignored."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 6, VOCAB, generator=gen, dtype=torch.float64) * 3
    logits[0] = logits[0].round()
    target = torch.randint(0, VOCAB, (2, 6), generator=gen)
    target[0, 0], target[0, 1], target[1, 0] = 3, VOCAB - 1, 51  # first, last and first-of-shard-1 columns
    target[0, 2], target[0, 3], target[1, 1], target[1, 2] = 0, 50, 50, 0  # the shard boundaries, tied and not
    target[1, ::4] = IGNORE
    return logits.to(dtype), target


def _sync_case(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data per rank (and a different number of tokens)."""
    gen = torch.Generator().manual_seed(100 + rank)
    tokens = 40 + 25 * rank
    logits = torch.randn(tokens, VOCAB, generator=gen, dtype=torch.float64) * 2
    return logits, torch.randint(0, VOCAB, (tokens,), generator=gen)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        saved: dict = {}
        mesh = init_device_mesh("cpu", (world,))
        own_group = [dist.new_group([r]) for r in range(world)][rank]  # the data-parallel group of a tp-only mesh
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            logits, target = _full_case(dtype)
            sharded = distribute_tensor(logits, mesh, [Shard(-1)])
            saved[f"local_width_{dtype}"] = sharded.to_local().shape[-1]
            metric = CrossEntropyDecomposition(VOCAB, process_group=own_group)
            metric.update(sharded, target)
            with metric.sync_context():
                saved[f"dtensor_{dtype}"] = (metric.rank_counts.clone(), metric.rank_log_score_sum.clone())

        # The all-reduce sync over the default (world) group, with an all_gather spy: it must not gather.
        gathers = []
        real_all_gather = dist.all_gather

        def counting_all_gather(*args, **kwargs):
            gathers.append(1)
            return real_all_gather(*args, **kwargs)

        dist.all_gather = counting_all_gather
        try:
            metric = CrossEntropyDecomposition(VOCAB)
            metric.update(*_sync_case(rank))
            local = (metric.rank_counts.clone(), metric.rank_log_score_sum.clone())
            with metric.sync_context():
                saved["synced"] = (metric.rank_counts.clone(), metric.rank_log_score_sum.clone())
            saved["gathers_all_reduce"] = len(gathers)
            saved["unsynced_equal_local"] = bool(torch.equal(metric.rank_counts, local[0])
                                                 and torch.equal(metric.rank_log_score_sum, local[1]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                saved["computed"] = {k: v for k, v in metric.compute().items()}  # compute() syncs by itself

            from torchmetrics.utilities.distributed import gather_all_tensors

            gathers.clear()
            custom = CrossEntropyDecomposition(VOCAB)
            custom.update(*_sync_case(rank))
            with custom.sync_context(dist_sync_fn=lambda x, group=None: gather_all_tensors(x, group)):
                saved["synced_custom"] = (custom.rank_counts.clone(), custom.rank_log_score_sum.clone())
            saved["gathers_custom"] = len(gathers)
        finally:
            dist.all_gather = real_all_gather

        replicated = distribute_tensor(_full_case(torch.float32)[0], mesh, [Replicate()])
        try:
            CrossEntropyDecomposition(VOCAB).update(replicated, _full_case(torch.float32)[1])
        except ValueError as err:
            saved["replicate_error"] = str(err)
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_saved(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _numpy_state(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rank_counts and rank_log_score_sum by definition, in numpy float64."""
    z = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    z, t = z[t != IGNORE], t[t != IGNORE]
    z_t = z[np.arange(len(t)), t]
    ranks = (z > z_t[:, None]).sum(1)
    peak = z.max(1)
    log_scores = z_t - peak - np.log(np.exp(z - peak[:, None]).sum(1))
    return (np.bincount(ranks, minlength=VOCAB),
            np.bincount(ranks, weights=log_scores, minlength=VOCAB))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_dtensor_logits_give_the_full_logits_state_on_every_rank(ranks_saved, dtype, rel):
    logits, target = _full_case(dtype)
    counts, sums = _numpy_state(logits.double().numpy(), target.numpy())
    assert [saved[f"local_width_{dtype}"] for saved in ranks_saved] == [51, 50]
    for saved in ranks_saved:  # synced over a data-parallel group of one: each tensor-parallel rank counts once
        got_counts, got_sums = saved[f"dtensor_{dtype}"]
        np.testing.assert_array_equal(got_counts.numpy(), counts)
        assert got_counts.sum() == int((target != IGNORE).sum())
        np.testing.assert_allclose(got_sums.numpy(), sums, rtol=rel, atol=0)
    single = CrossEntropyDecomposition(VOCAB)  # one process on the full logits
    single.update(logits, target)
    assert torch.equal(ranks_saved[0][f"dtensor_{dtype}"][0], single.rank_counts)
    np.testing.assert_allclose(ranks_saved[0][f"dtensor_{dtype}"][1].sum().item(),
                               single.rank_log_score_sum.sum().item(), rtol=rel)


def test_sync_is_an_all_reduce_sum_of_the_ranks_states(ranks_saved):
    cases = [_sync_case(r) for r in range(2)]
    counts, sums = _numpy_state(np.concatenate([c[0].numpy() for c in cases]),
                                np.concatenate([c[1].numpy() for c in cases]))
    for saved in ranks_saved:
        np.testing.assert_array_equal(saved["synced"][0].numpy(), counts)
        np.testing.assert_allclose(saved["synced"][1].numpy(), sums, rtol=1e-12, atol=1e-12)
        assert saved["gathers_all_reduce"] == 0  # no world x V all-gather
        assert saved["unsynced_equal_local"]
        assert int(saved["computed"]["num_tokens"]) == 40 + 65
        np.testing.assert_allclose(float(saved["computed"]["cross_entropy"]), -sums.sum() / counts.sum(), rtol=1e-12)
        # a user's dist_sync_fn keeps torchmetrics' gather-then-sum path (the spy sees it), with the same state
        assert saved["gathers_custom"] > 0
        assert torch.equal(saved["synced_custom"][0], saved["synced"][0])
        np.testing.assert_allclose(saved["synced_custom"][1].numpy(), saved["synced"][1].numpy(), rtol=1e-15)


def test_replicated_dtensor_is_refused_with_the_placements(ranks_saved):
    for saved in ranks_saved:
        assert "Shard(-1)" in saved["replicate_error"] and "Replicate()" in saved["replicate_error"]
