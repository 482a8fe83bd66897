"""csv/parquet features streamed a chunk at a time (data._tabular_streamed) give exactly what the whole-frame read
(data._tabular_whole, the reference) gives: ids, labels, features, extra columns and the fingerprint (the cache key);
files whose chunks disagree on a column's type, and every error, go to the whole-frame read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from influence_cli import data
from influence_cli.config import SplitConfig
from influence_cli.data import load_split
from influence_cli.errors import DataError

pytest.importorskip("pyarrow")


def frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": [f"r{i:04d}" if i % 7 else f"00{i}" for i in range(n)],
        "a": rng.normal(size=n).astype(np.float32),
        "label": rng.choice(["cat", "dog", "bird"], size=n),
        "b": rng.normal(size=n),
        "c": rng.integers(-5, 5, size=n),
        "d": rng.random(n) > 0.5,
        "src": rng.choice(["web", "scan"], size=n),
        "note": [f"n{i}" for i in range(n)],
    })


def write(df: pd.DataFrame, path: Path, **kw) -> Path:  # noqa: ANN003
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False, **kw)
    else:
        df.to_csv(path, index=False)
    return path


def whole_only(monkeypatch) -> None:  # noqa: ANN001
    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("streaming disabled for the reference")

    monkeypatch.setattr(data, "_tabular_streamed", refuse)


def streamed_only(monkeypatch) -> None:  # noqa: ANN001
    def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the whole-frame read was used")

    monkeypatch.setattr(data, "_tabular_whole", refuse)


def assert_same(a: data.Split, b: data.Split) -> None:
    assert a.ids == b.ids and all(type(i) is str for i in a.ids)
    assert a.labels.dtype == b.labels.dtype and torch.equal(a.labels, b.labels)
    xa, xb = a.dataset.x, b.dataset.x
    assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape
    assert xa.is_contiguous() and xb.is_contiguous()  # rows contiguous, however the file was chunked
    assert xa.numpy().tobytes() == xb.numpy().tobytes()
    pd.testing.assert_frame_equal(a.extra, b.extra)
    assert (a.classes, a.features, a.fingerprint) == (b.classes, b.features, b.fingerprint)


def load_both(monkeypatch, cfg: SplitConfig, role: str = "train", **kw) -> tuple[data.Split, data.Split]:  # noqa: ANN001, ANN003
    with monkeypatch.context() as m:
        streamed_only(m)
        streamed = load_split(cfg, role, "classification", **kw)
    with monkeypatch.context() as m:
        whole_only(m)
        whole = load_split(cfg, role, "classification", **kw)
    return streamed, whole


CONFIGS = {  # name -> (columns dropped from the file, SplitConfig fields)
    "ids_carry_group": ((), {"id": "id", "group": "src", "carry": ("note",)}),
    "row_index_ids": (("src", "note"), {"carry": ("id",)}),
    "listed_features": ((), {"id": "id", "features": ("c", "a", "d")}),
}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("chunk", [2**22, 64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_equals_whole(tmp_path: Path, monkeypatch, fmt: str, chunk: int, name: str) -> None:
    """One chunk, and many chunks of rows (csv) or of columns and row groups (parquet, 6 groups of 50 rows)."""
    monkeypatch.setattr(data, "CHUNK_VALUES", chunk)
    dropped, kw = CONFIGS[name]
    path = write(frame().drop(columns=list(dropped)), tmp_path / f"train.{fmt}",
                 **({"row_group_size": 50} if fmt == "parquet" else {}))
    streamed, whole = load_both(monkeypatch, SplitConfig(format=fmt, path=path, label="label", **kw))
    assert_same(streamed, whole)
    assert streamed.n == 300


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_test_split_takes_train_features_by_name(tmp_path: Path, monkeypatch, fmt: str) -> None:
    monkeypatch.setattr(data, "CHUNK_VALUES", 64)
    df = frame()
    train = write(df, tmp_path / f"train.{fmt}")
    test = write(frame(40, seed=1)[["note", "d", "label", "c", "b", "id", "a", "src"]], tmp_path / f"test.{fmt}")
    cfg = SplitConfig(format=fmt, path=train, label="label", id="id", carry=("src", "note"))
    base = load_split(cfg, "train", "classification")
    test_cfg = SplitConfig(format=fmt, path=test, label="label", id="id", carry=("src", "note"))
    streamed, whole = load_both(monkeypatch, test_cfg, "test", classes=base.classes, features=base.features)
    assert_same(streamed, whole)
    assert streamed.features == ("a", "b", "c", "d")


def test_ids_and_labels_read_verbatim_across_csv_chunks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "CHUNK_VALUES", 16)
    path = tmp_path / "t.csv"
    ids = ["NA" if i == 2500 else "None" if i == 2 else f"{i:03d}" for i in range(3000)]
    rows = ["id,label,x"] + [f"{d},{'ab'[i % 2]},{i}.5" for i, d in enumerate(ids)]
    path.write_text("\n".join(rows) + "\n")
    cfg = SplitConfig(format="csv", path=path, label="label", id="id")
    streamed, whole = load_both(monkeypatch, cfg)
    assert_same(streamed, whole)
    assert streamed.ids == ids


def test_a_type_change_between_chunks_reads_the_file_whole(tmp_path: Path, monkeypatch) -> None:
    """Labels that are numbers in the first chunk and text later: pandas' whole read sees text throughout."""
    monkeypatch.setattr(data, "CHUNK_VALUES", 16)
    path = tmp_path / "t.csv"
    rows = ["id,label,x"] + [f"r{i},{i % 2 if i < 2000 else 'cat'},{i}" for i in range(3000)]
    path.write_text("\n".join(rows) + "\n")
    cfg = SplitConfig(format="csv", path=path, label="label", id="id")
    with pytest.raises(data._Unstreamable):
        data._tabular_streamed(path, cfg, "data.train", None)
    with monkeypatch.context() as m:
        whole_only(m)
        whole = load_split(cfg, "train", "classification")
    assert_same(load_split(cfg, "train", "classification"), whole)
    assert whole.classes == ["0", "1", "cat"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_errors_in_a_late_chunk_are_the_whole_reads(tmp_path: Path, monkeypatch, fmt: str) -> None:
    """A NaN feature in the last chunk, and a text value in a numeric column: the messages name the row ids and
    columns as the whole-frame read does (all bad rows, not just those of one chunk)."""
    monkeypatch.setattr(data, "CHUNK_VALUES", 64)
    df = frame()
    df.loc[[5, 290, 299], "b"] = np.nan
    path = write(df, tmp_path / f"nan.{fmt}", **({"row_group_size": 50} if fmt == "parquet" else {}))
    cfg = SplitConfig(format=fmt, path=path, label="label", id="id", carry=("src", "note"))
    with pytest.raises(DataError) as streamed:
        load_split(cfg, "train", "classification")
    with monkeypatch.context() as m, pytest.raises(DataError) as whole:
        whole_only(m)
        load_split(cfg, "train", "classification")
    assert str(streamed.value) == str(whole.value)
    assert "'r0005', 'r0290', 'r0299'" in str(streamed.value)
    df = frame().astype({"c": str})
    df.loc[250, "c"] = "seven"
    path = write(df, tmp_path / f"text.{fmt}")
    cfg = SplitConfig(format=fmt, path=path, label="label", id="id", carry=("src", "note"))
    with pytest.raises(DataError, match=r"column 'c' is not numeric \(row id 'r0250' has 'seven'\)"):
        load_split(cfg, "train", "classification")


def test_parquet_index_columns_are_not_features(tmp_path: Path, monkeypatch) -> None:
    """A frame saved with its index: pd.read_parquet makes it the index again, so it is not a column here either."""
    df = frame(50).set_index("note")
    path = tmp_path / "indexed.parquet"
    df.to_parquet(path)
    cfg = SplitConfig(format="parquet", path=path, label="label", id="id", group="src")
    streamed, whole = load_both(monkeypatch, cfg)
    assert_same(streamed, whole)
    assert streamed.features == ("a", "b", "c", "d")
