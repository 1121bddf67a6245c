"""Writing the files of a run so that a crash, a full disk or Ctrl-C leaves the old file or the new one, never half.

:func:`write_atomic` writes a file beside its destination and renames it over
it; :func:`interrupts_deferred` holds Ctrl-C back while it does;
:func:`describe_os_error` turns a failed write into words for a one-line error.
A command's output file (``fastvae sample --out``, ``fastvae encode --out``) is
checked by :func:`check_new_file` before any work and written by
:func:`write_new_file`, an output folder by :func:`prepare_output_folder`: each
reports a path that cannot be written as a :class:`~fastvae.errors.ConfigError`
(one line, exit status 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import IO

from fastvae.errors import ConfigError


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back inside the block and deliver it as the block ends.

    An interrupt raised in the middle of ``torch.save`` leaves half a zip file and
    surfaces as an unrelated ``RuntimeError`` ("unexpected pos"); held back, the
    write completes and the ``KeyboardInterrupt`` follows it. Blocks nest: an
    inner block hands the interrupt to the outer one. Only the main thread
    receives signals, so elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):  # Python's default handler raises KeyboardInterrupt; an outer block records it
                previous(*received[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def write_atomic(path: str, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, and rename it over ``path``.

    Ctrl-C waits until the file is complete (:func:`interrupts_deferred`). On
    any failure the temporary file is removed and ``path`` keeps what it held.
    A write that failed in the operating system (a full disk) raises its
    ``OSError``, also where a library wrapped it in another error (``torch.save``
    raises ``RuntimeError("unexpected pos ...")`` over it).
    """
    temporary = f"{path}.tmp"
    with interrupts_deferred():
        try:
            with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            cause = _os_error_behind(err)
            if cause is not None and cause is not err:
                raise cause from None
            raise


def _os_error_behind(err: BaseException) -> OSError | None:
    """The OSError that ``err`` is or was raised while handling, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """``"No space left on device"`` for ``[Errno 28] ...``: the reason, without the path the message adds itself."""
    return err.strerror or str(err) or type(err).__name__


def check_new_file(path: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` can be written as a new file: it does not exist (not even as a
    dangling link), its folder does, and a file can be created there."""
    if os.path.lexists(path):
        raise ConfigError(f"{path} already exists; choose another --out")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ConfigError(f"cannot write {path}: {folder} is not a folder")
        raise ConfigError(f"the folder of {path} does not exist")
    _check_writable(folder, path)


def prepare_output_folder(folder: str) -> None:
    """Create the folder ``folder`` (and its parents) where it is missing, and check that a file can be created in
    it; :class:`ConfigError` otherwise. For a command that writes its results at the end (``python -m benchmarks
    --out``): it fails before the work, not after."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the folder {folder}: {describe_os_error(err)}") from None
    _check_writable(folder, f"into {folder}")


def _check_writable(folder: str, what: str) -> None:
    """Raise :class:`ConfigError` (``cannot write <what>``) unless a file can be created in ``folder``: an unnamed
    one, tried and dropped."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:  # a read-only or full file system, no permission, /proc
        raise ConfigError(f"cannot write {what}: {describe_os_error(err)}") from None


def write_new_file(path: str, write: Callable[[str], None]) -> None:
    """``write(path)``, a writer that leaves the old file or the new one (:func:`write_atomic`), with a failure of
    the operating system (a full disk, a folder made read-only meanwhile) raised as :class:`ConfigError`."""
    try:
        write(path)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {describe_os_error(err)}") from None
