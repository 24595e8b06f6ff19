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

``replacing`` yields the temp file's descriptor for content written piece by
piece (a download) and replaces the target when the block ends.
``copy_atomic`` does the same with the content of another file, copied by the
kernel (``copy_file_range``/``sendfile``: no pass through Python buffers), and
may give the copy an owner.

Used by the hub's database (hub.store), the agent's journal, pidfiles and file
steps, key generation (bus.signing) and ``fleet broker-config``. Blocking: call
through asyncio.to_thread from async code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["copy_atomic", "fsync_dir", "replacing", "write_all", "write_atomic"]

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


def write_atomic(
    path: str | Path, data: bytes | str | Sequence[bytes], mode: int = 0o600, *, tag: str = ""
) -> None:
    """Replace ``path`` with ``data``, with permissions ``mode``. Blocking.

    A str is written as UTF-8; a sequence of chunks in order, never joined.

    ``tag`` goes into the temp file's name (``.NAME.TAG<random>.tmp``), so a
    caller can find what a crash in the middle left behind.

    Raises:
        OSError: the directory is not writable, the disk is full, or (FileExistsError)
            something already sits at the random temp name: nothing was written then,
            and ``path`` is unchanged.
    """
    chunks = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    with replacing(path, mode, tag=tag) as fd:
        for chunk in chunks:
            write_all(fd, chunk)


def copy_atomic(
    src: str | Path, dest: str | Path, mode: int, *, owner: tuple[int, int] | None = None, tag: str = ""
) -> None:
    """Replace ``dest`` with a copy of ``src``, as ``write_atomic`` does. Blocking.

    ``owner`` (uid, gid) is given to the copy when this process runs as root.

    Raises:
        OSError: ``src`` cannot be read, or as ``write_atomic``; ``dest`` is unchanged then.
    """
    source = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chown = owner if owner is not None and os.geteuid() == 0 else None
        with replacing(dest, mode, tag=tag, owner=chown) as fd:
            _copy_fd(source, fd)
    finally:
        os.close(source)


def _copy_fd(source: int, target: int) -> None:
    """Copy all of ``source`` (from its start) to ``target`` in the kernel where it can."""
    size = os.fstat(source).st_size
    offset = 0
    try:
        while True:  # copy_file_range, then sendfile: no pass through Python buffers
            sent = os.copy_file_range(source, target, max(size - offset, 1 << 20), offset)
            if sent == 0:
                return
            offset += sent
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or offset:
            raise
    except AttributeError:  # pragma: no cover - no copy_file_range in this os module
        pass
    while sent := os.sendfile(target, source, offset, 1 << 20):
        offset += sent


@contextlib.contextmanager
def replacing(
    path: str | Path,
    mode: int = 0o600,
    *,
    tag: str = "",
    suffix: str = ".tmp",
    owner: tuple[int, int] | None = None,
) -> Iterator[int]:
    """Write a new ``path`` through the descriptor this yields; it replaces ``path`` when the block ends.

    The same guarantees as ``write_atomic`` (temp ``.NAME.TAG<random>SUFFIX``
    beside ``path``, exclusive and no-follow, mode set first, file and directory
    fsynced). An exception in the block removes the temp file and leaves
    ``path`` unchanged. ``owner`` (uid, gid) is given to the file (root only).
    """
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.{tag}{secrets.token_hex(8)}{suffix}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # chown clears set-id bits
        yield fd
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
