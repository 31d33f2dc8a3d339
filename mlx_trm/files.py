"""Writing files so that a crash at any instant leaves either the old version or the new one.

A file is written to a temporary sibling, flushed to disk and renamed over the target (a rename
within one directory is atomic on POSIX file systems). A directory (a checkpoint) is filled in a
temporary sibling and swapped in with two renames; :func:`replacement_leftovers` names what a
crash between them can leave, so a reader can recover the newest complete copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories) to disk."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def replacement_leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """``(new, old)``: the temporary directories a replacement of ``path`` may leave behind.

    ``new`` (``.NAME.tmp-*``) were being written; ``old`` (``.NAME.old-*``) were the previous
    version, moved aside just before the new one was renamed into place.
    """
    if not path.parent.is_dir():
        return [], []
    new = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    return [p for p in new if p.is_dir()], [p for p in old if p.is_dir()]


def write_atomic_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a fresh temporary directory, then swap it in for ``path``.

    The previous ``path`` is renamed aside before the new one takes its name and is deleted
    only after: at every instant one complete copy exists under ``path``, ``.NAME.tmp-*`` or
    ``.NAME.old-*`` (see :func:`replacement_leftovers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(_umask_mode(0o777))  # mkdtemp makes it private; a model dir is an ordinary folder
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if old is not None:  # put the previous version back rather than leave no `path`
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
