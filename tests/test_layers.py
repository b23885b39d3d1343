"""The package's layers (pyproject's [tool.importlinter]), checked with import-linter on every test run.

core (root modules) <- analysis | integrations | lightning <- runs; no import circles between siblings. The
second test copies the package, adds one upward import and one circle, and sees both contracts break: the check
can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_are_kept() -> None:
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout


def test_an_upward_import_and_a_circle_break_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "ce_dynamics", tmp_path / "ce_dynamics", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "ce_dynamics" / "files.py", "a") as f:  # core -> lightning: upward
        f.write("\nfrom ce_dynamics.lightning import sinks  # noqa: E402,F401\n")
    with open(tmp_path / "ce_dynamics" / "runs" / "pinning.py", "a") as f:  # pinning <-> data: a circle
        f.write("\nfrom ce_dynamics.runs.data import EOS  # noqa: E402,F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 kept, 2 broken" in proc.stdout, proc.stdout
    assert "ce_dynamics.files -> ce_dynamics.lightning.sinks" in proc.stdout, proc.stdout
    assert ".pinning -> .data" in proc.stdout, proc.stdout
