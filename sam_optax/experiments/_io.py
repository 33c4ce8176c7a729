"""Outputs of the ``sam-optax`` command: atomic writes, up-front path checks, a folder lock.

* Every output (JSON, PNG) is written to a temporary file in the destination
  folder and renamed over the old one (``os.replace``), so a full disk or a
  crash leaves the previous file intact, never a truncated one.
* :func:`check_outputs` finds a bad output path (a file where the folder should
  be, a folder where a result file should be, an unwritable folder) before any
  training.
* :func:`lock_folder` takes an exclusive lock on the output folder for the
  whole run, so that two runs into the same folder cannot overwrite each
  other's results. The lock is ``fcntl.flock`` on the file ``.sam-optax.lock``:
  the kernel releases it when its process ends, however it ends, so a killed
  run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO

LOCK_NAME = ".sam-optax.lock"


class OutputError(ValueError):
    """An output path that cannot be written (reported as a usage error of ``--out``)."""


class FolderInUse(OutputError):
    """Another run holds the lock of the output folder."""


def _mode_for(path: str) -> int:
    """The permission bits of the file at ``path``, or the umask's default for a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it over ``path``.

    If ``write`` (or the disk) fails, the temporary file is removed, the
    exception propagates and the old ``path`` is left as it was.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp creates 0600: keep the old file's mode, or the usual one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, payload, **kwargs) -> None:
    """``json.dump(payload, indent=2, **kwargs)`` written atomically."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, **kwargs))


def save_figure(fig, path: str, **kwargs) -> None:
    """``fig.savefig`` written atomically (format from the file's extension)."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs), binary=True)


def check_outputs(folder: str, names: Sequence[str] = ()) -> None:
    """Creates ``folder`` if needed and checks that ``names`` can be written there.

    Raises :class:`OutputError` (a one-line message) for a file in place of the
    folder, a folder that cannot be created or written, or a folder in place of
    one of the output files.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"{folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {folder!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"the folder {folder!r} is not writable")
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            raise OutputError(f"{path!r} is a folder; the output file {name} cannot be written there")
        if os.path.exists(path) and not os.path.isfile(path):
            raise OutputError(f"{path!r} exists and is not a regular file")


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another run (starting)"
    return (
        f"another run (pid {info.get('pid')} on {info.get('host')}, `{info.get('command')}`, "
        f"started {info.get('started')})"
    )


def _acquire(path: str) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            who = _holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"the folder {os.path.dirname(path)!r} is in use by {who}; wait for it to "
                f"finish or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one


@contextlib.contextmanager
def lock_folder(folder: str, command: str = "") -> Iterator[str]:
    """Holds an exclusive lock on ``folder`` (the file ``.sam-optax.lock`` in it).

    Raises :class:`FolderInUse`, naming the other run (pid, host, command, start
    time), if another process holds it. The file is removed on exit.
    """
    path = os.path.join(folder, LOCK_NAME)
    fd = _acquire(path)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": _user(),
            "command": command or " ".join(["sam-optax", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "?"
