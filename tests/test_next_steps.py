"""Every next step a run prints runs as printed: a real tiny train.py run (W&B offline) from the repository root,
then each command of its summary's "next:" list, with a PATH that does not hold the test's environment (as for a
user who did not activate .venv). Also the refusals' commands: the make form under `make run`, and the rerun
that resumes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_e2e import small

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != BIN.resolve())
    env = {**os.environ, "PATH": path, **extra}
    env.pop("PYTHONWARNINGS", None)  # the run's own filters are under test: no blanket ignore
    env.pop("CE_DYNAMICS_LAUNCHER", None)
    return {**env, **extra}


def _typed(path: str | Path) -> str:
    """How a user in ROOT types a program outside PATH: relative when it lies under ROOT, else absolute."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _train(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(**env))


def next_commands(stdout: str) -> dict[str, str]:
    """{label: command} of the summary's "next:" block, without the trailing "   (remark)"."""
    block = stdout.split("\nnext:\n", 1)[1]
    commands = {}
    for line in block.splitlines():
        if not line.startswith("  ") or ":" not in line:
            break
        label, _, command = line.strip().partition(":")
        commands[label] = command.strip().split("   (")[0]
    return commands


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("next")
    args = [*small(tmp / "out", tmp / "cache"), "trainer.max_steps=2"]
    proc = _train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": tmp / "out", "args": args, "stdout": proc.stdout, "stderr": proc.stderr}


def test_the_run_prints_no_third_party_noise(run):
    printed = run["stdout"] + run["stderr"]
    for noise in ("LeafSpec", "litlogger", "The anonymous setting has no effect",
                  "Trainer already configured with model summary callbacks"):
        assert noise not in printed, noise
    assert "GPU available: False" in printed  # the rest of what Lightning says still shows


def test_every_printed_command_runs_as_printed(run):
    out = run["out"]
    commands = next_commands(run["stdout"])
    assert set(commands) == {"metrics", "browse", "upload", "notebook"}, run["stdout"]
    for command in commands.values():  # this environment's tools, by their path (relative under the cwd)
        program = shlex.split(command)[0]
        assert program == _typed(BIN / program.rsplit("/", 1)[-1]), command

    proc = subprocess.run(shlex.split(commands["metrics"]), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0 and "decomp/code/error_entropy" in proc.stdout, proc.stderr

    # the terminal UI needs a terminal: give it one (util-linux `script`), and see it start and keep running
    if shutil.which("script"):
        try:
            subprocess.run(["script", "-qec", commands["browse"], "/dev/null"], cwd=ROOT, capture_output=True,
                           timeout=8, env=_env(TERM="xterm"), stdin=subprocess.DEVNULL, check=True)
        except subprocess.TimeoutExpired:
            pass  # still showing the run after 8 s: it started
        else:
            pytest.fail(f"{commands['browse']} exited at once")

    # uploading needs a W&B server; a dead local one shows the command took the run it names
    try:
        proc = subprocess.run(shlex.split(commands["upload"]), cwd=ROOT, capture_output=True, text=True, timeout=15,
                              env=_env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="local-" + "0" * 40))
        printed = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        printed = (err.stdout or b"").decode() + (err.stderr or b"").decode()
    assert "Syncing 1 run(s)" in printed and ".wandb" in printed, printed

    notebook = out / "training_dynamics.ipynb"
    proc = subprocess.run(shlex.split(commands["notebook"]), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads(notebook.read_text())["cells"]
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # figs. 3, 4 and 6, written into the executed copy


def test_a_second_run_names_the_make_forms_and_they_resume_or_start_afresh(run):
    args = run["args"]
    plain = _train(args)
    assert plain.returncode == 2
    assert f"{_typed(sys.executable)} train.py {shlex.join(args)} ckpt_path=last" in plain.stderr
    made = _train(args, CE_DYNAMICS_LAUNCHER="make")
    assert made.returncode == 2
    resume = f'make run ARGS="{shlex.join(args)} ckpt_path=last"'
    assert resume in made.stderr and f'make run ARGS="{shlex.join(args)} overwrite=true"' in made.stderr
    # the printed resume command, as a Makefile user types it (needs this checkout's .venv, as `make test` has)
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() or not (ROOT / ".venv/bin/.installed-all").exists():
        pytest.skip("the suite does not run in this checkout's .venv (make test does)")
    proc = subprocess.run(shlex.split(resume), cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== ce-dynamics train finished" in proc.stdout


def test_ckpt_path_last_without_a_run_is_refused_and_last_or_new_starts_one(tmp_path):
    args = [*small(tmp_path / "typo", tmp_path / "cache"), "trainer.max_steps=0", "logger.wandb.mode=disabled"]
    proc = _train([*args, "ckpt_path=last"])
    assert proc.returncode == 2 and "holds no run to resume" in proc.stderr
    assert not (tmp_path / "typo").exists() or not any((tmp_path / "typo").iterdir())
    proc = _train([*args, "ckpt_path=last_or_new"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not exist" not in proc.stdout + proc.stderr
