"""The study on a cluster, on this CPU: job-array shards (`replay.shard=i/n`) run as real processes side by side,
one killed with SIGKILL and rerun, merged into the rows of one walk; the merge's refusals; a model spread over
CPU and disk (`replay.weights=device_map`) against the whole model; the plan (`replay.dry_run=true`) offline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

from ce_dynamics.files import append_result_rows, read_results, state_path
from ce_dynamics.functional import KEYS
from ce_dynamics.runs.config import ConfigError, load_config
from ce_dynamics.runs.shards import MergeError, Shard, merge_shards

from test_behaviours_replay import REPO, SMALL, train  # train.py loaded as a module, the small replay overrides
SLUG = "ce-dynamics-test--tiny-neox"


def args(hub: HubCache, out: Path, *extra: str, revisions: str = "[0,2,4]") -> list[str]:
    return ["mode=replay", f"output_dir={out}", f"data.cache_dir={out.parent / 'tok_cache'}", *SMALL,
            f"replay.models=[{hub.hub_id}]", f"replay.revisions={revisions}", *extra]


def start(hub: HubCache, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **hub.env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args(hub, out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return err


@pytest.mark.slow
def test_shards_run_side_by_side_a_killed_one_resumes_and_the_merge_equals_one_walk(
        tiny_hub: HubCache, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one_walk = start(tiny_hub, single)  # the reference, beside shard 1/2 as a job array would run them
    second = start(tiny_hub, sharded, "replay.shard=1/2")
    finish(one_walk), finish(second)
    assert [r["step"] for r in read_results(sharded / "shards" / "1of2" / "results.jsonl")] == [2, 2]
    merge = args(tiny_hub, sharded, "replay.shard=merge")
    capfd.readouterr()
    assert train.main(merge) == 2
    assert "cannot merge: missing shard(s) 0of2 of 2" in capfd.readouterr().err

    first = start(tiny_hub, sharded, "replay.shard=0/2")  # step0 and step4: killed once step0's rows are in
    results = sharded / "shards" / "0of2" / "results.jsonl"
    deadline = time.monotonic() + 300
    while len(read_results(results)) < 2:
        assert first.poll() is None, first.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "shard 0/2 wrote no row in 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_results(results)] == [0, 0]
    assert train.main(merge) == 2
    err = capfd.readouterr().err
    assert "shard 0of2 is incomplete: 2 of 4 row(s) missing" in err and "replay.shard=0/2" in err

    err = finish(start(tiny_hub, sharded, "replay.shard=0/2"))  # the rerun does only step4
    assert "1 checkpoint(s) evaluated, 1 already in" in err
    with offline_hub(tiny_hub.root):
        assert train.main(merge) == 0
    merged, reference = read_results(sharded / "results.jsonl"), read_results(single / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in reference] == [(s, d) for s in (0, 2, 4) for d in ("code", "prose")]
    assert merged == reference  # row for row, every field, in the order of one walk
    for row in reference:
        for root in (single, sharded):
            with np.load(state_path(root / SLUG, row["dataset"], row["step"])) as data:
                counts = data["rank_counts"]
            assert counts.sum() == row["num_tokens"]
    with offline_hub(tiny_hub.root):  # merging again is a no-op
        assert train.main(merge) == 0
    assert read_results(sharded / "results.jsonl") == reference


def _rows(walk: list[tuple[str, str]], names: list[str]) -> list[dict]:
    return [{"model": m, "revision": r, "step": int(r[4:]), "dataset": d, "num_tokens": 10,
             "non_embedding_params": 1, **{k: 0.5 for k in KEYS}} for m, r in walk for d in names]


def test_merge_refuses_missing_incomplete_and_overlapping_shards_by_name(tmp_path: Path) -> None:
    walk = [("a/m", f"step{s}") for s in (0, 1, 2)]
    names = ["code"]

    def shard(index: int, count: int, rows: list[dict]) -> None:
        append_result_rows(tmp_path / "shards" / Shard(index, count).name / "results.jsonl", rows)

    with pytest.raises(MergeError, match="no shards to merge"):
        merge_shards(tmp_path, walk, names)
    shard(0, 2, _rows(Shard(0, 2).take(walk), names))
    with pytest.raises(MergeError, match=r"missing shard\(s\) 1of2 of 2 .*replay.shard=1/2"):
        merge_shards(tmp_path, walk, names, rerun="replay.shard={i}/{n}")
    (tmp_path / "shards" / "1of2").mkdir()  # started, nothing done yet
    with pytest.raises(MergeError, match=r"shard 1of2 is incomplete: 1 of 1 row\(s\) missing, e.g. \(model 'a/m', "
                                         r"revision 'step1'"):
        merge_shards(tmp_path, walk, names)
    shard(1, 2, _rows(walk[:2], names))  # step0 again (shard 0's) and its own step1
    with pytest.raises(MergeError, match="overlapping shards 0of2 and 1of2: both hold the row .*'step0'"):
        merge_shards(tmp_path, walk, names)
    shutil.rmtree(tmp_path / "shards" / "1of2")
    shard(1, 2, _rows(Shard(1, 2).take(walk), names))
    shard(0, 3, _rows(Shard(0, 3).take(walk), names))
    with pytest.raises(MergeError, match=r"overlapping shards .*n=2: 0of2, 1of2; n=3: 0of3"):
        merge_shards(tmp_path, walk, names)
    assert not (tmp_path / "results.jsonl").exists()
    shutil.rmtree(tmp_path / "shards" / "0of3")
    path = merge_shards(tmp_path, walk, names)
    assert [r["revision"] for r in read_results(path)] == ["step0", "step1", "step2"]  # walk order, not shard order


def test_a_shard_writes_in_its_own_folder_and_bad_shards_are_refused(tmp_path: Path) -> None:
    cfg = load_config(["mode=replay", f"output_dir={tmp_path}", "replay.shard=3/4"])
    assert Path(cfg.output_dir) == tmp_path / "shards" / "3of4"  # its own results, arrays, W&B runs and lock
    assert load_config(["mode=replay", f"output_dir={tmp_path}", "replay.shard=merge"]).output_dir == str(tmp_path)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ConfigError, match=r"replay.shard=\S+: expected null, 'merge', or 'i/n'"):
            load_config(["mode=replay", f"replay.shard={bad}"])


@pytest.mark.slow
def test_a_model_spread_over_cpu_and_disk_gives_the_whole_models_numbers(tiny_hub: HubCache, tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture) -> None:
    """accelerate's device map with 150 KB of CPU: layer 1 and the final norm on disk, the unembedding kept in
    memory; the rows are scored from hidden states. Same numbers as the whole model scored from its logits."""
    whole, spread = tmp_path / "whole", tmp_path / "spread"
    with offline_hub(tiny_hub.root):
        assert train.main(args(tiny_hub, whole, revisions="[4]")) == 0
        capfd.readouterr()
        assert train.main(args(tiny_hub, spread, "replay.weights=device_map", "replay.max_memory={cpu: 150KB}",
                               revisions="[4]")) == 0
    err = capfd.readouterr().err
    assert "spread over cpu: gpt_neox.embed_in, gpt_neox.emb_dropout, gpt_neox.layers.0, lm_head; " \
           "disk: gpt_neox.layers.1, gpt_neox.final_layer_norm" in err
    assert not (spread / "offload").exists()  # the offloaded layers are deleted after the revision
    expected = read_results(whole / "results.jsonl")
    rows = read_results(spread / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in rows] == [(r["step"], r["dataset"]) for r in expected]
    for row, ref in zip(rows, expected):
        assert row["num_tokens"] == ref["num_tokens"] and row["commit"] == ref["commit"]
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
        arrays = [np.load(state_path(root / SLUG, row["dataset"], 4)) for root in (whole, spread)]
        np.testing.assert_array_equal(arrays[1]["rank_counts"], arrays[0]["rank_counts"])


def test_device_map_with_several_processes_is_refused(tiny_hub: HubCache, tmp_path: Path, capsys) -> None:
    with offline_hub(tiny_hub.root):
        code = train.main(args(tiny_hub, tmp_path / "out", "replay.weights=device_map", "trainer.devices=2",
                               "trainer.strategy=ddp"))
    assert code == 2
    assert "replay.weights=device_map runs one process" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_the_plan_runs_offline_without_weights_and_counts_what_is_left(tiny_hub: HubCache, tmp_path: Path,
                                                                       capsys) -> None:
    """The weights are removed from a copy of the cache: the plan still sizes the model from config.json, to
    the parameter count of the model from_pretrained loads, and leaves out the rows already done."""
    import torch
    from transformers import AutoModelForCausalLM

    from ce_dynamics.runs.plan import Hardware, make_plan
    from ce_dynamics.runs.checkpoints import plan

    with offline_hub(tiny_hub.root):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_hub.hub_id, revision="step2")
                     .parameters())
    cache = tmp_path / "hub"
    shutil.copytree(tiny_hub.root, cache, symlinks=True)
    for weights in (cache / tiny_hub.repo_dir.name / "snapshots").glob("*/model.safetensors"):
        weights.unlink()
    out = tmp_path / "out"
    append_result_rows(out / "results.jsonl", _rows([(tiny_hub.hub_id, "step0")], ["code"]))
    cfg = load_config(args(tiny_hub, out))
    hardware = Hardware("cuda", 2, 1e9, 1e12, "given")
    with offline_hub(cache):
        (model,) = make_plan(cfg, plan(cfg), hardware)
        assert train.main(args(tiny_hub, out, "replay.dry_run=true")) == 0
    assert (model.params, model.params_source) == (params, "config.json")
    assert model.rows_left == [("step0", "prose"), ("step2", "code"), ("step2", "prose"), ("step4", "code"),
                               ("step4", "prose")]
    assert model.download_source == "estimate: 2 bytes/param" and model.download == 3 * 2 * params  # 3 revisions
    assert model.strategy.startswith("whole, DDP over 2 (trainer.devices=2 trainer.strategy=ddp)")
    assert model.seconds == pytest.approx(5 * 4 * 31 * 2 * params / (2 * 1e12))
    printed = capsys.readouterr().out
    assert "5 row(s) left to do" in printed
    assert "params: config.json" in printed and "measured here:" in printed and "tokens/s" in printed
    assert read_results(out / "results.jsonl") == _rows([(tiny_hub.hub_id, "step0")], ["code"])  # nothing run
    assert not (out / SLUG).exists()


def test_the_plan_picks_ddp_device_map_or_offload_by_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sizes of two hub models (no network here) are given; the rule picks by memory per device."""
    from ce_dynamics.runs import plan as plan_module
    from ce_dynamics.runs.plan import Hardware, params_from_name
    from ce_dynamics.runs.checkpoints import plan

    assert params_from_name("EleutherAI/pythia-1.4b") == pytest.approx(1.4e9)
    assert params_from_name("meta-llama/Llama-3.2-1B") == pytest.approx(1e9)
    assert params_from_name("meta-llama/Meta-Llama-3-8B") == pytest.approx(8e9)
    assert params_from_name("Qwen/Qwen2.5-0.5B") == pytest.approx(0.5e9)
    assert params_from_name("openai-community/gpt2-medium") == pytest.approx(355e6)
    assert params_from_name("someone/no-size") is None

    cfg = load_config(["experiment=scaling_paper", "replay.dtype=bfloat16", "replay.models=[a/x-7b,a/y-70b]"])
    sized = {"a/x-7b": 7e9, "a/y-70b": 70e9}
    monkeypatch.setattr(plan_module, "model_params", lambda model, revision, dtype: (sized[model], "given"))
    monkeypatch.setattr(plan_module, "download_size", lambda model, revision, params: (2 * params, "given"))
    node = plan_module.make_plan(cfg, plan(cfg), Hardware("cuda", 8, 80e9, 1e15, "given"))
    one = plan_module.make_plan(cfg, plan(cfg), Hardware("cuda", 1, 80e9, 1e15, "given"))
    assert [p.strategy for p in node] == ["whole, DDP over 8 (trainer.devices=8 trainer.strategy=ddp)",
                                          "replay.weights=device_map over 8 devices"]
    assert node[1].memory_per_device == pytest.approx(70e9 * 2 * 1.2 / 8)
    assert one[1].strategy.startswith("replay.weights=device_map, offloading")
    assert node[0].seconds == pytest.approx(3 * 1000 * 511 * 2 * 7e9 / (8 * 1e15))  # 3 eval sets, DDP over 8


@pytest.mark.slow
def test_torchrun_runs_a_shard_data_parallel(tiny_hub: HubCache, tmp_path: Path) -> None:
    """The guide's launch: torchrun starts 2 processes (gloo on CPU), Lightning joins them, and shard 1/2 of
    [0,2,4] (step2) gives the one-process rows: same tokens and rank counts, log-scores to float32 rounding."""
    out, one = tmp_path / "torchrun", tmp_path / "one"
    env = {**os.environ, **tiny_hub.env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m",
                           "ce_dynamics.runs.cli", "replay",
                           *args(tiny_hub, out, "replay.shard=1/2", "trainer.devices=2", "trainer.strategy=ddp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("replay: 1 checkpoint(s) evaluated") == 1  # rank zero's summary only
    with offline_hub(tiny_hub.root):
        assert train.main(args(tiny_hub, one, revisions="[2]")) == 0
    rows, expected = read_results(out / "shards" / "1of2" / "results.jsonl"), read_results(one / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in rows] == [(2, "code"), (2, "prose")]
    for row, ref in zip(rows, expected):
        assert row["num_tokens"] == ref["num_tokens"]
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
        counts = [np.load(state_path(root / SLUG, row["dataset"], 2))["rank_counts"]
                  for root in (out / "shards" / "1of2", one)]
        np.testing.assert_array_equal(*counts)
