"""Replay behaviours users hit, through `train.py mode=replay` on local caches: a checkpoint that loads but
fails to evaluate, which `.ckpt` file a step uses, a checkpoint without `global_step`, bfloat16 on a training
run's `.ckpt` files against a direct computation, and a tokenizer larger than the logits."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture
from numpy_reference import decompose

from ce_dynamics.runs.config import load_config
from ce_dynamics.functional import KEYS
from ce_dynamics.runs.checkpoints import plan
from ce_dynamics.runs.replay import read_results

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SMALL = ["data.seq_len=32", "data.eval_sequences=4", "data.batch_size=4", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger.wandb.mode=disabled"]


def replay(out: Path, *args: str) -> int:
    return train.main(["mode=replay", f"output_dir={out}", f"data.cache_dir={out.parent / 'tok_cache'}",
                       *SMALL, *args])


def test_a_revision_that_loads_but_fails_to_evaluate_is_reported_and_the_walk_goes_on(
        tiny_hub: HubCache, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """step2's weights hold NaN (a diverged checkpoint): it loads, then validation raises on its logits."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "hub"
    shutil.copytree(tiny_hub.root, cache, symlinks=True)
    weights = cache / tiny_hub.repo_dir.name / "snapshots" / tiny_hub.commits[2] / "model.safetensors"
    tensors = load_file(weights)
    head = next(k for k in tensors if "embed_out" in k)
    tensors[head] = torch.full_like(tensors[head], float("nan"))
    weights.unlink()  # a symlink into blobs/, shared with nothing else once replaced
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    with offline_hub(cache):
        code = replay(out, f"replay.models=[{tiny_hub.hub_id}]", "replay.revisions=[0,2,4]")
    err = capfd.readouterr().err
    assert code == 1
    assert [(r["step"], r["dataset"]) for r in read_results(out / "results.jsonl")] == \
        [(s, d) for s in (0, 4) for d in ("code", "prose")]
    summary = err[err.index("replay: failed:"):]
    assert summary.count("\n  - ") == 1
    assert f"{tiny_hub.hub_id} step2: cannot evaluate" in summary and "finite logits" in summary
    assert "Traceback" in err  # an unexpected failure shows where it happened
    assert "2 checkpoint(s) evaluated" in err


def _fake_ckpt(path: Path, **content) -> Path:
    torch.save(content, path)
    return path


def test_a_named_checkpoint_beats_last_at_the_same_step(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    (ckpts / "sub").mkdir(parents=True)
    _fake_ckpt(ckpts / "last.ckpt", global_step=4)  # sorts before step_4.ckpt: order alone would pick it
    _fake_ckpt(ckpts / "last-v1.ckpt", global_step=2)
    named = {4: _fake_ckpt(ckpts / "step_4.ckpt", global_step=4), 2: _fake_ckpt(ckpts / "sub" / "x.ckpt", global_step=2)}
    got = plan(load_config(["mode=replay", f"replay.checkpoints={ckpts}"]))
    assert [(c.step, c.revision, c.path) for c in got] == [(s, f"step{s}", named[s]) for s in (2, 4)]
    assert {c.model for c in got} == {str(ckpts.resolve())}


def test_a_checkpoint_without_global_step_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _fake_ckpt(ckpts / "step_2.ckpt", global_step=2)
    bad = _fake_ckpt(ckpts / "weights.ckpt", state_dict={"w": torch.zeros(2)})
    assert replay(tmp_path / "out", f"replay.checkpoints={ckpts}") == 2
    assert f"{bad} has no global_step" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


TRAIN = ["model.vocab_size=320", "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
         "data.train.max_chars=60000", "data.tokenizer_train_chars=60000", "data.eval_sets=[code]"]


def test_bfloat16_replay_of_a_runs_ckpt_files_matches_a_direct_bfloat16_evaluation(tmp_path: Path) -> None:
    from ce_dynamics.runs.module import CausalLMModule
    from ce_dynamics.runs.training import build_datamodule, build_tokenizer

    run = tmp_path / "run"
    assert train.main([f"output_dir={run}", f"data.cache_dir={tmp_path / 'tok_cache'}", *SMALL, *TRAIN,
                       "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint.keep=all"]) == 0
    out = tmp_path / "out"
    assert replay(out, *TRAIN, f"replay.checkpoints={run / 'checkpoints'}", "replay.dtype=bfloat16") == 0
    rows = {r["step"]: r for r in read_results(out / "results.jsonl")}
    assert sorted(rows) == [2]

    cfg = load_config(["mode=replay", f"data.cache_dir={tmp_path / 'tok_cache'}", *SMALL, *TRAIN])
    datamodule = build_datamodule(cfg, build_tokenizer(cfg))
    datamodule.setup("validate")
    ids = datamodule.eval_sets["code"].windows
    state = torch.load(run / "checkpoints" / "step_2.ckpt", map_location="cpu", weights_only=False)
    module = CausalLMModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    expected = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            logits = module.to(dtype)(ids[:, :-1])  # the module's own forward: bf16 rounding depends on shapes
        expected[dtype] = decompose(logits.float().numpy(), ids[:, 1:].numpy())
    row = rows[2]
    assert row["num_tokens"] == expected[torch.bfloat16]["num_tokens"]
    for key in KEYS:
        assert row[key] == pytest.approx(expected[torch.bfloat16][key], rel=1e-5, abs=1e-6), key
    assert abs(row["cross_entropy"] - expected[torch.float32]["cross_entropy"]) > 1e-5  # really bf16


def test_a_tokenizer_larger_than_the_logits_is_a_load_failure(tiny_hub: HubCache, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    with offline_hub(tiny_hub.root):
        tokenizer = AutoTokenizer.from_pretrained(tiny_hub.hub_id, revision="step0")
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(tiny_hub.vocab_size - len(tokenizer) + 5)])
    assert len(tokenizer) == tiny_hub.vocab_size + 5
    tokenizer.save_pretrained(tmp_path / "big_tokenizer")
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        code = replay(out, f"replay.models=[{tiny_hub.hub_id}]", "replay.revisions=[0]",
                      f"model.tokenizer={tmp_path / 'big_tokenizer'}")
    err = capfd.readouterr().err
    assert code == 1
    assert ("cannot load" in err and
            f"the tokenizer has {tiny_hub.vocab_size + 5} tokens but the model only {tiny_hub.vocab_size} logits" in err)
    assert not (out / "results.jsonl").exists()
