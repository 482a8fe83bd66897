"""The one atomic file writer: temp file in the target's folder, write, fsync, os.replace.

Used for reports (report.write_atomic), cache entries (cache.Cache.put) and checkpoints
(models.save_checkpoint). The file appears under its final name whole or not at all; a failure,
Ctrl-C or SIGTERM during the write leaves any earlier file of that name untouched and no temp
file behind (the two signals are held until the file is in place, see interrupts.deferred).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .interrupts import deferred


def _file_mode() -> int:
    """0666 minus the umask: what a plain `open(..., "w")` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()
Writer = Callable[[BinaryIO], object]


def write_atomic_bytes(path: Path | str, data: bytes | str | Writer, *, fsync: bool = True) -> Path:
    """Write `data` (bytes, UTF-8 text, or a function that writes to the open binary file) to
    `path` atomically, with FILE_MODE permissions (mkstemp's 0600 would hide a report from the
    rest of a team). `fsync=False` skips the flush to disk (cache entries, whose checksum catches
    what a power cut could truncate). The folder must exist. Returns `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with deferred():
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (best effort: some filesystems refuse a directory fsync)."""
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


def write_file(path: Path | str, data: bytes | str) -> Path:
    """write_atomic_bytes for a user-facing file (a PNG, report.html, a config): creates the folder,
    and a failure is a ConfigError naming the path."""
    from .errors import ConfigError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic_bytes(path, data)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write it ({e.strerror or e})",
                          hint="check free space and permissions, or pass --out DIR") from None
