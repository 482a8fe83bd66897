"""Results -> tables in SPEC column order, and atomic writing of a report folder.

A report is written all or nothing: every file goes to a temp file in the output folder first
(fsync'd); only when all are written are they moved into place with os.replace, manifest last.
A failed or killed run leaves the previous report untouched and no temp file behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError

FLOAT_FORMAT = "%.9g"


def _file_mode() -> int:
    """0666 minus the umask: what a plain `open(..., "w")` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()
SELFCHECK_COLUMNS = ["rank", "id", "label", "predicted", "prob_label", "loss", "self_influence", "flagged",
                     "suggested_label"]
PAIR_COLUMNS = ["test_id", "test_label", "rank", "train_id", "train_label", "loss_change_if_removed"]
OVERALL_COLUMNS = ["rank", "id", "label", "loss_change_if_removed"]


def order_desc(values: np.ndarray) -> np.ndarray:
    """Row order by value descending, ties by row index ascending (deterministic)."""
    return np.lexsort((np.arange(len(values)), -values))


def order_asc(values: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(values)), values))


def with_extra(table: pd.DataFrame, extra: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """Append the configured group/carry columns of `rows` after the SPEC columns."""
    if extra.shape[1] == 0:
        return table
    carried = extra.iloc[rows].reset_index(drop=True)
    carried.columns = [c if c not in table.columns else f"{c}_" for c in carried.columns]
    return pd.concat([table.reset_index(drop=True), carried], axis=1)


def selfcheck_table(ids: Sequence[str], labels: Sequence[Any], predicted: Sequence[Any],
                    prob_label: np.ndarray | None, loss: np.ndarray, self_influence: np.ndarray,
                    flagged: np.ndarray, suggested: Sequence[Any] | None, extra: pd.DataFrame,
                    signals: Mapping[str, np.ndarray] | None = None, rank_by: np.ndarray | None = None
                    ) -> pd.DataFrame:
    """One row per training example, sorted by `rank_by` (default self_influence) descending.
    `signals` (name -> (n,)) become extra columns after SPEC's, before the carried ones."""
    order = order_desc(self_influence if rank_by is None else rank_by)
    n = len(order)
    empty = [""] * n
    table = pd.DataFrame({
        "rank": np.arange(1, n + 1),
        "id": np.asarray(ids, dtype=object)[order],
        "label": np.asarray(labels, dtype=object)[order],
        "predicted": np.asarray(predicted, dtype=object)[order],
        "prob_label": empty if prob_label is None else prob_label[order],
        "loss": loss[order],
        "self_influence": self_influence[order],
        "flagged": flagged[order],
        "suggested_label": empty if suggested is None else np.asarray(suggested, dtype=object)[order],
    }, columns=SELFCHECK_COLUMNS)
    for name, values in (signals or {}).items():
        table[name] = np.asarray(values)[order]
    return with_extra(table, extra, order)


def write_atomic(out_dir: Path, tables: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any] | None) -> list[Path]:
    """Write CSVs and manifest.json (unless None) into out_dir all-or-nothing. Returns the final paths.
    Concurrent writers to one folder take turns (an exclusive flock on the folder), so a report is
    never a mix of two runs: the later run's files replace the earlier run's as a whole."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output folder {out_dir}: cannot create it ({e.strerror})",
                          hint="pass --out DIR to a writable folder") from None
    payloads = {name: table.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
                for name, table in tables.items()}
    if manifest is not None:
        payloads["manifest.json"] = json.dumps(_jsonable(manifest), indent=2, sort_keys=True) + "\n"
    with _folder_lock(out_dir):
        return _stage_and_replace(out_dir, payloads)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another infl run writes this folder
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _stage_and_replace(out_dir: Path, payloads: Mapping[str, str]) -> list[Path]:
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in payloads.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
            staged.append((Path(tmp), out_dir / name))
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide the report from the rest of a team
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException as e:  # also Ctrl-C / SIGTERM mid-write: no temp file stays behind
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConfigError(f"output folder {out_dir}: cannot write the report ({e.strerror})",
                              hint="check free space and permissions, or pass --out DIR") from None
        raise
    _fsync_dir(out_dir)
    return [final for _, final in staged]


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("influence-cli")
    except PackageNotFoundError:
        package = "unknown"
    return {"infl": package, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "argv": sys.argv}


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process (bytes) and, on CUDA, peak allocated device memory."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def _fsync_dir(path: Path) -> None:
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value
