"""Atomic writing of one file (a PNG, report.html): temp file beside it, fsync, os.replace.

No torch here, so the HTML report imports nothing heavy. A failed or killed write leaves the previous file
untouched and no temp file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def _file_mode() -> int:
    """0666 minus the umask: what a plain `open(..., "w")` would have given (mkstemp's 0600 would hide it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` all or nothing (creating the folder); ConfigError naming the path on failure."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ConfigError(f"{path}: cannot write it ({e.strerror or e})",
                          hint="check free space and permissions, or pass --out DIR") from None
    finally:  # also Ctrl-C mid-write
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path
