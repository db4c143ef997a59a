"""Writing artifacts so that a crash, a kill or a full disk never leaves a partial file at the final path.

Every artifact (int8 program, compact model, report) is written to a temporary file in the same directory, flushed
and ``fsync``-ed, then moved over the final path with ``os.replace`` (atomic on POSIX and Windows). On failure the
temporary file is removed, the final path keeps what it held before (or stays absent), and the error names the path
and the OS error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ArtifactWriteError(OSError):
    """An artifact could not be written; nothing partial was left at its path."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "save_path") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, it becomes ``path`` atomically.

    Args:
        path: The final location. Its folder is created if needed.
        what: The argument the path came from, named in errors (e.g. ``"save_path"``).

    Raises:
        ArtifactWriteError: If the folder cannot be created or the file cannot be written, synced or moved (e.g. a
            full disk). The message names ``what``, the path and the OS error.

    Examples:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"weights")
        >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
        (b'weights', ['model.bin'])
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
    except OSError as err:
        raise ArtifactWriteError(f"Cannot write `{what}`={str(final)!r}: {err}.") from err
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as file:  # the writer may have closed its own handle: sync the bytes on disk now
            os.fsync(file.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as err:
        raise ArtifactWriteError(
            f"Cannot write `{what}`={str(final)!r}: {err}. Nothing was left at that path."
        ) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomically(path: str | os.PathLike[str], data: bytes, what: str = "save_path") -> int:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``) and return the number of bytes written."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return len(data)


def check_writable_dir(path: str | os.PathLike[str], what: str = "save_path") -> Path:
    """Fail now, not after training, when ``path``'s folder cannot be created or written to.

    Raises:
        ValueError: If the folder is not (and cannot be made) a writable directory; the message names ``what``.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"`{what}` must be a file path (a string) or None, got {path!r}.")
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"`{what}`={str(path)!r}: its folder cannot be created ({err}).") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"`{what}`={str(path)!r}: its folder {str(folder)!r} is not writable.")
    if Path(path).is_dir():
        raise ValueError(f"`{what}`={str(path)!r} is a directory; give a file path.")
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
