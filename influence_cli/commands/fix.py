"""`infl fix`: apply suggested labels to chosen suspects, in a corrected copy of the training data.

The rows come from the selfcheck report in the output folder: its first K rows (`--top K`), its
flagged rows (`--flagged`), or the rows of an edited selfcheck.csv whose `accept` column is true
(`--accept FILE`; a `new_label` column there overrides the suggestion). The new label is the row's
`suggested_label`, else the model's `predicted` label; rows whose new label equals the given one are
left out. The original data is never touched:
- csv / parquet: a copy of the training file with the label column changed (every other byte of a
  cell kept as read, as strings), `<stem>.fixed.<ext>` in the output folder;
- imagefolder: `moves.csv` (`id,label,new_label,source,destination`) and, with `copy_images`, a
  copy of the tree with the moved images in their new class folders.
`fixes.csv` (`id,label,new_label,suspicion`) lists every change.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import Config
from ..errors import ConfigError, DataError
from ..report import read_table
from ..run import Report

FIX_COLUMNS = ["id", "label", "new_label", "suspicion"]
TRUE = {"1", "true", "yes", "y", "x", "accept", "accepted"}


@dataclass(frozen=True)
class FixOptions:
    top: int | None = None
    flagged: bool = False
    accept: Path | None = None
    copy_images: bool = False

    def __post_init__(self) -> None:
        chosen = (self.top is not None) + self.flagged + (self.accept is not None)
        if chosen != 1:
            raise ConfigError("infl fix: choose the rows with exactly one of --top K, --flagged, --accept FILE")
        if self.top is not None and (isinstance(self.top, bool) or self.top < 1):
            raise ConfigError(f"--top: must be >= 1, got {self.top}")


def fix(cfg: Config, report_dir: Path, options: FixOptions) -> tuple[Report, dict[str, bytes]]:
    """(report with fixes.csv, extra files to write beside it: name -> bytes)."""
    if cfg.task == "regression":
        raise ConfigError("infl fix: task regression has no labels to suggest", hint="fix applies to classification")
    selfcheck = _read_selfcheck(report_dir / "selfcheck.csv")
    chosen = _chosen(selfcheck, options)
    split = cfg.data.train
    if split.format in ("csv", "parquet"):
        extra = {_fixed_name(split.path): _fixed_table(split, chosen)}
    elif split.format == "imagefolder":
        extra = _moves(split.path, chosen, report_dir, options.copy_images)
    else:
        raise ConfigError(f"data.train.format: infl fix writes corrected copies of csv, parquet and imagefolder data,"
                          f" not {split.format}", hint="apply fixes.csv to your data yourself")
    summary = {"command": "fix", "n": len(selfcheck), "fixed": len(chosen), "source": str(split.path),
               "written": sorted(extra)}
    manifest = {"command": "fix", "config": cfg.to_dict(), "summary": summary}
    return Report({"fixes.csv": chosen[FIX_COLUMNS]}, summary, manifest), extra


def _read_selfcheck(path: Path) -> pd.DataFrame:
    return read_table(path, "infl fix", ("id", "label", "predicted", "flagged"),
                      "run `infl selfcheck` first (same --out), or pass an edited selfcheck.csv")


def _chosen(selfcheck: pd.DataFrame, options: FixOptions) -> pd.DataFrame:
    frame = selfcheck.copy()
    suggested = frame["suggested_label"] if "suggested_label" in frame.columns else ""
    frame["new_label"] = np.where(pd.Series(suggested).astype(str) != "", suggested, frame["predicted"])
    if options.top is not None:
        frame = frame.head(options.top)
    elif options.flagged:
        frame = frame[frame["flagged"].str.lower() == "true"]
    else:
        frame = _accepted(frame, options.accept)  # type: ignore[arg-type]
    frame["suspicion"] = frame["suspicion"] if "suspicion" in frame.columns else frame.get("self_influence", "")
    return frame[frame["new_label"].astype(str) != frame["label"].astype(str)].reset_index(drop=True)


def _accepted(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    edited = read_table(path, "--accept", ("id", "accept"),
                        "an edited copy of selfcheck.csv with a column accept (1 for the rows to fix)")
    keep = edited[edited["accept"].str.strip().str.lower().isin(TRUE)]
    unknown = sorted(set(keep["id"]) - set(frame["id"]))
    if unknown:
        raise DataError(f"--accept: ids not in the selfcheck report: {', '.join(unknown[:5])}")
    chosen = frame.set_index("id").loc[keep["id"]].reset_index()
    if "new_label" in keep.columns:
        override = keep["new_label"].astype(str).to_numpy()
        chosen["new_label"] = np.where(override != "", override, chosen["new_label"])
    return chosen


def _fixed_name(path: Path | None) -> str:
    path = Path(str(path))
    return f"{path.stem}.fixed{path.suffix}"


def _fixed_table(split: Any, chosen: pd.DataFrame) -> bytes:
    """The training file with the chosen rows' labels replaced, every other cell as read."""
    path = Path(split.path)
    if split.format == "parquet":
        table = pd.read_parquet(path)
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    ids = table[split.id].astype(str) if split.id else pd.Series([str(i) for i in range(len(table))])
    where = pd.Series(np.arange(len(table)), index=ids.to_numpy())
    missing = sorted(set(chosen["id"]) - set(where.index))
    if missing:
        raise DataError(f"data.train: ids of the selfcheck report are not in {path}: {', '.join(missing[:5])}",
                        hint="the report is from other data: rerun `infl selfcheck`")
    rows = where.loc[chosen["id"]].to_numpy()
    column = table[split.label].copy()
    new = chosen["new_label"].to_numpy(dtype=object)
    if split.format == "parquet" and pd.api.types.is_numeric_dtype(column):
        new = pd.to_numeric(pd.Series(new)).to_numpy()
    else:
        column = column.astype(object)
    column.iloc[rows] = new
    table[split.label] = column
    if split.format == "parquet":
        import io

        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        return buffer.getvalue()
    return table.to_csv(index=False, lineterminator="\n").encode()


def _moves(root: Path | None, chosen: pd.DataFrame, report_dir: Path, copy_images: bool) -> dict[str, bytes]:
    """moves.csv for an image folder (ids are paths relative to the root: class/file), and the copied tree."""
    root = Path(str(root))
    records = []
    for _, row in chosen.iterrows():
        source = Path(row["id"])
        records.append({"id": row["id"], "label": row["label"], "new_label": row["new_label"],
                        "source": str(root / source), "destination": str(Path(str(row["new_label"])) / source.name)})
    moves = pd.DataFrame.from_records(records, columns=["id", "label", "new_label", "source", "destination"])
    if copy_images:
        tree = report_dir / f"{root.name}.fixed"
        staging = report_dir / f".{root.name}.fixed.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(root, staging)
        for rec in records:
            target = staging / rec["destination"]
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / rec["id"]).replace(target)
        shutil.rmtree(tree, ignore_errors=True)
        staging.replace(tree)
    return {"moves.csv": moves.to_csv(index=False, lineterminator="\n").encode()}
