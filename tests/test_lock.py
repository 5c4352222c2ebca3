"""diffenc_diffusers.training.lock: one training run per output folder; stale locks of dead processes taken over;
cleanup of checkpoint leftovers spares live processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from diffenc_diffusers.training.checkpointing import remove_partial_checkpoints
from diffenc_diffusers.training.lock import LOCK_NAME, OutputFolderLock, OutputFolderLockedError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def write_lock(folder, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))


def test_lock_names_its_holder_and_refuses_a_second_run(tmp_path):
    folder = tmp_path / "run"
    with OutputFolderLock(folder):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputFolderLockedError, match=rf"in use by another training run: process {os.getpid()}"):
            OutputFolderLock(folder).acquire()
    assert sorted(path.name for path in folder.iterdir()) == []
    OutputFolderLock(folder).acquire().release()


def test_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, live_process, caplog):
    folder = tmp_path / "run"
    write_lock(folder, pid=live_process.pid)
    with pytest.raises(OutputFolderLockedError, match=rf"process {live_process.pid} on this host"):
        OutputFolderLock(folder).acquire()
    write_lock(folder, pid=live_process.pid, host="elsewhere")
    with pytest.raises(OutputFolderLockedError, match="on host 'elsewhere'"):
        OutputFolderLock(folder).acquire()
    dead = dead_pid()
    write_lock(folder, pid=dead)
    with caplog.at_level("WARNING"), OutputFolderLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"Took over the lock of {folder} from process {dead} on this host" in caplog.text
    (folder / LOCK_NAME).write_text("{")
    with OutputFolderLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_cleanup_spares_the_leftovers_of_live_processes(tmp_path, live_process):
    names = [
        f"checkpoint-4.tmp-{live_process.pid}",
        f"checkpoint-2.old-{dead_pid()}",
        f"checkpoint-6.tmp-{os.getpid()}",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_partial_checkpoints(tmp_path)
    assert sorted(path.name for path in removed) == sorted(names[1:])
    assert [path.name for path in tmp_path.iterdir()] == [names[0]]
