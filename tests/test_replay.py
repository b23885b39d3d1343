"""Replay through the real path, offline: `train.py mode=replay` -> `from_pretrained(hub_id, revision="stepN")`
against a local hub cache (tests/hub_cache.py) -> `trainer.validate` + callback -> results.jsonl, arrays, W&B."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

from ce_dynamics.functional import KEYS, decomposition_from_state
from ce_dynamics.runs.checkpoints import model_slug
from ce_dynamics.runs.replay import RESULT_FIELDS, append_result_row, append_result_rows, read_results

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SEQ_LEN, EVAL_SEQUENCES = 32, 4
TOKENS_PER_SET = EVAL_SEQUENCES * (SEQ_LEN - 1)
SMALL = [f"data.seq_len={SEQ_LEN}", f"data.eval_sequences={EVAL_SEQUENCES}", "data.batch_size=4",
         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def replay(out: Path, *args: str) -> int:
    return train.main(["mode=replay", f"output_dir={out}", f"data.cache_dir={out.parent / 'tok_cache'}",
                       *SMALL, *args])


def hub_args(hub: HubCache, revisions: str = "[0,2,4]", models: str | None = None) -> list[str]:
    return [f"replay.models={models or '[' + hub.hub_id + ']'}", f"replay.revisions={revisions}"]


def wandb_history(model_dir: Path) -> list[dict]:
    """History rows of every W&B run under `model_dir/wandb`, read back with the real CLI."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    rows = []
    run_dirs = sorted(model_dir.glob("wandb/offline-run-*"))
    assert run_dirs, f"no W&B run under {model_dir}"
    for run_dir in run_dirs:
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        rows += [r["history"]["item"] for r in records if r.get("type") == "history"]
    return rows


def check_row(row: dict) -> None:
    from ce_dynamics.bootstrap import BOOTSTRAP_KEYS, interval_keys
    from ce_dynamics.bpb import BPB_KEYS

    assert set(RESULT_FIELDS) <= set(row) and set(row) - set(RESULT_FIELDS) <= {"family", "num_bytes", "eval_hash",
                                                                                  "commit", *BPB_KEYS, *interval_keys(),
                                                                                  "replicates"}
    # the bootstrap is on by default in replay: every row carries its intervals and the paired replicates
    assert all(row[f"{k}_lo"] < row[f"{k}_hi"] for k in BOOTSTRAP_KEYS if k != "accuracy" or row[f"{k}_se"] > 0)
    assert {len(v) for v in row["replicates"].values()} == {200}
    assert row["revision"] == f"step{row['step']}"
    assert row["num_tokens"] == TOKENS_PER_SET
    ce, ee, sa, conf = (row[k] for k in ("cross_entropy", "error_entropy", "self_alignment", "confidence"))
    assert math.isclose(ce, ee + sa - conf, rel_tol=0, abs_tol=1e-9)


@pytest.fixture(scope="module")
def walk(tiny_hub: HubCache, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("walk") / "out"
    with offline_hub(tiny_hub.root):
        code = replay(out, *hub_args(tiny_hub))
    return code, out


def test_walk_writes_one_row_per_revision_and_dataset(walk, tiny_hub: HubCache) -> None:
    code, out = walk
    assert code == 0
    rows = read_results(out / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in rows] == [(s, d) for s in (0, 2, 4) for d in ("code", "prose")]
    for row in rows:
        check_row(row)
        assert row["model"] == tiny_hub.hub_id
    # GPT-NeoX per layer: 2 LayerNorms (4h), qkv (3h^2+3h), dense (h^2+h), MLP (8h^2+5h); final LayerNorm (2h).
    # With Pythia-160M's h=768, 12 layers this gives Table 4's 85,056,000.
    h, layers = 32, 2
    assert {r["non_embedding_params"] for r in rows} == {layers * (12 * h * h + 13 * h) + 2 * h}
    # The checkpoints were really trained: cross-entropy on code falls from step0 to step4.
    ce = {r["step"]: r["cross_entropy"] for r in rows if r["dataset"] == "code"}
    assert ce[4] < ce[0] - 0.1


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_rows(walk, tiny_hub: HubCache, tmp_path: Path) -> None:
    """`trainer.devices=2 trainer.strategy=ddp` (gloo; 2 + 2 eval windows): the same tokens and rank counts as one
    process, log-scores equal to float32 rounding (the batch shapes differ, so the matmuls round apart)."""
    _, single = walk
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "mode=replay", f"output_dir={out}", *SMALL,
                           *hub_args(tiny_hub, "[0,4]"), "trainer.devices=2", "trainer.strategy=ddp",
                           "logger.wandb.mode=disabled"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **tiny_hub.env(), "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("replay: 2 checkpoint(s) evaluated") == 1  # one summary, from rank zero
    expected = {(r["step"], r["dataset"]): r for r in read_results(single / "results.jsonl")}
    rows = read_results(out / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in rows] == [(s, d) for s in (0, 4) for d in ("code", "prose")]
    for row in rows:
        check_row(row)
        for key in KEYS:
            assert row[key] == pytest.approx(expected[(row["step"], row["dataset"])][key], rel=1e-6, abs=1e-7)
        arrays = [np.load(root / model_slug(tiny_hub.hub_id) / "arrays" / row["dataset"] / f"step_{row['step']}.npz")
                  for root in (single, out)]
        np.testing.assert_array_equal(arrays[1]["rank_counts"], arrays[0]["rank_counts"])


def test_rows_match_a_direct_computation(walk, tiny_hub: HubCache) -> None:
    """The step-2 row's cross-entropy equals F.cross_entropy of that revision on the same eval windows."""
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.training import build_datamodule, build_module, build_tokenizer

    code, out = walk
    row = next(r for r in read_results(out / "results.jsonl") if r["step"] == 2 and r["dataset"] == "prose")
    cfg = load_config(["mode=replay", *SMALL, "data.eval_sets=[prose]"])
    with offline_hub(tiny_hub.root):
        tokenizer = build_tokenizer(cfg, hub_id=tiny_hub.hub_id, revision="step2")
        module = build_module(cfg, hub_id=tiny_hub.hub_id, revision="step2")
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("validate")
    ids = datamodule.eval_sets["prose"].windows
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits[:, :-1].double()
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert row["cross_entropy"] == pytest.approx(direct, abs=1e-5)


def test_arrays_hold_the_state_behind_each_row(walk, tiny_hub: HubCache) -> None:
    code, out = walk
    arrays = out / model_slug(tiny_hub.hub_id) / "arrays"
    for row in read_results(out / "results.jsonl"):
        with np.load(arrays / row["dataset"] / f"step_{row['step']}.npz") as data:
            numbers = decomposition_from_state(torch.from_numpy(data["rank_counts"]),
                                               torch.from_numpy(data["rank_log_score_sum"]))
            assert len(data["rank_counts"]) == tiny_hub.vocab_size  # the padded logit width, not the tokenizer's
        for key in KEYS:
            assert float(numbers[key]) == pytest.approx(row[key], rel=1e-12, abs=1e-12)


def test_wandb_logs_each_revision_at_its_training_step(walk, tiny_hub: HubCache) -> None:
    code, out = walk
    history = wandb_history(out / model_slug(tiny_hub.hub_id))
    assert {h["trainer/global_step"] for h in history} == {0, 2, 4}
    decomp = [h for h in history if "decomp/code/cross_entropy" in h]
    assert [h["trainer/global_step"] for h in decomp] == [0, 2, 4]
    # Lightning's own validation metrics land at the checkpoint's step too, not at trainer.global_step 0.
    assert [h["trainer/global_step"] for h in history if "val/loss/code" in h] == [0, 2, 4]
    rows = {r["step"]: r for r in read_results(out / "results.jsonl") if r["dataset"] == "code"}
    for h in decomp:
        for key in KEYS:
            assert h[f"decomp/code/{key}"] == pytest.approx(rows[h["trainer/global_step"]][key], rel=1e-12)


def test_missing_revision_and_model_are_reported_and_the_walk_goes_on(tiny_hub: HubCache, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        code = replay(out, *hub_args(tiny_hub, "[3,4]", f"[{tiny_hub.hub_id},ce-dynamics-test/absent]"))
    err = capfd.readouterr().err
    assert code == 1
    rows = read_results(out / "results.jsonl")
    assert [(r["model"], r["step"]) for r in rows] == [(tiny_hub.hub_id, 4)] * 2
    summary = err[err.index("replay: failed:"):]
    assert summary.count("\n  - ") == 3
    for model, revision in ((tiny_hub.hub_id, "step3"), ("ce-dynamics-test/absent", "step3"),
                            ("ce-dynamics-test/absent", "step4")):
        assert f"hub id '{model}', revision '{revision}', cache {tiny_hub.root}" in summary
    assert "cached refs: main, step0, step2, step4" in summary


def test_resume_after_a_broken_revision_does_only_the_missing_work(tiny_hub: HubCache, tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    cache = tmp_path / "hub"
    shutil.copytree(tiny_hub.root, cache, symlinks=True)
    weights = cache / tiny_hub.repo_dir.name / "snapshots" / tiny_hub.commits[2] / "model.safetensors"
    target = os.readlink(weights)
    weights.unlink()
    weights.write_bytes(b"not a safetensors file")  # a truncated download
    out = tmp_path / "out"
    with offline_hub(cache):
        assert replay(out, *hub_args(tiny_hub)) == 1
        first = read_results(out / "results.jsonl")
        assert [r["step"] for r in first] == [0, 0, 4, 4]
        assert "revision 'step2'" in capfd.readouterr().err

        weights.unlink()
        weights.symlink_to(target)  # repaired
        assert replay(out, *hub_args(tiny_hub)) == 0
    err = capfd.readouterr().err
    assert "1 checkpoint(s) evaluated, 2 already in" in err
    rows = read_results(out / "results.jsonl")
    assert rows[:4] == first
    assert [(r["step"], r["dataset"]) for r in rows[4:]] == [(2, "code"), (2, "prose")]
    model_dir = out / model_slug(tiny_hub.hub_id)
    run_ids = {p.name.rsplit("-", 1)[1] for p in model_dir.glob("wandb/offline-run-*")}
    assert len(run_ids) == 1 and len(list(model_dir.glob("wandb/offline-run-*"))) == 2  # one run, resumed
    steps = [h["trainer/global_step"] for h in wandb_history(model_dir) if "decomp/code/cross_entropy" in h]
    assert sorted(steps) == [0, 2, 4]  # no step logged twice


def test_bfloat16_replay_is_close_to_float32(walk, tiny_hub: HubCache, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        assert replay(out, *hub_args(tiny_hub, "[4]"), "replay.dtype=bfloat16", "data.eval_sets=[code]") == 0
    (row,) = read_results(out / "results.jsonl")
    check_row(row)
    fp32 = next(r for r in read_results(walk[1] / "results.jsonl") if r["step"] == 4 and r["dataset"] == "code")
    assert row["cross_entropy"] == pytest.approx(fp32["cross_entropy"], abs=0.05)
    assert row["cross_entropy"] != fp32["cross_entropy"]  # bf16 logits really were used


def test_replay_at_pythia_logit_width(tmp_path: Path) -> None:
    """50304 logits (Pythia's padded width) take the metric's multi-threaded CPU path inside Lightning's
    inference mode; the row is numpy's decomposition of that revision."""
    from hub_cache import build_hub_cache

    hub = build_hub_cache(tmp_path / "hub", hub_id="ce-dynamics-test/wide-neox", steps=(0,), vocab_size=50304)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with offline_hub(hub.root):
            assert replay(tmp_path / "out", *hub_args(hub, "[0]"), "data.eval_sets=[code]",
                          "logger.wandb.mode=disabled") == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = read_results(tmp_path / "out" / "results.jsonl")
    check_row(row)
    # numpy's decomposition of the same revision on the same eval windows (tests/numpy_reference.py)
    from numpy_reference import decompose

    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.training import build_datamodule, build_module, build_tokenizer

    cfg = load_config(["mode=replay", *SMALL, "data.eval_sets=[code]"])
    with offline_hub(hub.root):
        tokenizer = build_tokenizer(cfg, hub_id=hub.hub_id, revision="step0")
        module = build_module(cfg, hub_id=hub.hub_id, revision="step0")
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("validate")
    ids = datamodule.eval_sets["code"].windows
    with torch.no_grad():
        logits = module(ids[:, :-1])
    assert logits.shape[-1] == 50304
    expected = decompose(logits.numpy(), ids[:, 1:].numpy())
    for key in KEYS:
        assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.py run keeping every validation's checkpoint: 2 steps, then resumed to 4 steps."""
    out = tmp_path_factory.mktemp("train") / "run"
    args = [f"output_dir={out}", f"data.cache_dir={out.parent / 'tok_cache'}", *SMALL, "model.vocab_size=320",
            "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
            "data.train.max_chars=60000", "data.tokenizer_train_chars=60000", "trainer.val_check_interval=2",
            "logger.wandb.mode=disabled", "checkpoint.keep=all"]
    assert train.main([*args, "trainer.max_steps=2"]) == 0
    assert train.main([*args, "trainer.max_steps=4", "ckpt_path=last"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step_2.ckpt", "step_4.ckpt"]
    return out


def test_replay_walks_a_training_runs_own_checkpoints(training_run: Path, tmp_path: Path) -> None:
    ckpts = training_run / "checkpoints"
    steps = sorted({torch.load(p, map_location="cpu", weights_only=False)["global_step"] for p in ckpts.glob("*.ckpt")})
    assert steps[-2:] == [2, 4]
    out = tmp_path / "out"
    args = ["experiment=tiny", f"replay.checkpoints={ckpts}", "model.vocab_size=320",
            "data.tokenizer_train_chars=60000", f"data.cache_dir={training_run.parent / 'tok_cache'}"]
    assert train.main(["mode=replay", f"output_dir={out}", *SMALL, *args]) == 0
    rows = read_results(out / "results.jsonl")
    assert [(r["step"], r["dataset"]) for r in rows] == [(s, d) for s in steps for d in ("code", "prose")]
    for row in rows:
        check_row(row)
        assert row["model"] == str(ckpts.resolve())
    history = wandb_history(out / model_slug(str(ckpts.resolve())))
    assert sorted(h["trainer/global_step"] for h in history if "decomp/code/cross_entropy" in h) == steps
    assert train.main(["mode=replay", f"output_dir={out}", *SMALL, *args]) == 0  # all done: nothing to redo
    assert len(read_results(out / "results.jsonl")) == len(rows)


@pytest.mark.parametrize("args, message", [
    (["replay.models=[a/b]", "replay.revisions=[latest]"], "replay.revisions=['latest']: expected a list of"),
    (["replay.checkpoints=/nonexistent/dir"], "is not a directory"),
    (["replay.models=[]"], "nothing to replay"),
])
def test_bad_replay_config_exits_2_with_a_clear_message(args: list[str], message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert replay(tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_results_file_appends_atomically_and_rejects_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    row = {key: 0.5 for key in RESULT_FIELDS} | {"model": "a/b", "revision": "step1", "step": 1, "dataset": "code"}
    append_result_row(path, row)
    append_result_rows(path, [row | {"dataset": "prose"}])
    assert [r["dataset"] for r in read_results(path)] == ["code", "prose"]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="missing \\['num_tokens'\\]"):
        append_result_row(path, {k: v for k, v in row.items() if k != "num_tokens"})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]  # no temp file left behind
    path.write_text(before.decode() + "{half a row")
    with pytest.raises(ValueError, match="results.jsonl:3"):
        read_results(path)


def _csv_rows(folder: Path) -> list[dict]:
    import csv

    (path,) = folder.glob("csv/version_*/metrics.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r.get("decomp/code/cross_entropy")]


@pytest.mark.slow
def test_main_gets_its_own_state_file_and_row_in_every_sink(walk, tiny_hub: HubCache, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """`replay.revisions=[0,main]` (main -> step4's commit): main lives in `<slug>@main/`, at step 4, beside step0's
    record, with the numbers of step4's weights; the summary lists it and the walk exits 0."""
    _, reference = walk
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        assert replay(out, *hub_args(tiny_hub, "[0,main]")) == 0
    assert "main" in capsys.readouterr().out  # the end-of-run summary names the revision
    rows = read_results(out / "results.jsonl")
    assert [(r["revision"], r["step"], r["dataset"]) for r in rows] == [
        ("step0", 0, "code"), ("step0", 0, "prose"), ("main", 4, "code"), ("main", 4, "prose")]
    assert rows[2]["commit"] == tiny_hub.commits[4]
    model, main = out / model_slug(tiny_hub.hub_id), out / f"{model_slug(tiny_hub.hub_id)}@main"
    ref_rows = {(r["step"], r["dataset"]): r for r in read_results(reference / "results.jsonl")}
    for folder, step in ((model, 0), (main, 4)):
        for name in ("code", "prose"):
            assert [p.name for p in (folder / "arrays" / name).iterdir()] == [f"step_{step}.npz"]
            with np.load(folder / "arrays" / name / f"step_{step}.npz") as got, \
                    np.load(reference / model.name / "arrays" / name / f"step_{step}.npz") as want:
                np.testing.assert_array_equal(got["rank_counts"], want["rank_counts"])
                np.testing.assert_array_equal(got["rank_log_score_sum"], want["rank_log_score_sum"])
        decomp = [h for h in wandb_history(folder) if "decomp/code/cross_entropy" in h]
        assert [h["trainer/global_step"] for h in decomp] == [step]
        (csv_row,) = _csv_rows(folder)
        assert int(csv_row["step"]) == step
        for key in KEYS:
            assert decomp[0][f"decomp/code/{key}"] == pytest.approx(ref_rows[(step, "code")][key], rel=1e-12)
            assert float(csv_row[f"decomp/code/{key}"]) == pytest.approx(ref_rows[(step, "code")][key], rel=1e-9)


def test_a_named_revision_of_no_known_step_is_recorded_with_step_null(tiny_hub: HubCache, tmp_path: Path) -> None:
    """main pointing at a commit no stepN branch has: its own folder, its arrays at step 0, its row step null;
    a rerun skips it."""
    cache = tmp_path / "hub"
    shutil.copytree(tiny_hub.root, cache, symlinks=True)
    repo = cache / tiny_hub.repo_dir.name
    commit = "e" * 40
    (repo / "snapshots" / commit).mkdir()
    for link in (repo / "snapshots" / tiny_hub.commits[2]).iterdir():
        (repo / "snapshots" / commit / link.name).symlink_to(os.readlink(link))
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "out"
    args = [*hub_args(tiny_hub, "[main]"), "data.eval_sets=[prose]", "logger.wandb.mode=disabled"]
    with offline_hub(cache):
        assert replay(out, *args) == 0
        (row,) = read_results(out / "results.jsonl")
        assert (row["revision"], row["step"], row["commit"]) == ("main", None, commit)
        main = out / f"{model_slug(tiny_hub.hub_id)}@main"
        assert [p.name for p in (main / "arrays" / "prose").iterdir()] == ["step_0.npz"]
        assert not (out / model_slug(tiny_hub.hub_id)).exists()
        assert replay(out, *args) == 0
    assert len(read_results(out / "results.jsonl")) == 1
