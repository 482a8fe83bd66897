"""data.py: every format loads ids/labels/extra/fingerprint; every error names its key, path or rows."""

from __future__ import annotations

import os
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from influence_cli.config import SplitConfig
from influence_cli.data import Split, load_split, make_loader, validate_labels
from influence_cli.errors import ConfigError, DataError


def write_csv(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def train_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "train.csv", """
        id,a,b,source,note,label
        007,1.0,2.0,web,x,cat
        8,3.0,4.0,lab,y,dog
        9,5.0,6.0,web,z,cat
        10,7.0,8.0,lab,w,bird
    """)


def csv_cfg(path: Path, **kw) -> SplitConfig:
    return SplitConfig(format="csv", path=path, **{"id": "id", **kw})


# ---- csv / parquet


def test_csv_loads_ids_labels_extra_and_features(train_csv: Path) -> None:
    split = load_split(csv_cfg(train_csv, group="source", carry=("note",)), "train", "classification")
    assert split.ids == ["007", "8", "9", "10"] and split.n == 4
    assert split.classes == ["bird", "cat", "dog"]
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == [1, 2, 1, 0]
    assert split.group == "source"
    assert list(split.extra.columns) == ["source", "note"] and list(split.extra.index) == [0, 1, 2, 3]
    assert split.extra["source"].tolist() == ["web", "lab", "web", "lab"]
    x, y = split.dataset[1]
    assert x.dtype == torch.float32 and x.tolist() == [3.0, 4.0] and y == split.labels[1]  # a, b only
    assert split.label_names(split.labels) == ["cat", "dog", "cat", "bird"]


def test_csv_row_index_ids_and_integer_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", "id,f,label\n5,0.5,2\n6,1.5,0\n")
    split = load_split(SplitConfig(path=path), "train", "classification")  # a column named id is not assumed
    assert split.ids == ["0", "1"] and split.classes is None
    assert split.labels.tolist() == [2, 0] and split.dataset[0][0].tolist() == [5.0, 0.5]
    assert split.extra.shape == (2, 0) and split.label_names(torch.tensor([2, 0])) == [2, 0]


def test_test_split_reuses_train_classes(train_csv: Path, tmp_path: Path) -> None:
    train = load_split(csv_cfg(train_csv, features=("a", "b")), "train", "classification")
    test_csv = write_csv(tmp_path / "test.csv", "id,a,b,source,note,label\nt1,1,1,web,q,dog\nt2,2,2,lab,r,dog\n")
    test = load_split(csv_cfg(test_csv, features=("a", "b")), "test", "classification", classes=train.classes)
    assert test.classes == train.classes and test.labels.tolist() == [2, 2]
    write_csv(test_csv, "id,a,b,source,note,label\nt1,1,1,web,q,dog\nt2,2,2,lab,r,fox\n")
    with pytest.raises(DataError, match=r"data\.test.*'fox'.*row id 't2'"):
        load_split(csv_cfg(test_csv, features=("a", "b")), "test", "classification", classes=train.classes)


def test_fingerprint_stable_and_content_sensitive(train_csv: Path, tmp_path: Path) -> None:
    cfg = csv_cfg(train_csv, group="source", carry=("note",))
    first = load_split(cfg, "train", "classification").fingerprint
    assert len(first) == 64 and load_split(cfg, "train", "classification").fingerprint == first
    moved = tmp_path / "moved.csv"
    moved.write_bytes(train_csv.read_bytes())
    assert load_split(csv_cfg(moved, group="source", carry=("note",)), "train", "classification").fingerprint == first
    assert load_split(csv_cfg(train_csv, features=("a",)), "train", "classification").fingerprint != first
    train_csv.write_text(train_csv.read_text().replace("5.0", "5.5"))
    assert load_split(cfg, "train", "classification").fingerprint != first


def test_parquet_matches_csv(train_csv: Path, tmp_path: Path) -> None:
    df = pd.read_csv(train_csv, dtype={"id": str})
    df.to_parquet(tmp_path / "train.parquet")
    cfg = SplitConfig(format="parquet", path=tmp_path / "train.parquet", id="id", carry=("source", "note"))
    split = load_split(cfg, "train", "classification")
    ref = load_split(csv_cfg(train_csv, carry=("source", "note")), "train", "classification")
    assert split.ids == ref.ids and torch.equal(split.labels, ref.labels)
    assert torch.equal(split.dataset.x, ref.dataset.x)
    df.assign(id=[1, 2, 3, 4]).to_parquet(tmp_path / "int_ids.parquet")
    cfg2 = SplitConfig(format="parquet", path=tmp_path / "int_ids.parquet", id="id", carry=("source", "note"))
    assert load_split(cfg2, "train", "classification").ids == ["1", "2", "3", "4"]


@pytest.mark.parametrize(("kw", "key", "name"), [
    ({"label": "lbl"}, "data.train.label", "'lbl'"),
    ({"id": "ident"}, "data.train.id", "'ident'"),
    ({"group": "grp"}, "data.train.group", "'grp'"),
    ({"carry": ("nope",)}, "data.train.carry", "'nope'"),
    ({"features": ("a", "zz")}, "data.train.features", "'zz'"),
])
def test_missing_column_names_key(train_csv: Path, kw: dict, key: str, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: column {name} not found in train\.csv; columns are: id, a, b"):
        load_split(csv_cfg(train_csv, **kw), "train", "classification")


def test_non_numeric_feature_names_column_and_row(train_csv: Path) -> None:
    with pytest.raises(DataError, match=r"column 'note' is not numeric \(row id '007' has 'x'\)") as e:
        load_split(csv_cfg(train_csv, carry=("source",)), "train", "classification")
    assert "carry" in str(e.value)


def test_nan_features_name_up_to_five_rows(tmp_path: Path) -> None:
    rows = "\n".join(f"r{i},{'' if i % 2 == 0 else 1.0},0" for i in range(14))
    path = write_csv(tmp_path / "nan.csv", "id,f,label\n" + rows + "\nlast,inf,1\n")
    with pytest.raises(DataError, match=r"NaN or inf features \(f\) at row ids 'r0', 'r2', 'r4', 'r6', 'r8' and 3 "):
        load_split(csv_cfg(path), "train", "classification")


@pytest.mark.parametrize(("text", "error", "pattern"), [
    ("id,f,label\na,1,0\nb,2,\n", DataError, r"data\.train\.label: missing, NaN or inf label at row ids 'b'"),
    ("id,f,label\na,1,cat\nb,2,\n", DataError, r"data\.train\.label: missing label at row ids 'b'"),
    ("id,f,label\na,1,0\na,2,1\n", DataError, r"data\.train\.id: duplicate ids 'a'"),
    ("id,f,label\n", DataError, r"data\.train: the dataset at .* has no rows"),
    ("id,f,label\na,1,0.5\n", DataError, r"label 0\.5 of row id 'a' is not a whole number"),
    ("id,f,label\n,1,0\n", DataError, r"data\.train\.id: missing id at rows 0"),
])
def test_bad_rows(tmp_path: Path, text: str, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        load_split(csv_cfg(write_csv(tmp_path / "d.csv", text)), "train", "classification")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.test\.path: file not found: .*nope\.csv"):
        load_split(csv_cfg(tmp_path / "nope.csv"), "test", "classification")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=r"data\.train\.path: cannot read .*bad\.parquet as parquet"):
        load_split(SplitConfig(format="parquet", path=tmp_path / "bad.parquet"), "train", "classification")


def test_binary_and_regression_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "b.csv", "f,label,y\n1,yes,0.1\n2,no,1.5\n3,yes,-2\n")
    binary = load_split(SplitConfig(path=path, features=("f",)), "train", "binary")
    assert binary.labels.dtype == torch.float32 and binary.labels.tolist() == [1.0, 0.0, 1.0]
    assert binary.classes == ["no", "yes"] and binary.label_names(binary.labels) == ["yes", "no", "yes"]
    reg = load_split(SplitConfig(path=path, label="y", features=("f",)), "train", "regression")
    assert reg.labels.dtype == torch.float32 and reg.label_names(reg.labels) == [0.1, 1.5, -2.0]
    with pytest.raises(DataError, match=r"task regression needs numbers, row id '0' has 'yes'"):
        load_split(SplitConfig(path=path, features=("f",)), "train", "regression")
    three = write_csv(tmp_path / "c.csv", "f,label\n1,a\n2,b\n3,c\n")
    with pytest.raises(DataError, match="task binary needs 2 classes"):
        load_split(SplitConfig(path=three), "train", "binary")
    numeric = load_split(SplitConfig(path=write_csv(tmp_path / "n.csv", "f,label\n1,1\n2,0\n")), "train", "binary")
    assert numeric.labels.tolist() == [1.0, 0.0] and numeric.label_names(numeric.labels) == [1, 0]


# ---- tensors


def test_tensors_pt_defaults_to_y_and_reads_ids_group(tmp_path: Path) -> None:
    x = torch.randn(5, 1, 4, 4)
    torch.save({"x": x, "y": torch.tensor([0, 1, 2, 1, 0]), "ids": ["a", "b", "c", "d", "e"],
                "src": torch.tensor([1, 1, 2, 2, 3])}, tmp_path / "d.pt")
    split = load_split(SplitConfig(format="tensors", path=tmp_path / "d.pt", id="ids", group="src"),
                       "train", "classification")
    assert split.ids == ["a", "b", "c", "d", "e"] and split.labels.tolist() == [0, 1, 2, 1, 0]
    assert torch.equal(split.dataset[2][0], x[2]) and split.extra["src"].tolist() == [1, 1, 2, 2, 3]
    assert split.fingerprint == load_split(SplitConfig(format="tensors", path=tmp_path / "d.pt", id="ids",
                                                       group="src"), "train", "classification").fingerprint


def test_tensors_npz_regression_matrix_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.ones((3, 2)), target=np.arange(6.0).reshape(3, 2),
             name=np.array(["u", "v", "w"]))
    cfg = SplitConfig(format="tensors", path=tmp_path / "d.npz", x_key="inputs", label="target", id="name")
    split = load_split(cfg, "test", "regression")
    assert split.ids == ["u", "v", "w"] and split.labels.shape == (3, 2) and split.labels.dtype == torch.float32
    assert split.label_names(split.labels)[1] == [2.0, 3.0]


def test_tensors_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.pt"
    torch.save({"x": torch.ones(3, 2), "y": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match=r"data\.train\.x_key: key 'inputs' not found in d\.pt; keys are: x, y"):
        load_split(SplitConfig(format="tensors", path=path, x_key="inputs"), "train", "classification")
    with pytest.raises(ConfigError, match=r"data\.train\.label: key 'lbl' not found"):
        load_split(SplitConfig(format="tensors", path=path, label="lbl"), "train", "classification")
    torch.save({"x": torch.tensor([[1.0], [float("nan")], [2.0]]), "y": torch.zeros(3)}, path)
    with pytest.raises(DataError, match=r"NaN or inf in 'x' at row ids '1'"):
        load_split(SplitConfig(format="tensors", path=path), "train", "classification")
    torch.save({"x": torch.ones(3, 1), "y": torch.zeros(2)}, path)
    with pytest.raises(DataError, match=r"'y' in d\.pt has 2 rows but 'x' has 3"):
        load_split(SplitConfig(format="tensors", path=path), "train", "classification")
    torch.save({"x": torch.ones(0, 2), "y": torch.zeros(0)}, path)
    with pytest.raises(DataError, match="has no rows"):
        load_split(SplitConfig(format="tensors", path=path), "train", "classification")
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"data\.train\.path: cannot read .*d\.pt as a tensors file"):
        load_split(SplitConfig(format="tensors", path=path), "train", "classification")


# ---- imagefolder


def make_images(root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 8)) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, color=(i * 40, 10, 200)).save(root / name / f"img{i}.png")


def test_imagefolder_ids_classes_transforms_fingerprint(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"cat": 2, "dog": 1})
    cfg = SplitConfig(format="imagefolder", path=tmp_path / "train", resize=(6,), grayscale=True,
                      mean=(0.5,), std=(0.5,))
    split = load_split(cfg, "train", "classification")
    assert split.ids == ["cat/img0.png", "cat/img1.png", "dog/img0.png"]
    assert split.classes == ["cat", "dog"] and split.labels.tolist() == [0, 0, 1]
    x, y = split.dataset[2]
    assert x.shape == (1, 6, 6) and x.dtype == torch.float32 and int(y) == 1
    first = split.fingerprint
    assert load_split(cfg, "train", "classification").fingerprint == first
    assert load_split(SplitConfig(format="imagefolder", path=tmp_path / "train"), "train",
                      "classification").fingerprint != first
    Image.new("RGB", (10, 8), color=(1, 2, 3)).save(tmp_path / "train" / "dog" / "img0.png")
    assert load_split(cfg, "train", "classification").fingerprint != first
    batch = next(iter(make_loader(split, 2)))
    assert batch[0].tolist() == [0, 1] and batch[1].shape == (2, 1, 6, 6) and batch[2].tolist() == [0, 0]


def test_imagefolder_test_split_maps_by_class_name(tmp_path: Path) -> None:
    make_images(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_images(tmp_path / "test", {"c": 2})
    train = load_split(SplitConfig(format="imagefolder", path=tmp_path / "train"), "train", "classification")
    test = load_split(SplitConfig(format="imagefolder", path=tmp_path / "test"), "test", "classification",
                      classes=train.classes)
    assert test.labels.tolist() == [2, 2] and test.classes == ["a", "b", "c"]
    make_images(tmp_path / "test", {"zebra": 1})
    with pytest.raises(DataError, match=r"label 'zebra' of row id 'zebra/img0\.png'"):
        load_split(SplitConfig(format="imagefolder", path=tmp_path / "test"), "test", "classification",
                   classes=train.classes)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train\.path: folder not found"):
        load_split(SplitConfig(format="imagefolder", path=tmp_path / "none"), "train", "classification")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.train: no images in"):
        load_split(SplitConfig(format="imagefolder", path=tmp_path / "empty"), "train", "classification")
    with pytest.raises(ConfigError, match=r"data\.train\.group/carry"):
        load_split(SplitConfig(format="imagefolder", path=tmp_path, group="g"), "train", "classification")


# ---- torchvision


def write_fake_mnist(root: Path, n_train: int = 4, n_test: int = 2) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def test_torchvision_fake_local_mnist(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    train = load_split(SplitConfig(format="torchvision", name="MNIST", path=tmp_path), "train", "classification")
    test = load_split(SplitConfig(format="torchvision", name="MNIST", path=tmp_path), "test", "classification",
                      classes=train.classes)
    assert train.n == 4 and test.n == 2 and train.labels.tolist() == [0, 1, 2, 3] and test.labels.tolist() == [0, 1]
    assert train.ids == ["0", "1", "2", "3"] and train.classes is not None and train.classes[0].startswith("0")
    assert train.dataset[1][0].shape == (1, 28, 28) and train.fingerprint != test.fingerprint


def test_torchvision_missing_root_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train\.path: torchvision dataset MNIST .*not found") as e:
        load_split(SplitConfig(format="torchvision", name="MNIST", path=tmp_path), "train", "classification")
    assert "never downloads" in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.test\.name: 'MNSIT' is not a torchvision dataset") as e:
        load_split(SplitConfig(format="torchvision", name="MNSIT", path=tmp_path), "test", "classification")
    assert "MNIST" in (e.value.hint or "")
    with pytest.raises(ConfigError, match=r"data\.train\.split: MNIST has only train and test"):
        load_split(SplitConfig(format="torchvision", name="MNIST", path=tmp_path, split="val"), "train",
                   "classification")


# ---- python


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_infl_data.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        class Points(torch.utils.data.Dataset):
            classes = ["neg", "pos"]

            def __init__(self, n, with_targets=True):
                self.n = n
                self.ids = np.array([f"p{i}" for i in range(n)])  # an array: no truth value
                if with_targets:
                    self.targets = [i % 2 for i in range(n)]

            def __len__(self):
                return self.n

            def __getitem__(self, i):
                return [float(i), 1.0], i % 2

        def make(n=4, with_targets=True):
            return Points(n, with_targets)

        def broken():
            raise ValueError("no data today")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_infl_data"
    sys.modules.pop("my_infl_data", None)


@pytest.mark.parametrize("with_targets", [True, False])
def test_python_dataset(user_module: str, with_targets: bool) -> None:
    cfg = SplitConfig(format="python", function=f"{user_module}:make", kwargs={"n": 5, "with_targets": with_targets})
    split = load_split(cfg, "train", "classification")
    assert split.ids == ["p0", "p1", "p2", "p3", "p4"] and split.labels.tolist() == [0, 1, 0, 1, 0]
    assert split.classes == ["neg", "pos"] and split.label_names(split.labels[:2]) == ["neg", "pos"]
    x, y = split.dataset[3]
    assert x.dtype == torch.float32 and x.tolist() == [3.0, 1.0] and y.dtype == torch.int64
    assert [b[0].tolist() for b in make_loader(split, 2)] == [[0, 1], [2, 3], [4]]


def test_python_errors(user_module: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.train\.function: cannot import 'no_such_mod_xyz'"):
        load_split(SplitConfig(format="python", function="no_such_mod_xyz:f"), "train", "classification")
    with pytest.raises(ConfigError, match=r"data\.train\.function: module 'my_infl_data' has no 'nope'"):
        load_split(SplitConfig(format="python", function=f"{user_module}:nope"), "train", "classification")
    with pytest.raises(ConfigError, match=r"data\.train\.kwargs"):
        load_split(SplitConfig(format="python", function=f"{user_module}:make", kwargs={"size": 3}), "train",
                   "classification")
    with pytest.raises(DataError, match=r"data\.train\.function: my_infl_data:broken raised ValueError: no data"):
        load_split(SplitConfig(format="python", function=f"{user_module}:broken"), "train", "classification")


# ---- validate_labels


def make_split(labels: list, task: str = "classification") -> Split:
    y = torch.tensor(labels, dtype=torch.int64 if task == "classification" else torch.float32)
    x = torch.zeros(len(labels), 2)
    from influence_cli.data import TensorRows

    return Split("train", [str(50 + i) for i in range(len(labels))], y, TensorRows(x, y), "f",
                 pd.DataFrame(index=pd.RangeIndex(len(labels))), task=task)


def test_validate_labels_classification() -> None:
    validate_labels(make_split([0, 9, 3]), "classification", 10)
    with pytest.raises(DataError) as e:
        validate_labels(make_split([0, 12, 3]), "classification", 10)
    assert e.value.message == ("data.train: label 12 of row id '51' is out of range for a model with 10 classes "
                               "(model.kwargs.num_classes)")
    with pytest.raises(DataError, match=r"label 10 of row id '50' \(and row ids '51', '52', '53', '54' and 2 more\)"):
        validate_labels(make_split([10, 11, 12, 13, 14, -1, 15, 0]), "classification", 10)


def test_validate_labels_binary_and_regression() -> None:
    validate_labels(make_split([0, 1, 1], "binary"), "binary", 1)
    with pytest.raises(DataError, match="needs a model with 1 output"):
        validate_labels(make_split([0, 1], "binary"), "binary", 2)
    with pytest.raises(DataError, match=r"label 2 of row id '51' is not 0 or 1"):
        validate_labels(make_split([0, 2], "binary"), "binary", 1)
    validate_labels(make_split([0.5, 1.5], "regression"), "regression", 1)
    wide = make_split([[0.5, 1.0], [1.5, 2.0]], "regression")
    validate_labels(wide, "regression", 2)
    with pytest.raises(DataError, match="labels have width 2 but the model has 1 outputs"):
        validate_labels(wide, "regression", 1)


# ---- loaders


def test_loader_row_order_and_shuffle_cover_every_row_once(tmp_path: Path) -> None:
    n = 1003
    torch.save({"x": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3), "y": torch.arange(n) % 7},
               tmp_path / "d.pt")
    split = load_split(SplitConfig(format="tensors", path=tmp_path / "d.pt"), "train", "classification")
    batches = list(make_loader(split, 100))
    assert len(batches) == 11 and batches[-1][0].shape == (3,)
    rows = torch.cat([b[0] for b in batches])
    assert rows.dtype == torch.int64 and rows.tolist() == list(range(n))
    for idx, x, y in batches:
        assert torch.equal(x, split.dataset.x[idx]) and torch.equal(y, split.labels[idx])
    shuffled = lambda seed: torch.cat([b[0] for b in make_loader(  # noqa: E731
        split, 64, shuffle=True, generator=torch.Generator().manual_seed(seed))])
    assert sorted(shuffled(0).tolist()) == list(range(n)) and shuffled(0).tolist() != list(range(n))
    assert torch.equal(shuffled(1), shuffled(1))


def test_loader_streams_100k_rows_without_per_row_work(tmp_path: Path, monkeypatch) -> None:
    """In-memory rows come out a batch at a time: no per-row __getitem__ (what made 100k rows slow)."""
    n = 100_000
    y = torch.randint(0, 10, (n,))
    split = make_split(y.tolist())
    rows = type(split.dataset)(torch.randn(n, 64), split.labels)
    split = Split("train", split.ids, split.labels, rows, "f", split.extra)

    def per_row(*_a, **_k):
        raise AssertionError("a row was read on its own")

    monkeypatch.setattr(type(rows), "__getitem__", per_row)
    batches = list(make_loader(split, 256))
    assert sum(len(idx) for idx, _, _ in batches) == n and len(batches) == -(-n // 256)
    assert batches[1][1].data_ptr() == rows.x[256].data_ptr()  # a view of the split's tensor, not a copy


def test_config_keys_for_wrong_format(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2, 1), "y": torch.zeros(2)}, tmp_path / "d.pt")
    with pytest.raises(ConfigError, match=r"data\.train\.features: only csv and parquet"):
        load_split(SplitConfig(format="tensors", path=tmp_path / "d.pt", features=("a",)), "train", "classification")
    with pytest.raises(ConfigError, match="task: expected one of"):
        load_split(SplitConfig(format="tensors", path=tmp_path / "d.pt"), "train", "ranking")
    assert os.listdir(tmp_path) == ["d.pt"]


# ---- issue 14: features by name, ids verbatim


def test_test_columns_taken_by_train_feature_names(train_csv: Path, tmp_path: Path) -> None:
    train = load_split(csv_cfg(train_csv, carry=("source", "note")), "train", "classification")
    assert train.features == ("a", "b")
    test_csv = write_csv(tmp_path / "test.csv", "label,b,note,id,source,a\ncat,20,q,t1,web,10\n")
    test = load_split(csv_cfg(test_csv, carry=("source", "note")), "test", "classification",
                      classes=train.classes, features=train.features)
    assert test.dataset[0][0].tolist() == [10.0, 20.0] and test.features == ("a", "b")


def test_test_split_lacking_a_feature_is_data_error(train_csv: Path, tmp_path: Path) -> None:
    train = load_split(csv_cfg(train_csv, carry=("source", "note")), "train", "classification")
    test_csv = write_csv(tmp_path / "test.csv", "id,a,source,note,label\nt1,1,web,q,cat\n")
    with pytest.raises(DataError, match=r"data\.test: .*test\.csv lacks the feature column 'b'"):
        load_split(csv_cfg(test_csv, carry=("source", "note")), "test", "classification", classes=train.classes,
                   features=train.features)


def test_test_split_with_an_untrained_feature_is_data_error(train_csv: Path, tmp_path: Path) -> None:
    train = load_split(csv_cfg(train_csv, carry=("source", "note")), "train", "classification")
    test_csv = write_csv(tmp_path / "test.csv", "id,a,b,c,source,note,label\nt1,1,2,3,web,q,cat\n")
    with pytest.raises(DataError, match=r"data\.test: column 'c' in test\.csv .*not one of the train split's"):
        load_split(csv_cfg(test_csv, carry=("source", "note")), "test", "classification", classes=train.classes,
                   features=train.features)
    with pytest.raises(ConfigError, match=r"data\.test\.features: .*'a'.*train split's features"):
        load_split(csv_cfg(test_csv, features=("a", "c")), "test", "classification", classes=train.classes,
                   features=train.features)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ids_are_read_verbatim(tmp_path: Path, fmt: str) -> None:
    text = "id,f,label\nNA,1,0\nnull,2,1\nNone,3,0\nnan,4,1\n007,5,0\n"
    path = write_csv(tmp_path / "d.csv", text)
    if fmt == "parquet":
        pd.read_csv(path, dtype=str, keep_default_na=False).assign(f=[1, 2, 3, 4, 5], label=[0, 1, 0, 1, 0]).to_parquet(
            path := tmp_path / "d.parquet")
    split = load_split(SplitConfig(format=fmt, path=path, id="id"), "train", "classification")
    assert split.ids == ["NA", "null", "None", "nan", "007"]
    empty = write_csv(tmp_path / "e.csv", "id,f,label\n,1,0\nx,NA,1\n")
    with pytest.raises(DataError, match=r"data\.train\.id: missing id at rows 0"):
        load_split(csv_cfg(empty), "train", "classification")
    with pytest.raises(DataError, match=r"missing, NaN or inf features \(f\) at row ids"):
        load_split(csv_cfg(write_csv(tmp_path / "f.csv", "id,f,label\ny,1,0\nx,NA,1\n")), "train", "classification")


def test_fingerprint_ignores_group_and_carry(train_csv: Path, tmp_path: Path) -> None:
    """Issue 9.5: what the math reads (features, labels, ids, transforms), not metadata columns."""
    numeric = write_csv(tmp_path / "n.csv", "id,a,b,source,note,label\n1,1,2,7,x,0\n2,3,4,8,y,1\n")
    plain = load_split(csv_cfg(numeric, features=("a", "b")), "train", "classification").fingerprint
    for kw in ({"carry": ("source",), "features": ("a", "b")}, {"group": "source", "carry": ("note",)},
               {"carry": ("source", "note")}):
        assert load_split(csv_cfg(numeric, **kw), "train", "classification").fingerprint == plain, kw
    write_csv(numeric, "id,a,b,source,note,label\n1,1,2,9,changed,0\n2,3,4,8,y,1\n")  # metadata only
    assert load_split(csv_cfg(numeric, carry=("source", "note")), "train", "classification").fingerprint == plain
    write_csv(numeric, "id,a,b,source,note,label\n1,1,2.5,9,changed,0\n2,3,4,8,y,1\n")  # a feature value
    assert load_split(csv_cfg(numeric, carry=("source", "note")), "train", "classification").fingerprint != plain
    write_csv(numeric, "id,a,b,source,note,label\n1,1,2,7,x,1\n2,3,4,8,y,1\n")  # a label
    assert load_split(csv_cfg(numeric, carry=("source", "note")), "train", "classification").fingerprint != plain
    write_csv(numeric, "id,a,b,source,note,label\nz,1,2,7,x,0\n2,3,4,8,y,1\n")  # an id
    assert load_split(csv_cfg(numeric, carry=("source", "note")), "train", "classification").fingerprint != plain


def test_tensors_fingerprint_ignores_group_and_carry(tmp_path: Path) -> None:
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    torch.save({"x": x, "y": y, "src": torch.tensor([1, 2, 3])}, tmp_path / "a.pt")
    torch.save({"x": x, "y": y, "src": torch.tensor([9, 9, 9])}, tmp_path / "b.pt")
    first = load_split(SplitConfig(format="tensors", path=tmp_path / "a.pt"), "train", "classification").fingerprint
    for name in ("a.pt", "b.pt"):
        cfg = SplitConfig(format="tensors", path=tmp_path / name, group="src")
        assert load_split(cfg, "train", "classification").fingerprint == first
    torch.save({"x": x + 1, "y": y}, tmp_path / "c.pt")
    assert load_split(SplitConfig(format="tensors", path=tmp_path / "c.pt"), "train",
                      "classification").fingerprint != first


def test_corrupt_image_is_data_error_naming_the_file(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    split = load_split(SplitConfig(format="imagefolder", path=tmp_path / "imgs"), "train", "classification")
    with pytest.raises(DataError, match=r"data\.train: cannot read image .*b/broken\.png \(row id 'b/broken\.png'"):
        list(make_loader(split, 2))


def test_values_beyond_float32_are_named_not_called_inf(tmp_path: Path) -> None:
    """Found by tests/test_hostile_property.py: 1e300 became inf in float32 (a regression label silently)."""
    path = write_csv(tmp_path / "big.csv", "id,f,label\na,1e300,0.5\nb,1,1\n")
    with pytest.raises(DataError, match=r"features of row id 'a' \(f\) are beyond float32's range"):
        load_split(csv_cfg(path), "train", "regression")
    path = write_csv(tmp_path / "big.csv", "id,f,label\na,1,1e300\nb,1,1\n")
    with pytest.raises(DataError, match=r"data\.train\.label: labels beyond float32's range .* row ids 'a'"):
        load_split(csv_cfg(path), "train", "regression")
