"""The one way fleetbus writes a file durably (STYLE.md section 3).

``write_atomic`` replaces a file so that a crash at any moment leaves either the
old or the new content, never a torn or half-private file, and so that nobody
who can write to the directory can redirect the write:

1. the temp file has a random name beside the target and is created with
   ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted at a guessed
   name makes the write fail (FileExistsError) instead of writing through it;
2. its mode is set on the descriptor (``fchmod``: the umask neither widens nor
   narrows it) before any byte is written;
3. every byte is written (``os.write`` may write less than asked), the file is
   fsynced, renamed over the target with ``os.replace``, and the directory is
   fsynced so the rename itself survives a power cut.

Used by the hub's database (hub.store), the agent's journal, key generation
(bus.signing) and ``fleet broker-config``. Blocking: call through
asyncio.to_thread from async code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "write_all", "write_atomic"]

#: Directories that cannot be fsynced (some network and FUSE file systems) say so with these.
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or unlink inside ``directory`` durable. Blocking."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (str is UTF-8), with permissions ``mode``. Blocking.

    Raises:
        OSError: the directory is not writable, the disk is full, or (FileExistsError)
            something already sits at the random temp name: nothing was written then,
            and ``path`` is unchanged.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, raw)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory or ".")
