"""File operations that cannot reach outside the folder they were given.

Everything ``protect`` writes (outputs, the run record) goes through a :class:`Tree`: a folder opened
once, whose sub-folders are opened one component at a time with ``O_NOFOLLOW`` relative to their
parent's file descriptor. A symbolic link anywhere inside the tree (``OUT/cat -> IN/cat``, a link
in place of an output file, a link planted at a temporary name) is therefore never followed: writing
through it fails with :class:`UnsafePath`, and replacing a linked file replaces the link itself,
never its target. Files are written to a hidden temporary name created with ``O_EXCL`` and renamed
into place (``os.replace``), so no reader ever sees a partial file and a crash leaves at most a
temporary that the next run deletes.

:class:`RunLock` takes an exclusive ``flock`` on the output folder and on a ``lock`` file in the
record folder, so two runs can never write the same folder at once.

Platforms without ``dir_fd`` support (Windows) fall back to checking every path component with
``lstat`` before writing, which is weaker (a race can swap a folder for a link in between).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import RecordError

log = logging.getLogger(__name__)

TMP_MARK = ".protect-tmp-"
_DIR_FD = os.open in os.supports_dir_fd and os.mkdir in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
#: Directory descriptors kept open per tree (least recently used are closed).
_MAX_OPEN_DIRS = 64


class UnsafePath(OSError):
    """A path inside a tree that is a symbolic link or not what it should be (never followed)."""


def _parts(rel: str) -> tuple[str, ...]:
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).is_absolute():
        raise UnsafePath(errno.EINVAL, f"not a plain relative path: {rel!r}")
    return parts


def tmp_name(name: str) -> str:
    """The hidden temporary name of ``name`` for this process and thread."""
    return f".{name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}"


class Tree:
    """A folder (created if missing) whose files are written without following any link inside it.

    Not shared between processes: each worker opens its own. Thread-safe. A ``private`` tree (the
    run record) creates its folders 0700 and its files 0600, whatever the umask.
    """

    def __init__(self, root: str | os.PathLike, create: bool = True, private: bool = False) -> None:
        self.root = Path(root)
        self.dir_mode, self.file_mode = (0o700, 0o600) if private else (0o777, 0o666)
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        self._lock = threading.Lock()
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self.fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC) if _DIR_FD else -1

    # -- folders ----------------------------------------------------------------------------
    def _open_dir(self, parts: tuple[str, ...], create: bool) -> int:
        """A descriptor of the sub-folder ``parts`` (cached; do not close it)."""
        with self._lock:
            fd = self._dirs.get(parts)
            if fd is not None:
                self._dirs.move_to_end(parts)
                return fd
        cur = self.fd if not parts[:-1] else self._open_dir(parts[:-1], create)
        name = parts[-1]
        flags = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=cur)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, self.dir_mode, dir_fd=cur)
            except FileExistsError:
                pass
            fd = self._open_checked(name, flags, cur, parts)
        except OSError as exc:
            raise self._unsafe(parts, exc) from None
        with self._lock:
            old = self._dirs.get(parts)
            if old is not None:  # another thread got there first
                os.close(fd)
                return old
            self._dirs[parts] = fd
            while len(self._dirs) > _MAX_OPEN_DIRS:
                _, victim = self._dirs.popitem(last=False)
                os.close(victim)
        return fd

    def _open_checked(self, name: str, flags: int, cur: int, parts: tuple[str, ...]) -> int:
        try:
            return os.open(name, flags, dir_fd=cur)
        except OSError as exc:
            raise self._unsafe(parts, exc) from None

    def _unsafe(self, parts: tuple[str, ...], exc: OSError) -> OSError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            where = "/".join(parts)
            return UnsafePath(exc.errno, f"'{where}' in {self.root} is a symbolic link or not a folder; "
                                         "refusing to write through it")
        return exc

    def _check_components(self, parts: tuple[str, ...], create: bool) -> Path:
        """Fallback without dir_fd: lstat every component (no links) and return the folder path."""
        cur = self.root
        for i, name in enumerate(parts):
            cur = cur / name
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    raise
                cur.mkdir(exist_ok=True, mode=self.dir_mode)
                st = os.lstat(cur)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(errno.ELOOP, f"'{'/'.join(parts[: i + 1])}' in {self.root} is a symbolic link or "
                                              "not a folder; refusing to write through it")
        return cur

    # -- files ------------------------------------------------------------------------------
    def write(self, rel: str, data: bytes | Callable[[BinaryIO], None]) -> None:
        """Atomically put ``data`` (bytes, or a function writing to a binary file) at ``rel``."""
        parts = _parts(rel)
        name, tmp = parts[-1], tmp_name(parts[-1])
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
        if _DIR_FD:
            dfd = self.fd if len(parts) == 1 else self._open_dir(parts[:-1], create=True)
            fd = os.open(tmp, flags, self.file_mode, dir_fd=dfd)
            _fill_and_rename(fd, data, lambda: os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd),
                             lambda: os.unlink(tmp, dir_fd=dfd))
        else:
            folder = self._check_components(parts[:-1], create=True)
            fd = os.open(folder / tmp, flags, self.file_mode)
            _fill_and_rename(fd, data, lambda: os.replace(folder / tmp, folder / name),
                             lambda: os.unlink(folder / tmp))

    def open_read(self, rel: str) -> BinaryIO | None:
        """The regular file ``rel`` opened for reading, or None when it is missing, a link or not a
        regular file."""
        parts = _parts(rel)
        try:
            if not _DIR_FD:
                folder = self._check_components(parts[:-1], create=False)
                path = folder / parts[-1]
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    return None
                return open(path, "rb")
            dfd = self.fd if len(parts) == 1 else self._open_dir(parts[:-1], create=False)
            fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY, dir_fd=dfd)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def open_append(self, rel: str) -> BinaryIO:
        """The existing regular file ``rel`` opened for appending (UnsafePath if it is a link)."""
        parts = _parts(rel)
        flags = os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC | _BINARY
        try:
            if not _DIR_FD:
                fd = os.open(self._check_components(parts[:-1], create=False) / parts[-1], flags)
            else:
                dfd = self.fd if len(parts) == 1 else self._open_dir(parts[:-1], create=False)
                fd = os.open(parts[-1], flags, dir_fd=dfd)
        except OSError as exc:
            raise self._unsafe(parts, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(errno.EINVAL, f"{self.root / rel} is not a regular file")
        return os.fdopen(fd, "ab")

    def read(self, rel: str) -> bytes | None:
        fh = self.open_read(rel)
        if fh is None:
            return None
        with fh:
            return fh.read()

    def sha256(self, rel: str) -> str | None:
        """SHA-256 of the regular file ``rel`` (None when missing, a link or not a file)."""
        fh = self.open_read(rel)
        if fh is None:
            return None
        with fh:
            return hashlib.file_digest(fh, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                else hashlib.sha256(fh.read()).hexdigest()

    def unlink(self, rel: str) -> bool:
        """Remove the file ``rel`` (a link is removed, never its target); False when absent."""
        parts = _parts(rel)
        try:
            if not _DIR_FD:
                os.unlink(self._check_components(parts[:-1], create=False) / parts[-1])
            else:
                dfd = self.fd if len(parts) == 1 else self._open_dir(parts[:-1], create=False)
                os.unlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            return False
        return True

    def remove_temporaries(self) -> int:
        """Delete every temporary file a killed run left in the tree (links are not followed)."""
        count = 0
        stack: list[Path] = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif TMP_MARK in entry.name and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        count += 1
                except OSError:
                    continue
        return count

    def close(self) -> None:
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> "Tree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fill_and_rename(fd: int, data: bytes | Callable[[BinaryIO], None], rename: Callable[[], None],
                     unlink: Callable[[], None]) -> None:
    """Write ``data`` to the new temporary ``fd`` and rename it into place; on any failure
    (an interrupt included) remove the temporary and re-raise."""
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
        rename()
    except BaseException:
        try:
            unlink()
        except OSError:
            pass
        raise


class RunLock:
    """An exclusive lock held for a whole run: ``flock`` on the output folder and on ``lock`` in the
    record folder (which also names the holder's pid). Released when the process ends, however it
    ends. A second run on the same folders gets :class:`RecordError` naming the holder."""

    def __init__(self, record_dir: Path, out_dir: Path) -> None:
        self.fds: list[int] = []
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return
        lock_path = record_dir / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        except OSError as exc:
            raise RecordError(f"cannot create the run lock {lock_path}: {exc.strerror or exc}") from None
        self.fds.append(fd)
        out_fd = os.open(out_dir, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        self.fds.append(out_fd)
        for lock_fd in (fd, out_fd):
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    if lock_fd == out_fd:  # some network file systems cannot lock a folder
                        log.warning("cannot lock %s (%s); relying on the record's lock", out_dir, exc.strerror)
                        continue
                    self.release()
                    raise RecordError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
                holder = _read_pid(fd)
                self.release()
                who = f"pid {holder}" if holder else "another process"
                raise RecordError(f"another protect run ({who}) is writing {out_dir} (record {record_dir}); "
                                  "wait for it to finish, or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
