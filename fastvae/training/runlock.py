"""One command at a time in a run folder: an operating-system lock on the file ``.lock`` inside it.

A command that writes into a run folder holds an exclusive ``flock`` on
``<folder>/.lock`` from before its first write until it exits: ``fastvae
train`` (a new run, a run taken over, a resumed one) for the whole run, its
evaluation and figures included; ``fastvae sample`` and ``fastvae encode`` while
they write their file into a folder that has a ``.lock`` (a run folder). A
second such command finds the lock held and stops before writing anything,
with a :class:`~fastvae.errors.ConfigError` naming the process that holds it
(its pid, host and command line, which the holder writes into the file).

The operating system releases the lock when its holder exits, however it exits
(``kill -9``, a crash, a power cut): a lock is never stale, and the file, left
in place, is taken by the next command. It is never deleted: a command that
deleted it could leave two others each holding a lock on a different file of
that name.

Under torchrun only rank 0, the process that writes the run's files, takes the
lock (its other ranks never touch it), so a run never refuses its own ranks.
Before any work every rank asks :func:`refuse_if_held` whether another job
holds the folder: a shared lock, taken and dropped, which never conflicts with
the other ranks asking at the same time.

Where the file system has no locks (``flock`` fails: some network and FUSE
file systems), the command warns once and goes on unguarded. An NFS mount with
``nolock`` locks within each machine only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import warnings
from collections.abc import Iterator

from fastvae.errors import ConfigError
from fastvae.training.files import describe_os_error

try:
    import fcntl
except ImportError:  # not a POSIX system: no flock
    fcntl = None

LOCK_FILE = ".lock"
# What of the holder's command line a refusal quotes.
_COMMAND_CHARS = 200


@contextlib.contextmanager
def hold_run_folder(folder: str, *, create: bool = True) -> Iterator[None]:
    """Hold the run folder ``folder`` (which must exist) for the block: an exclusive lock on its ``.lock`` file.

    Args:
        folder: the run folder.
        create: create ``.lock`` where it is missing (``fastvae train``). With
            ``False`` a folder without one is not a run folder, and nothing is
            held (``fastvae sample`` and ``encode`` writing elsewhere).

    Raises:
        ConfigError: another process holds the folder (the message names it),
            or the lock file cannot be opened (a folder that cannot be written).
    """
    fd = _open(os.path.join(folder, LOCK_FILE), folder, create)
    if fd is None:
        yield
        return
    try:
        if _lock(fd, folder, exclusive=True):
            _write_holder(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_if_held(folder: str) -> None:
    """Raise :class:`ConfigError` if a live process holds the run folder ``folder``, before any work is done.

    A shared lock, taken and dropped: any number of processes may ask at once
    (every rank of a torchrun job does, before they connect); only a holder of
    :func:`hold_run_folder` conflicts with it. Nothing is created.
    """
    fd = _open(os.path.join(folder, LOCK_FILE), folder, create=False) if os.path.isdir(folder) else None
    if fd is not None:
        try:
            _lock(fd, folder, exclusive=False)
        finally:
            os.close(fd)


def _open(path: str, folder: str, create: bool) -> int | None:
    """The lock file opened for reading and writing; ``None`` where it is missing and not to be created."""
    try:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        if create or not os.path.isdir(folder):
            raise ConfigError(f"cannot lock the run folder {folder}: it does not exist") from None
        return None
    except OSError as err:
        raise ConfigError(f"cannot lock the run folder {folder}: {describe_os_error(err)}") from None


def _lock(fd: int, folder: str, *, exclusive: bool) -> bool:
    """Take the lock on ``fd`` without waiting; whether it is held (``False``: this file system has no locks,
    which an exclusive lock warns of). Raises :class:`ConfigError` naming the holder when another process has it."""
    reason = "this system has no flock"
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise ConfigError(
                f"{folder} is in use by {_holder(fd)}, which is still running; wait for it to end, or choose "
                "another --out"
            ) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL: a file system without locks
            reason = describe_os_error(err)
    if exclusive:
        warnings.warn(
            f"cannot lock the run folder {folder} ({reason}): another command writing into it at the same time "
            "would not be stopped",
            stacklevel=4,
        )
    return False


def _write_holder(fd: int) -> None:
    """Write who holds the lock into the lock file, for a refused command to quote."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _holder(fd: int) -> str:
    """The holder of the lock on ``fd``, in words: ``process 123 (fastvae train --out runs/a)``."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host, command = int(holder["pid"]), str(holder["host"]), str(holder["command"])
    except (OSError, ValueError, TypeError, KeyError):
        return "another process"  # one that has not yet written its name (or not a fastvae command)
    if host == socket.gethostname():
        if not _alive(pid):  # the name of an earlier holder, not yet overwritten by this one's
            return "another process"
        where = ""
    else:
        where = f" on {host}"
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return f"process {pid}{where} ({command})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _command_line() -> str:
    """This process's command line, with ``fastvae`` for the installed command or ``python -m fastvae``."""
    argv = list(sys.argv) or ["python"]
    program = os.path.abspath(argv[0]) if argv[0] else ""
    if os.path.basename(program) == "fastvae" or program.endswith(os.path.join("fastvae", "__main__.py")):
        argv[0] = "fastvae"
    else:
        argv = list(getattr(sys, "orig_argv", argv))
    return shlex.join(argv)
