"""Results -> tables in SPEC column order, and atomic writing of a report folder.

A report is one run's set of files, swapped in whole: every file is written (fsync'd) into a
stage folder inside the output folder, then moved into place with os.replace, manifests last,
while the files they replace are kept aside; the previous run's files of the same command that
this run does not write are removed in the same swap. Any failure puts the previous set back, so
the folder holds the old set or the new one, and no temp file.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError, DataError
from .files import FILE_MODE, fsync_dir, write_atomic_bytes
from .interrupts import deferred

__all__ = ["FILE_MODE", "jsonable", "write_atomic"]  # FILE_MODE: kept here for older importers (now in files)

FLOAT_FORMAT = "%.9g"


SELFCHECK_COLUMNS = ["rank", "id", "label", "predicted", "prob_label", "loss", "self_influence", "suspicion",
                     "flagged", "suggested_label"]
PAIR_COLUMNS = ["test_id", "test_label", "rank", "train_id", "train_label", "loss_change_if_removed"]
OVERALL_COLUMNS = ["rank", "id", "label", "loss_change_if_removed"]


def order_desc(values: np.ndarray) -> np.ndarray:
    """Row order by value descending, ties by row index ascending (deterministic)."""
    return np.lexsort((np.arange(len(values)), -values))


def top_mask(values: np.ndarray, count: int) -> np.ndarray:
    """(n,) bool: the first `count` rows of `order_desc(values)`, the rows a table sorted by `values` lists first."""
    mask = np.zeros(len(values), dtype=bool)
    mask[order_desc(np.asarray(values, dtype=np.float64))[: max(int(count), 0)]] = True
    return mask


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
                    signals: Mapping[str, np.ndarray] | None = None, rank_by: np.ndarray | None = None, *,
                    suspicion: np.ndarray | None = None) -> pd.DataFrame:
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
        "suspicion": empty if suspicion is None else np.asarray(suspicion)[order],
        "flagged": flagged[order],
        "suggested_label": empty if suggested is None else np.asarray(suggested, dtype=object)[order],
    }, columns=SELFCHECK_COLUMNS)
    for name, values in (signals or {}).items():
        table[name] = np.asarray(values)[order]
    return with_extra(table, extra, order)


INDEX = ".infl-report.json"  # {command: [file names its last run wrote]}
STAGE_PREFIX = ".infl-stage-"
PLAN = ".plan.json"
# a command's new run also retires these commands' files (they were computed from its old files)
INVALIDATES = {"selfcheck": ("diff", "fix", "report"), "rank": ("report",), "verify": ("report",)}
Payload = pd.DataFrame | str | bytes


def write_atomic(out_dir: Path, tables: Mapping[str, Payload], manifest: Mapping[str, Any] | None, *,
                 command: str | None = None) -> list[Path]:
    """Write one run's report into out_dir all-or-nothing and return the final paths.

    `tables`: file name -> DataFrame (CSV), str or bytes (HTML, PNG). With a manifest, it is
    written as `manifest.json` (the folder's latest run) and as `<command>.manifest.json` (this
    command's, kept when another command writes the folder). `command` defaults to
    manifest["command"]; when known, the files this command's previous run wrote and this run
    does not (and those of the commands it INVALIDATES) are removed in the same swap, as recorded
    in the folder's `.infl-report.json`. Every file is written into a stage folder inside out_dir
    first, then swapped in with os.replace; a failure at any step puts the previous files back, so
    the folder holds the old set or the new one. Concurrent writers take turns (flock)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output folder {out_dir}: cannot create it ({e.strerror})",
                          hint="pass --out DIR to a writable folder") from None
    command = command or (str(manifest["command"]) if manifest and manifest.get("command") else None)
    payloads = {name: _encode(value) for name, value in tables.items()}
    if manifest is not None:
        text = (json.dumps(jsonable(manifest), indent=2, sort_keys=True) + "\n").encode()
        payloads["manifest.json"] = text
        if command:
            payloads[f"{command}.manifest.json"] = text
    with _folder_lock(out_dir):
        try:
            return _swap_in(out_dir, payloads, command)
        except OSError as e:
            raise ConfigError(f"output folder {out_dir}: cannot write the report ({e.strerror or e}); the "
                              "previous report is unchanged", hint="check free space and permissions, or pass "
                              "--out DIR") from None


def _encode(value: Payload) -> bytes:
    if isinstance(value, pd.DataFrame):
        return value.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n").encode()
    return value.encode() if isinstance(value, str) else bytes(value)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another infl run writes this folder
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _swap_in(out_dir: Path, payloads: Mapping[str, bytes], command: str | None) -> list[Path]:
    """Stage, then swap: new files in (manifests last), stale ones out, the index last of all."""
    for leftover in out_dir.glob(f"{STAGE_PREFIX}*"):
        _recover(out_dir, leftover)  # a run killed with SIGKILL mid-swap: put its old files back
    index, stale = _plan(out_dir, list(payloads), command)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out_dir))
    try:
        order = sorted(payloads, key=lambda n: n.endswith("manifest.json"))
        for name in order:
            write_atomic_bytes(stage / name, payloads[name])
        if index is not None:
            write_atomic_bytes(stage / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
        swapped = [*order, *stale, *([INDEX] if index is not None else [])]
        plan = {"new": [n for n in swapped if n not in stale], "stale": stale}
        write_atomic_bytes(stage / PLAN, json.dumps(plan))  # what _recover undoes after a SIGKILL
        (stage / ".old").mkdir()
        with deferred():  # Ctrl-C / SIGTERM wait for the swap (microseconds) to finish or roll back
            done: list[tuple[str, bool]] = []  # (name, had a previous file)
            try:
                for name in swapped:
                    done.append((name, _swap_one(out_dir, stage, name, name in stale)))
            except BaseException:
                _roll_back(out_dir, stage, done, stale)
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    fsync_dir(out_dir)
    return [out_dir / name for name in payloads]


def _swap_one(out_dir: Path, stage: Path, name: str, remove: bool) -> bool:
    """Keep the previous file (a hard link in stage/.old), then replace or remove it."""
    final, backup = out_dir / name, stage / ".old" / name
    had = final.is_file() and not final.is_symlink()
    if remove:
        if had:
            os.replace(final, backup)
        return had
    if had:
        try:
            os.link(final, backup)
        except OSError:  # a filesystem without hard links
            shutil.copy2(final, backup)
    os.replace(stage / name, final)
    return had


def _roll_back(out_dir: Path, stage: Path, done: list[tuple[str, bool]], stale: list[str]) -> None:
    for name, had in reversed(done):
        final, backup = out_dir / name, stage / ".old" / name
        try:
            if had:
                os.replace(backup, final)
            elif name not in stale:
                final.unlink(missing_ok=True)
        except OSError:
            pass  # best effort; the error that stopped the swap is what gets reported


def _plan(out_dir: Path, names: list[str], command: str | None) -> tuple[dict[str, list[str]] | None, list[str]]:
    """(the new index, the files to remove). Without a command: (None, []), the files alone."""
    if command is None:
        return None, []
    try:
        loaded = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
        index = {str(k): [str(n) for n in v] for k, v in loaded.items()} if isinstance(loaded, dict) else {}
    except (OSError, ValueError, TypeError, AttributeError):
        index = {}
    retired = [command, *INVALIDATES.get(command, ())]
    candidates = {n for c in retired for n in index.get(c, [])} - set(names)
    for c in retired:
        index.pop(c, None)
    index = {c: [n for n in files if n not in names] for c, files in index.items()}  # overwritten: now ours
    claimed = {n for files in index.values() for n in files}
    index[command] = sorted(names)
    stale = sorted(n for n in candidates - claimed if _plain_name(n))
    return index, stale


def _plain_name(name: str) -> bool:
    """Only a file directly in the folder is ever removed (the index is data from disk)."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..", INDEX)


def _recover(out_dir: Path, stage: Path) -> None:
    """Undo what a swap killed midway (SIGKILL, power loss) did, then drop its stage: files it
    moved in without a previous version go, previous versions kept in stage/.old come back."""
    try:
        plan = json.loads((stage / PLAN).read_text(encoding="utf-8"))
        new, stale = [str(n) for n in plan["new"]], [str(n) for n in plan["stale"]]
    except (OSError, ValueError, TypeError, KeyError):
        new, stale = [], []  # killed while staging: nothing in out_dir was touched
    old = stage / ".old"
    for name in (n for n in [*new, *stale] if (_plain_name(n) or n == INDEX) and old.is_dir()):
        backup = old / name
        try:
            if backup.is_file():
                os.replace(backup, out_dir / name)
            elif name in new and not (stage / name).exists() and (out_dir / name).is_file():
                (out_dir / name).unlink()  # moved in by the killed run, with no previous version
        except OSError:
            pass
    shutil.rmtree(stage, ignore_errors=True)


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


def jsonable(value: Any) -> Any:
    """A manifest or summary as plain JSON types: numpy numbers as Python numbers, paths as text,
    non-finite floats (a correlation of constant values, an interval from too few rows) as null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def read_table(path: Path, what: str, required: Sequence[str], hint: str) -> pd.DataFrame:
    """A report CSV (selfcheck.csv, fixes.csv, ...) read back verbatim as strings ("NA" stays an id).
    ConfigError when it does not exist (`hint` says how to make it), DataError when it cannot be
    read or lacks a `required` column; both name the path."""
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist", hint=hint)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: {path} is not a readable CSV ({e})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: {path} lacks the columns {', '.join(missing)}", hint=hint)
    return frame
