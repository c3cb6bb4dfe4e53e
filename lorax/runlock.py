"""One writer per workdir: an advisory lock that names its holder and outlives no process.

``<workdir>/.lock`` holds the holder's host, process id and start time; the lock itself is an
``flock`` on that file, which the kernel drops when the holding process ends however it ends
(``kill -9`` included). So a second process on the same workdir is refused at once, naming
the holder, and a lock file left by a dead process is taken over (and said so). On network
file systems without working ``flock`` the lock does not protect anything; lorax assumes one
host writes a workdir (on several hosts only process 0 takes the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"{info['host']} pid {info['pid']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def hold(workdir: str, *, say=print) -> Iterator[None]:
    """Holds ``workdir``'s lock for the ``with`` block (the directory is created if needed).

    Raises:
      WorkdirBusyError: a live process holds it, named by host and pid.
      NotADirectoryError: ``workdir`` exists and is not a directory.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir {workdir} exists and is not a directory")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"workdir {workdir} is in use by {_holder(path)}; wait for it to finish, stop "
                "it, or pass another --workdir"
            ) from None
        if os.fstat(fd).st_size:
            say(f"taking over the lock of {workdir} left by {_holder(path)}, which has ended")
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly, nothing to take over
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def hold_all(workdirs: Sequence[str], *, say=print) -> Iterator[None]:
    """Holds every workdir's lock (in sorted order, so two jobs never deadlock), or none."""
    with contextlib.ExitStack() as stack:
        for workdir in sorted(set(workdirs)):
            stack.enter_context(hold(workdir, say=say))
        yield
