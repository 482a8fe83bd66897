"""`infl diff`: what changed between two selfcheck reports (the nightly question: did today's data get worse?).

A row (by id) is `new` when flagged in the new report but not in the old one (or absent there), `resolved` when
flagged in the old report but not in the new one (or gone), `persistent` when flagged in both. Rows flagged in
neither are left out. Sorted by status (new, persistent, resolved), then by new rank, then id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError

COLUMNS = ["id", "status", "old_rank", "new_rank", "old_self_influence", "new_self_influence", "old_label",
           "new_label"]
NEEDED = {"rank", "id", "label", "self_influence", "flagged"}
STATUS_ORDER = {"new": 0, "persistent": 1, "resolved": 2}


def read_selfcheck(folder: Path, which: str) -> pd.DataFrame:
    path = folder / "selfcheck.csv" if folder.is_dir() else folder
    if not path.is_file():
        raise ConfigError(f"{which}: no selfcheck.csv at {path}", hint="pass the folder of an `infl selfcheck` run")
    try:  # ids and labels verbatim: "NA" is an id, not a missing value
        table = pd.read_csv(path, dtype={"id": str, "label": str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{which}: {path} is empty", hint="rerun `infl selfcheck` to write it") from None
    except Exception as e:  # noqa: BLE001 - pandas raises many types for a damaged file; the file is the cause
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{which}: cannot read {path} as a selfcheck.csv ({type(e).__name__}: {reason})",
                        hint="rerun `infl selfcheck` to write it") from None
    missing = NEEDED - set(table.columns)
    if missing:
        raise DataError(f"{which}: {path} lacks columns {', '.join(sorted(missing))}; is it a selfcheck.csv?")
    if table.empty:
        raise DataError(f"{which}: {path} has no rows", hint="rerun `infl selfcheck` to write it")
    if table["id"].duplicated().any():
        raise DataError(f"{which}: {path} has duplicate ids, e.g. {table['id'][table['id'].duplicated()].iloc[0]!r}")
    for column in ("rank", "self_influence"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        if numbers.isna().any():
            row = int(numbers.isna().to_numpy().nonzero()[0][0])
            raise DataError(f"{which}: {path} column {column!r} is not a number at id {table['id'].iloc[row]!r}",
                            hint="rerun `infl selfcheck` to write it")
        table[column] = numbers
    table["flagged"] = table["flagged"].astype(str).str.lower().isin(["true", "1"])
    return table.set_index("id")


def diff_reports(old_dir: Path, new_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """(diff table, counts per status)."""
    old, new = read_selfcheck(old_dir, "OLD_DIR"), read_selfcheck(new_dir, "NEW_DIR")
    if not old.index.intersection(new.index).size:
        raise DataError(f"OLD_DIR and NEW_DIR have no ids in common ({len(old)} and {len(new)} rows, e.g. "
                        f"{old.index[0]!r} and {new.index[0]!r}): they are reports of different datasets",
                        hint="compare two selfcheck runs on the same training set")
    ids = old.index[old["flagged"]].union(new.index[new["flagged"]])
    was = old["flagged"].reindex(ids, fill_value=False).to_numpy(dtype=bool)
    now = new["flagged"].reindex(ids, fill_value=False).to_numpy(dtype=bool)
    status = np.where(now & ~was, "new", np.where(now & was, "persistent", "resolved"))
    frame = pd.DataFrame({
        "id": ids, "status": status,
        "old_rank": old["rank"].reindex(ids).to_numpy(), "new_rank": new["rank"].reindex(ids).to_numpy(),
        "old_self_influence": old["self_influence"].reindex(ids).to_numpy(),
        "new_self_influence": new["self_influence"].reindex(ids).to_numpy(),
        "old_label": old["label"].reindex(ids).to_numpy(), "new_label": new["label"].reindex(ids).to_numpy(),
    }, columns=COLUMNS)
    key = frame["status"].map(STATUS_ORDER)
    rank = frame["new_rank"].fillna(frame["old_rank"]).to_numpy()
    order = np.lexsort((frame["id"].to_numpy(), rank, key.to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    counts = {s: int((frame["status"] == s).sum()) for s in STATUS_ORDER}
    counts.update(old_flagged=int(old["flagged"].sum()), new_flagged=int(new["flagged"].sum()),
                  old_rows=len(old), new_rows=len(new))
    return frame, counts
