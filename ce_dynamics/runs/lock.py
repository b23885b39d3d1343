"""One run per output_dir at a time: an OS lock (`flock`) on `output_dir/.run.lock`, held for the run's lifetime.

The kernel frees it when the process ends, however it ends, so a killed run never blocks its own resume. A second
start into the same directory is refused (exit 2) with the directory and the holder's pid, which the holder writes
into the file once it passed the config checks. Under a launcher (Lightning's DDP children, torchrun, SLURM) only
the first process of the launch takes it; the others run under its lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ce_dynamics.runs.config_schema import ConfigError

LOCK_NAME = ".run.lock"
_HOLDER_WAIT_S = 5.0  # how long a refused start waits for a new holder to write its pid


class RunLock:
    """The lock of one output_dir; `acquire()` raises ConfigError naming the holder if another process has it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._handle: IO[str] | None = None
        self._marked = False
        self._new_file = False
        self._created: list[Path] = []

    def acquire(self) -> bool:
        """Take the lock; False when the directory cannot be created or written (the config check says why)."""
        self._created = [d for d in (self.output_dir, *self.output_dir.parents) if not d.exists()]
        self._new_file = not self.path.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's lifetime
        except OSError:
            return False
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                if holder or time.monotonic() > deadline:  # a holder that just started writes its pid soon
                    handle.close()
                    raise ConfigError(f"output_dir {self.output_dir} is in use by another run (pid "
                                      f"{holder or 'unknown'}, holding {self.path}); wait for it to end, or give "
                                      f"this run another output_dir=") from None
                time.sleep(0.05)
        self._handle = handle
        return True

    def mark_holder(self) -> None:
        """Write this process's pid into the lock file (for the message a second start prints)."""
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(f"{os.getpid()}\n")
            self._handle.flush()
            self._marked = True

    def release(self) -> None:
        if self._handle is not None:
            if self._marked:  # an ended run leaves no pid behind (a killed one does; the lock itself is free)
                self._handle.truncate(0)
            elif self._new_file:  # refused before it began: leave no trace (no lock file, no new folders)
                self.path.unlink(missing_ok=True)
                for folder in self._created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            self._handle.close()  # closing the last descriptor drops the flock
            self._handle = None


@contextmanager
def run_lock(output_dir: str | os.PathLike, first_process: bool = True) -> Iterator[RunLock]:
    """Hold `output_dir`'s lock for the body (nothing in a non-first process of a launch)."""
    lock = RunLock(output_dir)
    if first_process:
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
