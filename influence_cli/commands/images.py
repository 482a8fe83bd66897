"""Pictures of image rows for the reports: selfcheck's suspects.png (one sheet, or one per class
with `--gallery per-class`), explain's explain.png strip, rank's rank_strips.png (one such strip per
test example), and the report's thumbnails. Only for data
whose rows are images (C, H, W); for other data these return nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .. import gallery
from ..data import Split

SUSPECTS, PER_CLASS, RANK_STRIPS = 48, 16, 12


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
    caption = f"label {first['test_label']}\npredicted {first['predicted']}\n{first['test_id']}"
    strip = _strip(test, train, str(first["test_id"]), caption, table[table.direction == "helpful"].head(top),
                   table[table.direction == "harmful"].head(top), test_norm, train_norm)
    return {"explain.png": gallery.png_bytes(strip)}


def rank_strips(test: Split, train: Split, helpful: pd.DataFrame, harmful: pd.DataFrame, top: int,
                test_norm: tuple, train_norm: tuple, limit: int = RANK_STRIPS) -> dict[str, bytes]:
    """rank_strips.png: for each of the first `limit` test examples of helpful.csv / harmful.csv (their
    order), one row as in explain.png: the test image, its `top` most helpful then most harmful training
    images with rank, label and effect. `*_norm` are the splits' (mean, std). Nothing for non-image data."""
    if not is_images(train) or not is_images(test) or not len(helpful) + len(harmful):
        return {}
    order = list(dict.fromkeys([*helpful["test_id"].astype(str), *harmful["test_id"].astype(str)]))
    shown = order[:limit]
    rows = []
    for test_id in shown:
        good = helpful[helpful["test_id"].astype(str) == test_id].head(top)
        bad = harmful[harmful["test_id"].astype(str) == test_id].head(top)
        label = (good if len(good) else bad)["test_label"].iloc[0]
        rows.append(_strip(test, train, test_id, f"label {label}\n{test_id}", good, bad, test_norm, train_norm))
    more = f" (the first {len(shown)} of {len(order)}: choose with --test-ids)" if len(order) > len(shown) else ""
    title = f"rank: each test example's most helpful (green) and most harmful (red) training images{more}"
    return {"rank_strips.png": gallery.png_bytes(gallery.stacked(rows, title))}


def _strip(test: Split, train: Split, test_id: str, caption: str, helpful: pd.DataFrame, harmful: pd.DataFrame,
           test_norm: tuple, train_norm: tuple):  # noqa: ANN202 - a PIL image
    test_image = _images(test, [test_id], *test_norm)[0]
    strips = {}
    for direction, rows in (("helpful", helpful), ("harmful", harmful)):
        ids = rows["train_id"].astype(str).tolist()
        pictures = _images(train, ids, *train_norm) if ids else []
        strips[direction] = [(pictures[k], f"#{r}  label {lab}\n{v:+.2e}\n{i}") for k, (r, lab, v, i) in
                             enumerate(zip(rows["rank"], rows["train_label"], rows["loss_change_if_removed"], ids,
                                           strict=True))]
    return gallery.explain_strip(test_image, caption, strips["helpful"], strips["harmful"])


def thumbnails(split: Split, table: pd.DataFrame, mean: Sequence[float] | None, std: Sequence[float] | None,
               count: int = 50) -> dict[str, bytes]:
    """id -> small PNG for the report's top `count` suspects."""
    if not is_images(split):
        return {}
    ids = table["id"].astype(str).head(count).tolist()
    return gallery.thumbnails(_images(split, ids, mean, std), ids) if ids else {}



