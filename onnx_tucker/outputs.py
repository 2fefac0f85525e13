"""Every file a command writes: checked before any work, staged beside its target, put in place together.

A command first names every path it reads and writes (:func:`check_paths`): each written path must be
a new path or a regular file (never a device, FIFO, socket, folder or symbolic link: renaming over one
would replace it with a regular file), in an existing writable folder, and differ from every other
path the command reads or writes, links resolved. Its outputs are then written to temporaries in a
hidden folder beside their targets (:class:`Outputs`) and renamed into place only by
:meth:`Outputs.commit`, after everything that can fail has run. Any failure before that, Ctrl-C and
SIGTERM included (:func:`command_outputs`), removes them all: a run writes all of its outputs or none.

Usage::

    with Outputs() as outputs:
        staged, data_file = outputs.save_model(model, "out.onnx")   # a temporary path, usable now
        outputs.write_text("report.json", text)
        ...                                                           # anything that can still fail
    # here both files are in place (commit); after an exception, neither is
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from onnx_tucker.errors import ModelError, OnnxTuckerError, UsageError, first_line

STAGING_PREFIX = ".onnx-tucker-"
_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
)
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def describe(path) -> str:
    """What ``path`` is ("a folder", "a FIFO (named pipe)", "a character device"...), links followed."""
    try:
        return _kind(os.stat(path).st_mode)
    except OSError as exc:
        return f"unreadable ({_reason(exc)})"


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


def _read_in_folder(path: str) -> bool:
    """Whether a folder read whole (``--calibrate DIR``) reads the file at ``path``: an image, by its suffix."""
    from onnx_tucker.images import EXTENSIONS

    return path.lower().endswith(EXTENSIONS)


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
            if os.path.isdir(read_real) and os.path.commonpath([real, read_real]) == read_real and _read_in_folder(real):
                raise UsageError(f"{label} {path} is an image inside {read_label} ({read}), a folder this command reads "
                                 "(and a later run would read it too): write it elsewhere")
        seen.append((label, path, (real, inode)))


def replace_cache_file(path, text: str, what: str) -> None:
    """Write a cache file the run updates as it goes (``--curves``, ``--latency-table``): a new temporary beside it
    (its own name, created exclusively: two runs sharing the file, or a leftover link at a fixed temporary name,
    cannot write through each other's), renamed over it with SIGINT/SIGTERM held back, removed on any failure.
    A target that is not a regular file (a link, a device, a folder) is refused (:func:`check_target`).

    The file keeps its mode when it is replaced; a new one gets the mode any file the run creates gets (0666 less
    the umask, like the model output): ``tempfile.mkstemp``'s 0600 used to stick to it."""
    target = check_target(path, what)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = _create_exclusive(target.parent if str(target.parent) else Path("."), f".{target.name}.", ".tmp")
    try:
        if mode is not None:
            try:
                os.fchmod(fd, mode)
            except OSError:  # a file system without modes (or a setgid bit we may not set): the default mode stays
                pass
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        with _signals_blocked():
            os.replace(tmp, target)
    except BaseException:
        with _signals_blocked():
            if os.path.lexists(tmp):
                os.unlink(tmp)
        raise


def _create_exclusive(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file in ``folder`` under a fresh random name, created exclusively (O_EXCL: never through an existing
    name or link), with mode 0666 for the umask (and a default ACL) to narrow, as an ordinary new file gets."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name in {folder}")


# --- SIGINT / SIGTERM --------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM: unwinds like Ctrl-C, so every staged output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_state = threading.local()


def _final_committed() -> bool:
    return getattr(_state, "final_committed", False)


def interrupted_by() -> int | None:
    """The signal that interrupted the last :func:`interrupts_unwind` block, if one did. Whatever
    became of its exception (an extension module being imported turns it into ImportError), the
    command was stopped by the user."""
    return getattr(_state, "signal_received", None)


@contextmanager
def _signals_blocked():
    """SIGINT/SIGTERM held back (delivered on exit) around steps that must not be cut in half."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _folders_locked(folders):
    """An exclusive flock on each target folder while the renames run: two runs committing into one folder take
    turns, so a model and its external-data file always come from the same run (between one run's two renames
    another's could land, leaving a model that points past the end of the other run's data). No lock file is made;
    folders that cannot be locked (no fcntl, another file system's rules) are renamed into unlocked, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    held, seen = [], set()
    try:
        # each real folder once (".", "$PWD" and a link to it are one folder: a second flock on it waited for the first
        # forever), in one order for every run (by real path: no two runs wait for each other)
        for folder in sorted({os.path.realpath(f) for f in folders}):
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError:
                continue
            identity = os.fstat(fd)
            if (identity.st_dev, identity.st_ino) in seen:
                os.close(fd)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                continue
            except BaseException:  # interrupted while waiting for another run's commit
                os.close(fd)
                raise
            seen.add((identity.st_dev, identity.st_ino))
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock


@contextmanager
def interrupts_unwind():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (Python's default for SIGTERM
    is to die on the spot, leaving temporaries behind). Once a final :class:`Outputs` has committed,
    they are ignored for the rest of the block: the outputs are complete and in place, and only
    reporting is left, so the run ends as the success it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if not _final_committed():
            _state.signal_received = int(signum)
            raise Interrupted(signum)

    _state.final_committed, _state.signal_received = False, None
    previous = {}
    try:
        for s in _SIGNALS:
            previous[s] = signal.signal(s, handler)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        _state.final_committed = False


# --- staged outputs ----------------------------------------------------------------------------------

class Outputs:
    """Outputs staged in hidden folders beside their targets, renamed into place together by :meth:`commit`.

    As a context manager: commit on a normal exit, :meth:`discard` on an exception. ``final``: this
    commit completes a command; :func:`interrupts_unwind` ignores signals after it.
    """

    def __init__(self, final: bool = False):
        self.final = final
        self.committed = False
        self._folders: dict[str, Path] = {}  # real target folder -> staging folder
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._created: list[Path] = []  # folders the command made for its outputs: removed with them (if still empty)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False

    @property
    def targets(self) -> list[Path]:
        return [target for _, target in self._staged]

    def path_for(self, target, what: str = "output") -> Path:
        """The temporary path to write ``target``'s content to (the target is checked first)."""
        if self.committed:
            raise RuntimeError("outputs already committed")
        target = check_target(target, what)
        if any(_identity(t)[0] == _identity(target)[0] for t in self.targets):
            raise UsageError(f"{what} {target} is written twice by this command")
        folder_key = os.path.realpath(target.parent if str(target.parent) else ".")
        with _signals_blocked():  # the folder is made and recorded, or neither
            folder = self._folders.get(folder_key)
            if folder is None:
                try:
                    folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
                except OSError as exc:
                    raise UsageError(f"{what}: cannot write in {target.parent}: {_reason(exc)}") from None
                self._folders[folder_key] = folder
            staged = folder / target.name
            self._staged.append((staged, target))
        return staged

    def write_text(self, target, text: str, what: str = "output") -> Path:
        """UTF-8; a character UTF-8 cannot hold (a lone surrogate: the undecodable byte of a path that is not UTF-8,
        as Python names it) is written as a backslash escape, so the file stays valid UTF-8 and is still written."""
        return self.write_bytes(target, text.encode("utf-8", errors="backslashreplace"), what)

    def write_bytes(self, target, data: bytes, what: str = "output") -> Path:
        staged = self.path_for(target, what)
        try:
            staged.write_bytes(data)
        except OSError as exc:
            raise OnnxTuckerError(f"cannot write {target}: {_reason(exc)}") from None
        return staged

    def save_model(self, model, target, external_data: bool | None = None, external_threshold: int | None = None,
                   protected=()) -> tuple[Path, Path | None]:
        """Stage ``model`` for ``target`` (see :func:`onnx_tucker.io.save_model`).

        Returns the staged model's path (loadable now: its data file, if any, is beside it) and the
        data file the commit will write (None when the weights stay inline).
        """
        from onnx_tucker.io import model_size, threshold_from_env, write_model_files

        out = Path(target)
        if external_threshold is None:
            external_threshold = threshold_from_env()
        if external_data is None:
            external_data = model_size(model) > external_threshold
        data_path = out.parent / (out.name + ".data")
        for p in protected:
            if os.path.realpath(p) in (os.path.realpath(data_path), os.path.realpath(out)):
                raise UsageError(f"refusing to write over the input's file {p}")
        if external_data:  # the data file is renamed first: a model never points to a missing file
            staged_data = self.path_for(data_path, "output data file")
        staged = self.path_for(out)
        try:
            write_model_files(model, staged.parent, out.name, external_data)
        except OnnxTuckerError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot write {out}: {first_line(exc)}") from None
        if external_data and not staged_data.is_file():  # no tensor large enough: the model holds them all
            self._staged = [(s, t) for s, t in self._staged if s != staged_data]
            external_data = False
        if not external_data and data_path.is_file() and not data_path.is_symlink():
            # an earlier output's weights: not ours to delete, and the new model does not read them
            print(f"onnx-tucker: notice: {data_path} (an earlier output's weights) is left as it was: {out} holds its "
                  "weights itself and does not read it", file=sys.stderr)
        return staged, (data_path if external_data else None)

    def commit(self) -> None:
        """Rename every staged file into place (signals held back meanwhile); if one rename fails,
        the ones already done are undone (the previous files restored) and nothing is left staged."""
        if self.committed:
            return
        # the locks are taken before the signals are held back: a run waiting for another's commit stays interruptible
        with _folders_locked({target.parent for _, target in self._staged}), _signals_blocked():
            try:
                for _, target in self._staged:  # the targets may have changed since they were checked
                    check_target(target)
                self._rename_all()
            except BaseException:
                self._remove_staging()
                raise
            self._remove_staging()
            self.committed = True
            self._created.clear()
            if self.final:
                _state.final_committed = True

    def _rename_all(self) -> None:
        done = []  # (target, backup or None, existed)
        backups: dict[Path, Path] = {}  # staging folder -> folder of hard links to the previous files
        try:
            for staged, target in self._staged:
                existed, backup = os.path.lexists(target), None
                if existed:
                    if staged.parent not in backups:
                        backups[staged.parent] = Path(tempfile.mkdtemp(prefix="previous-", dir=staged.parent))
                    backup = backups[staged.parent] / str(len(done))
                    try:
                        os.link(target, backup)  # the previous content, kept until the end
                    except OSError:
                        backup = None
                os.replace(staged, target)
                done.append((target, backup, existed))
        except OSError as exc:
            for target, backup, existed in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, target)
                    elif not existed:
                        os.unlink(target)
                except OSError:
                    pass
            raise OnnxTuckerError(f"cannot write {target}: {_reason(exc)}") from None

    def remove_if_discarded(self, folder) -> None:
        """``folder`` was made for these outputs (``sweep --out-dir``): a discard removes it too, if it is empty then."""
        self._created.append(Path(folder))

    def discard(self) -> None:
        """Remove everything staged (nothing was renamed into place), and the empty folders made for it."""
        with _signals_blocked():
            self._remove_staging()
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:  # not empty (something else wrote there) or already gone: left as it is
                    pass
            self._created.clear()

    def _remove_staging(self) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        self._staged.clear()


@contextmanager
def command_outputs():
    """The outputs of one CLI command, with SIGINT/SIGTERM unwinding (:func:`interrupts_unwind`):
    committed when the block ends normally (if the command did not commit them itself), removed on
    any exception."""
    with interrupts_unwind():
        with Outputs(final=True) as outputs:
            yield outputs
