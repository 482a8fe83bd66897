"""Pictures of image rows for the reports: selfcheck's suspects.png (one sheet, or one per class
with `--gallery per-class`), explain's explain.png strip, and the report's thumbnails. Only for data
whose rows are images (C, H, W); for other data these return nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .. import gallery
from ..data import Split

SUSPECTS, PER_CLASS = 48, 16


def is_images(split: Split) -> bool:
    return split.n > 0 and split.dataset[0][0].dim() == 3


def _images(split: Split, ids: Sequence[str], mean: Sequence[float] | None, std: Sequence[float] | None):
    where = {i: r for r, i in enumerate(split.ids)}
    return gallery.images_of(split.dataset, [where[str(i)] for i in ids], mean, std)


def suspect_sheets(split: Split, table: pd.DataFrame, mean: Sequence[float] | None, std: Sequence[float] | None,
                   per_class: bool) -> dict[str, bytes]:
    """suspects.png: the first rows of selfcheck.csv (its order), labelled `given -> suggested` and rank;
    per class: suspects_<label>.png for each given label."""
    if not is_images(split):
        return {}
    groups = ([(f"suspects_{label}.png", part.head(PER_CLASS)) for label, part in table.groupby("label", sort=True)]
              if per_class else [("suspects.png", table.head(SUSPECTS))])
    sheets = {}
    for name, rows in groups:
        ids = rows["id"].astype(str).tolist()
        sheet = gallery.suspects_sheet(_images(split, ids, mean, std), ids, rows["label"].tolist(),
                                       rows["suggested_label"].tolist(), rows["rank"].tolist())
        sheets[name.replace("/", "_")] = gallery.png_bytes(sheet)
    return sheets


def explain_strip(test: Split, train: Split, table: pd.DataFrame, top: int, test_norm: tuple, train_norm: tuple
                  ) -> dict[str, bytes]:
    """explain.png: the test image, then its top helpful and top harmful training images."""
    if not is_images(train) or not is_images(test):
        return {}
    first = table.iloc[0]
    test_image = _images(test, [str(first["test_id"])], *test_norm)[0]
    strips = {}
    for direction in ("helpful", "harmful"):
        rows = table[table.direction == direction].head(top)
        ids = rows["train_id"].astype(str).tolist()
        pictures = _images(train, ids, *train_norm)
        strips[direction] = [(pictures[k], f"#{r}  label {lab}\n{v:+.2e}\n{i}") for k, (r, lab, v, i) in
                             enumerate(zip(rows["rank"], rows["train_label"], rows["loss_change_if_removed"], ids,
                                           strict=True))]
    caption = f"label {first['test_label']}\npredicted {first['predicted']}\n{first['test_id']}"
    strip = gallery.explain_strip(test_image, caption, strips["helpful"], strips["harmful"])
    return {"explain.png": gallery.png_bytes(strip)}


def thumbnails(split: Split, table: pd.DataFrame, mean: Sequence[float] | None, std: Sequence[float] | None,
               count: int = 50) -> dict[str, bytes]:
    """id -> small PNG for the report's top `count` suspects."""
    if not is_images(split):
        return {}
    ids = table["id"].astype(str).head(count).tolist()
    return gallery.thumbnails(_images(split, ids, mean, std), ids) if ids else {}



