"""preflight(cfg): a fresh run never damages the run already in output_dir (issue 9, item 2), a missing
ckpt_path or an unwritable output_dir is refused before any work (item 4)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ce_dynamics.runs.config import RUN_ENTRIES, ConfigError, load_config, preflight
from ce_dynamics.runs.lock import LOCK_NAME
from test_train_e2e import small

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root`, plus every folder (so an added empty folder shows)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) if path.is_file() \
            else ("dir", 0)
    return out


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A real 2-step train.py run (W&B offline, CSV, arrays, checkpoints) plus a file of the user's.

    In this process (train.py's main), which already imported lightning: a subprocess costs seconds more."""
    tmp = tmp_path_factory.mktemp("rerun")
    out, cache = tmp / "out", tmp / "cache"
    args = [*small(out, cache), "trainer.max_steps=2"]
    assert train_script.main(args) == 0
    import wandb

    wandb.teardown()  # the W&B service of this process may still be writing the run's files: let it finish
    (out / "notes.txt").write_text("mine")
    return {"out": out, "args": args}


def test_a_fresh_run_into_a_run_exits_2_and_changes_nothing(old_run):
    out = old_run["out"]
    assert {p.name for p in out.iterdir()} >= set(RUN_ENTRIES)  # the real run wrote every entry preflight knows
    before = snapshot(out)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *old_run["args"]], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"output_dir {out} already holds a run" in proc.stderr
    assert "ckpt_path=last" in proc.stderr and "output_dir=<another directory>" in proc.stderr
    assert snapshot(out) == before


def test_resume_replay_and_sweep_reruns_are_not_refused(old_run):
    out = old_run["out"]
    before = snapshot(out)
    for argv in (["ckpt_path=last"], [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], ["mode=replay"],
                 ["experiment=tiny_scaling"]):
        preflight(load_config([f"output_dir={out}", *argv]))
    assert snapshot(out) == before


@pytest.mark.parametrize("entry", RUN_ENTRIES)
def test_any_one_entry_of_a_run_is_enough_to_refuse(tmp_path, entry):
    (tmp_path / "notes.txt").write_text("mine")
    if entry.endswith(".json"):
        (tmp_path / entry).write_text("{}")
    else:
        (tmp_path / entry).mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=f"already holds a run \\({entry}\\)"):
        preflight(load_config([f"output_dir={tmp_path}"]))
    assert snapshot(tmp_path) == before
    preflight(load_config([f"output_dir={tmp_path / 'other'}"]))  # the way on: another output_dir


def test_overwrite_true_deletes_the_old_run_and_nothing_else(old_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(old_run["out"], out)
    preflight(load_config([f"output_dir={out}", "overwrite=true"]))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt"]  # the lock stays: a run may hold it
    assert (out / "notes.txt").read_text() == "mine"
    preflight(load_config([f"output_dir={out}"]))  # now a fresh run may start


def test_a_missing_ckpt_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"ckpt_path={tmp_path}/gone.ckpt: no such file; expected null, 'last'"):
        preflight(load_config([f"output_dir={tmp_path}", f"ckpt_path={tmp_path}/gone.ckpt"]))


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=f"output_dir={tmp_path}/f/run: {tmp_path}/f is not a directory"):
        preflight(load_config([f"output_dir={tmp_path}/f/run"]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_output_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=f"output_dir={ro}/run is not writable"):
            preflight(load_config([f"output_dir={ro}/run"]))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_an_unwritable_output_dir_is_refused_even_for_root():
    with pytest.raises(ConfigError, match="output_dir=/proc/ce_dynamics_run is not writable"):
        preflight(load_config(["output_dir=/proc/ce_dynamics_run"]))


@pytest.mark.parametrize("var", ["LOCAL_RANK", "NODE_RANK", "RANK"])
def test_a_ddp_child_leaves_the_rerun_rule_to_rank_zero(old_run, monkeypatch, var):
    """Lightning's DDP launcher re-runs train.py for ranks > 0 (LOCAL_RANK=1, ...) after rank zero has begun
    writing into output_dir: a child must neither refuse that nor clear it."""
    out = old_run["out"]
    before = snapshot(out)
    monkeypatch.setenv(var, "1")
    preflight(load_config([f"output_dir={out}"]))
    preflight(load_config([f"output_dir={out}", "overwrite=true"]))
    assert snapshot(out) == before
    monkeypatch.setenv(var, "0")
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight(load_config([f"output_dir={out}"]))
