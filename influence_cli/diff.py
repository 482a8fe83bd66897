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
    try:
        table = pd.read_csv(path, dtype={"id": str, "label": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{which}: cannot read {path} ({e})") from None
    missing = NEEDED - set(table.columns)
    if missing:
        raise DataError(f"{which}: {path} lacks columns {', '.join(sorted(missing))}; is it a selfcheck.csv?")
    if table["id"].duplicated().any():
        raise DataError(f"{which}: {path} has duplicate ids, e.g. {table['id'][table['id'].duplicated()].iloc[0]!r}")
    table["flagged"] = table["flagged"].astype(str).str.lower().isin(["true", "1"])
    return table.set_index("id")


def diff_reports(old_dir: Path, new_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """(diff table, counts per status)."""
    old, new = read_selfcheck(old_dir, "OLD_DIR"), read_selfcheck(new_dir, "NEW_DIR")
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
