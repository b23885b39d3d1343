"""One run per output_dir: every mode refuses a directory another run holds, naming it and the holder's pid, before
any work; the lock dies with its holder, however it dies."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ce_dynamics.runs.config import ConfigError
from ce_dynamics.runs.lock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


@pytest.mark.parametrize("mode", ["train", "replay", "sweep"])
def test_every_mode_refuses_a_directory_in_use_naming_it_and_the_holder(mode, tmp_path, capsys):
    held = RunLock(tmp_path)
    assert held.acquire()
    held.mark_holder()
    try:
        assert train_script.main([f"mode={mode}", f"output_dir={tmp_path}", "experiment=tiny_scaling"]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"output_dir {tmp_path} is in use by another run (pid {os.getpid()}, holding {tmp_path / LOCK_NAME})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else was touched


def test_the_lock_is_freed_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ce_dynamics.runs.lock import RunLock; lock = RunLock(sys.argv[1]); "
        "assert lock.acquire(); lock.mark_holder(); print('held', flush=True); time.sleep(600)"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid},"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    assert lock.acquire()  # the kernel freed it with the process: no stale lock to clear by hand
    lock.release()
