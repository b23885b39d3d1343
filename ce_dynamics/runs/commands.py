"""Commands spelled so that they run as printed: from the user's directory, with the interpreter (and its
environment's tools) that ran this process, or as `make run ARGS="..."` when `make run` started it.

The Makefile exports `CE_DYNAMICS_LAUNCHER=make`; a checkout's `.venv` is not on PATH unless activated, so a
tool from it is printed as `.venv/bin/<tool>` rather than a bare name that the shell would not find.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

LAUNCHER_ENV = "CE_DYNAMICS_LAUNCHER"


def started_by_make() -> bool:
    """Whether `make run` started this process (the Makefile exports CE_DYNAMICS_LAUNCHER=make)."""
    return os.environ.get(LAUNCHER_ENV) == "make"


def shown_path(path: str | Path) -> str:
    """`path` relative to the current directory when it lies under it (with a `/`, so a shell runs it as a
    path), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel) if len(rel.parts) > 1 else f"./{rel}"


def _on_path_as(executable: Path, names: Sequence[str]) -> str | None:
    """The bare name under which PATH finds `executable` itself (not another copy), if any."""
    for name in names:
        found = shutil.which(name)
        if found and os.path.abspath(found) == os.path.abspath(executable):
            return name
    return None


def tool(name: str) -> str | None:
    """How to type this environment's console script `name` (wandb, papermill, ce-dynamics): the bare name
    when PATH finds this environment's copy, else its path; None when this environment lacks it."""
    executable = Path(sys.executable).parent / name
    if not executable.is_file():
        return None
    return _on_path_as(executable, [name]) or shown_path(executable)


def python() -> str:
    """How to type the interpreter running this process."""
    executable = Path(sys.executable)
    return _on_path_as(executable, ["python", "python3"]) or shown_path(executable)


def rerun(args: Sequence[str], prog: str = "train.py") -> str:
    """The command that runs `prog` (`train.py` or `ce-dynamics <mode>`) again with `args`, as it was started."""
    if started_by_make():
        return f'make run ARGS="{shlex.join(args)}"' if args else "make run"
    if prog == "train.py" and Path("train.py").is_file():
        return shlex.join([python(), "train.py", *args])
    mode = prog.split()[-1] if prog.startswith("ce-dynamics") else "train"
    args = [a for a in args if not a.startswith("mode=")]  # the subcommand says it
    return shlex.join([tool("ce-dynamics") or "ce-dynamics", mode, *args])
