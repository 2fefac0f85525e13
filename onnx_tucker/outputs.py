"""Every file a command writes, checked before any work.

A command first names every path it reads and writes (:func:`check_paths`): each written path must be
a new path or a regular file (never a device, FIFO, socket, folder or symbolic link: renaming over one
would replace it with a regular file), in an existing writable folder, and differ from every other
path the command reads or writes, links resolved.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from onnx_tucker.errors import UsageError, first_line

STAGING_PREFIX = ".onnx-tucker-"
_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_target(path, what: str = "output") -> Path:
    """Refuse (one line, :class:`UsageError`) a path that cannot safely be written by rename.

    Allowed: a new name, or an existing regular file, in an existing writable folder. A symbolic
    link is refused, even to a regular file: replacing it would silently turn the link into a file,
    writing through it would overwrite whatever it points to; the user names the file they mean.
    """
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise UsageError(f"{what} path is a folder, not a file: {p}")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # name too long, a file used as a folder, link loops...
        raise UsageError(f"{what}: cannot use {p}: {_reason(exc)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} path is a folder, not a file: {p}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file: refusing to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} folder does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} folder is not writable: {parent}")
    return p


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return exc.strerror or first_line(exc)


def _identity(path) -> tuple[str, tuple | None]:
    """(real path, (device, inode) when it exists): two paths with either in common are one file."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
        return real, (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return real, None


def _entries(paths: dict) -> list[tuple[str, Path]]:
    out = []
    for label, value in paths.items():
        if value is None or value == "":
            continue
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is not None and str(p) != "":
                out.append((label, Path(p)))
    return out


def check_paths(reads: dict | None = None, writes: dict | None = None, may_write: dict | None = None) -> None:
    """Refuse, in one line and before any work, a command whose outputs would destroy something.

    ``reads``, ``writes`` and ``may_write`` map a label (``"--data"``, ``"output"``...) to a path, a
    list of paths or None. Every path in ``writes`` must pass :func:`check_target`; every written path
    (``writes`` and ``may_write``, files written only in some cases, such as an automatic external
    data file) must differ from every other path read or written, resolved through symbolic links
    (realpath) and hard links (same device and inode).
    """
    reads, written = _entries(reads or {}), _entries(writes or {})
    maybe = _entries(may_write or {})
    for label, path in written:
        check_target(path, label)
    for label, path in maybe:  # checked only where it exists: it may never be written
        if os.path.lexists(path) and not os.path.isfile(path) or os.path.islink(path):
            check_target(path, label)
    seen: list[tuple[str, Path, tuple]] = []
    for label, path in written + maybe:
        real, inode = _identity(path)
        for other_label, other, (other_real, other_inode) in seen:
            if real == other_real or (inode is not None and inode == other_inode):
                raise UsageError(f"{label} and {other_label} are the same file ({path}): give each output its own path")
        for read_label, read in reads:
            read_real, read_inode = _identity(read)
            if real == read_real or (inode is not None and inode == read_inode):
                raise UsageError(f"{label} {path} is {read_label} ({read}): refusing to overwrite a file this command reads")
        seen.append((label, path, (real, inode)))
