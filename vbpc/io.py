"""Atomic file writes: readers never see a partial file, and the file's mode follows the umask
(``0o666 & ~umask``, as ``open(path, "w")`` would give)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Union

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_regular_file", "current_umask", "run_lock"]

LOCK_NAME = ".vbpc.lock"

PathLike = Union[str, "os.PathLike[str]"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows, else set and restored
    under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path`` (``os.replace``).

    For writers that want a file name (``torch.save``, ``safetensors.torch.save_file``,
    ``fig.savefig``).  On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_regular_file(path: PathLike, what: str = "file") -> Path:
    """``path`` if it is an existing regular file (symlinks followed); otherwise ``FileNotFoundError``
    or ``IsADirectoryError``/``ValueError`` naming what it is (a directory, a FIFO that would block a
    reader forever, a device)."""
    import stat

    path = Path(os.path.expanduser(os.fspath(path)))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"
        raise ValueError(f"{path} is {kind}, not a regular {what}")
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def run_lock(directory: PathLike, command: str) -> Iterator[Path]:
    """Hold the run directory ``directory`` exclusively for ``command`` (created if needed).

    An advisory ``flock`` on ``<directory>/.vbpc.lock``, which also records the holder's PID and
    command; the kernel releases it when the holder exits, even after a SIGKILL, so a stale lock
    never blocks a resume.  A second holder gets :class:`~vbpc.errors.RunLockedError` naming the
    first's PID."""
    from .errors import RunLockedError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; run unlocked
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunLockedError(f"run directory {directory} is in use by {holder}; wait for it to finish "
                                     "or choose another run.out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} ({command})".encode(), 0)
        try:
            yield directory
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
