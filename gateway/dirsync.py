"""Group commit for folder fsyncs: many callers, one fsync.

Every message the spool accepts renames files into folders and must fsync those folders
before its 250 (so the new names survive a power cut). Under load, dozens of sessions ask
for the same folder at once. `DirectorySync.sync(folder)` lets one caller (the leader) run a
single fsync that covers every request made before it started; the others wait for it. A
request made while an fsync is already running waits for the next one, since that fsync may
have started before the caller's rename.

An fsync error is given to every caller whose request it covered, and is sticky for the
folder: after a failed fsync the kernel may have dropped the dirty metadata, and a later
fsync can succeed without it (fsyncgate). Every later request for that folder fails too, so
nothing is ever acknowledged on the strength of a retried fsync. Restart to recover.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Folder:
    requested: int = 0  # requests numbered 1, 2, 3...
    done: int = 0  # every request up to this one is durable
    running: bool = False
    error: OSError | None = None


class DirectorySync:
    """Folder fsyncs shared between concurrent callers (threads)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._folders: dict[str, _Folder] = {}
        self.fsyncs = 0  # how many fsyncs were run: fewer than requests under load

    def sync(self, folder: Path) -> None:
        """Return once `folder`'s entries as of this call are durable; OSError if not."""
        key = str(folder)
        with self._cond:
            state = self._folders.setdefault(key, _Folder())
            state.requested += 1
            mine = state.requested
            while True:
                if state.error is not None:
                    raise OSError(state.error.errno, state.error.strerror, key)
                if state.done >= mine:
                    return
                if not state.running:
                    break
                self._cond.wait()
            state.running = True
            covers = state.requested
        error: OSError | None = None
        try:
            _fsync_folder(folder)
        except OSError as exc:
            error = exc
        with self._cond:
            self.fsyncs += 1
            state.running = False
            if error is not None:
                state.error = error
            else:
                state.done = max(state.done, covers)
            self._cond.notify_all()
        if error is not None:
            raise error


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
