"""A lock on a training run's output folder, so that two trainers never write into the same one.

The lock is a file ``.train.lock`` in the folder holding the holder's pid, host name and start time (JSON). It is
created atomically (written under a unique name, then hard-linked to its final name, which fails if it exists), so
it is never seen half-written. A lock whose holder is a dead process on this host is stale and taken over with a
warning; a live holder, or one on another host (whose liveness cannot be checked from here), is refused with an
error that names it. In a multi-process run only the main process takes the lock.

Typical use::

    with OutputFolderLock(output_dir):
        ...  # train, write checkpoints, save the pipeline
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


class OutputFolderLockedError(RuntimeError):
    """The output folder is locked by another live run; the message names the holder."""


def process_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (True for one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock file names may still run: a pid of this host that exists, or any holder on
    another host (which cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return isinstance(pid, int) and process_is_alive(pid)


class OutputFolderLock:
    """An exclusive lock on ``folder`` (created if missing) for this process; see the module docstring.

    Args:
        folder: the run's output folder.

    Raises (from :meth:`acquire`):
        OutputFolderLockedError: another live process (or a process on another host) holds the lock.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> OutputFolderLock:
        """Take the lock; a stale lock (a dead process on this host, or an unreadable lock file) is taken over."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        candidate = self.folder / f"{LOCK_NAME}.{me['host']}.{me['pid']}"
        candidate.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(candidate, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._remove_if_stale()
            raise OutputFolderLockedError(f"Could not lock {self.folder}: its lock file {self.path} keeps changing.")
        finally:
            candidate.unlink(missing_ok=True)

    def _remove_if_stale(self) -> None:
        """Delete the lock file if its holder is dead; raise :class:`OutputFolderLockedError` if it lives."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if isinstance(holder, dict) and holder_is_alive(holder):
            where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')!r}"
            raise OutputFolderLockedError(
                f"--output_dir {str(self.folder)!r} is in use by another training run: process {holder.get('pid')} "
                f"on {where}, started {holder.get('started')} (lock file {self.path}). Wait for it to finish, use "
                "another --output_dir, or, if that run is certainly gone, delete the lock file."
            )
        # Rename first, so that of two processes taking over the same stale lock only one deletes it.
        doomed = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, doomed)
        except FileNotFoundError:
            return
        if doomed.read_text() != text:
            # Another process took the stale lock over in between: put its live lock back and try again.
            try:
                os.link(doomed, self.path)
            finally:
                doomed.unlink()
            return
        doomed.unlink()
        logger.warning(
            "Took over the lock of %s from %s, which no longer runs.",
            self.folder,
            f"process {holder.get('pid')} on this host" if isinstance(holder, dict) else "an unreadable lock file",
        )

    def release(self) -> None:
        """Give the lock back (delete the lock file if it is still ours)."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputFolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
