"""replay.revisions=all (offline: the cache's stepN refs, in step order), the commit hash in every row, a
warning for two revisions with identical weights, and replay.keep_weights=false emptying the cache of what
was evaluated; against a copy of the local hub cache (tests/hub_cache.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

from ce_dynamics.files import read_results

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

DUPLICATE = "d" * 40  # a commit whose files are step4's: same weights, another branch (pythia issue #205)


def replay(hub: HubCache, out: Path, *extra: str) -> int:
    return train.main(["mode=replay", f"output_dir={out}", f"replay.models=[{hub.hub_id}]", "data.seq_len=32",
                       "data.eval_sequences=4", "data.batch_size=4", "data.eval_sets=[prose]",
                       "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger.wandb.mode=disabled",
                       f"data.cache_dir={out.parent / 'tok'}", *extra])


def copy_cache(hub: HubCache, dest: Path) -> Path:
    shutil.copytree(hub.root, dest, symlinks=True)
    return dest / hub.repo_dir.name


def test_revisions_all_walks_the_cached_steps_in_order_with_commits_and_warns_on_identical_weights(
        tiny_hub: HubCache, tmp_path: Path, capsys):
    repo = copy_cache(tiny_hub, tmp_path / "cache")
    snapshot = repo / "snapshots" / DUPLICATE
    snapshot.mkdir()
    for link in (repo / "snapshots" / tiny_hub.commits[4]).iterdir():  # same blobs, as a re-pushed branch
        (snapshot / link.name).symlink_to(os.readlink(link))
    (repo / "refs" / "step10").write_text(DUPLICATE)  # "step10" < "step2" as text: order must be numeric
    out = tmp_path / "out"
    with offline_hub(tmp_path / "cache"):
        code = replay(tiny_hub, out, "replay.revisions=all")
    err = capsys.readouterr().err
    assert code == 0, err
    rows = read_results(out / "results.jsonl")
    assert [r["revision"] for r in rows] == ["step0", "step2", "step4", "step10"]
    assert [r["commit"] for r in rows] == [tiny_hub.commits[0], tiny_hub.commits[2], tiny_hub.commits[4], DUPLICATE]
    warnings = [line for line in err.splitlines() if "identical weights" in line]
    assert len(warnings) == 1 and "revisions step4 and step10" in warnings[0], err
    assert rows[2]["cross_entropy"] == rows[3]["cross_entropy"]


def test_keep_weights_false_deletes_each_evaluated_revision_from_the_cache(tiny_hub: HubCache, tmp_path: Path):
    repo = copy_cache(tiny_hub, tmp_path / "cache")
    weights = {s: (repo / "snapshots" / tiny_hub.commits[s] / "model.safetensors").resolve() for s in (0, 2, 4)}
    assert len(set(weights.values())) == 3 and all(p.is_file() for p in weights.values())
    out = tmp_path / "out"
    with offline_hub(tmp_path / "cache"):
        assert replay(tiny_hub, out, "replay.revisions=[0,2]", "replay.keep_weights=false") == 0
    assert [r["step"] for r in read_results(out / "results.jsonl")] == [0, 2]
    for step in (0, 2):  # evaluated: snapshot and weights blob gone
        assert not (repo / "snapshots" / tiny_hub.commits[step]).exists()
        assert not weights[step].exists()
    assert weights[4].is_file()  # not evaluated: untouched, and still loadable
    assert (repo / "snapshots" / tiny_hub.commits[4] / "tokenizer.json").is_file()
    with offline_hub(tmp_path / "cache"):
        assert replay(tiny_hub, out, "replay.revisions=[4]") == 0
