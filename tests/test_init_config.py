"""`infl init`: the inferred config loads, its model fits the data (a forward pass on a real batch), paths are
relative to the config file, and bad inputs are errors that name the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from influence_cli import models
from influence_cli.config import load_config
from influence_cli.data import load_split, validate_labels
from influence_cli.errors import ConfigError, DataError
from influence_cli.init_config import BUILTIN_ARCHS, infer_config, write_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {  # data -> (format, in_features, num_classes, task)
    "digits/train.csv": ("csv", 64, 10, "classification"),
    "breast_cancer/train.csv": ("csv", 30, 1, "binary"),
    "wine/train.parquet": ("parquet", 13, 3, "classification"),
    "digits_images/train": ("imagefolder", None, 10, "classification"),
    "digits_tensors/train.npz": ("tensors", 64, 10, "classification"),
}


def write(tmp_path: Path, data: Path, **kwargs) -> Path:
    path = tmp_path / "conf" / "infl.yaml"
    write_config(path, infer_config(data, config_path=path, **kwargs))
    return path


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_data_gives_a_config_that_loads_and_fits_the_data(tmp_path, name):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    fmt, in_features, num_classes, task = SAMPLES[name]
    data = ROOT / "sample_data" / name
    path = write(tmp_path, data)
    cfg = load_config(path, [])
    assert cfg.data.train.format == fmt and cfg.task == task
    assert cfg.data.train.path == data.resolve()
    assert cfg.data.test is not None and cfg.data.test.path == (data.parent / data.name.replace("train", "test"))
    assert cfg.model.kwargs["num_classes"] == num_classes
    if in_features is not None:
        assert cfg.model.kwargs["in_features"] == in_features
    else:  # the 8x8 PNGs, resized for the cnn
        assert cfg.model.arch == "cnn" and cfg.model.kwargs["in_channels"] == 1
        assert cfg.model.kwargs["image_size"] == 16 and cfg.data.train.resize == (16,) and cfg.data.train.grayscale
    split = load_split(cfg.data.train, "train", cfg.task)
    model = models.build_model(cfg.model)
    validate_labels(split, cfg.task, num_classes)
    x = torch.stack([split.dataset[i][0] for i in range(4)])
    assert model(x).shape == (4, num_classes)
    assert load_split(cfg.data.test, "test", cfg.task, split.classes).n > 0


def test_paths_are_written_relative_to_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "sample_data/digits/train.csv", tmp_path / "data/train.csv")
    text = infer_config(tmp_path / "data/train.csv", config_path=tmp_path / "configs/infl.yaml")
    raw = yaml.safe_load(text)
    assert raw["data"]["train"]["path"] == "../data/train.csv"
    assert raw["model"]["checkpoint"] == "../data/logreg.pt"
    assert "test" not in raw["data"]  # no test.csv beside it: left as a comment
    assert not [line for line in text.splitlines() if str(tmp_path) in line and not line.startswith("#")]


def test_text_labels_columns_and_carry(tmp_path):
    df = pd.DataFrame({"ID": [f"r{i}" for i in range(30)], "a": np.arange(30.0), "b": np.ones(30),
                       "note": ["x"] * 30, "species": ["cat", "dog", "eel"] * 10})
    df.to_csv(tmp_path / "animals.csv", index=False)
    raw = yaml.safe_load(infer_config(tmp_path / "animals.csv", config_path=tmp_path / "infl.yaml", model="mlp"))
    train = raw["data"]["train"]
    assert train["id"] == "ID" and train["label"] == "species" and train["carry"] == ["note"]  # last column as label
    assert raw["model"]["kwargs"]["in_features"] == 2 and raw["model"]["kwargs"]["num_classes"] == 3
    assert raw["task"] == "classification" and raw["model"]["arch"] == "mlp"
    load_config(write(tmp_path, tmp_path / "animals.csv", model="mlp"), [])


def test_two_text_classes_are_binary_with_one_logit(tmp_path):
    pd.DataFrame({"x": np.arange(10.0), "label": ["no", "yes"] * 5}).to_csv(tmp_path / "d.csv", index=False)
    path = write(tmp_path, tmp_path / "d.csv")
    cfg = load_config(path, [])
    assert cfg.task == "binary" and cfg.model.kwargs["num_classes"] == 1
    assert load_split(cfg.data.train, "train", cfg.task).labels.tolist() == [0.0, 1.0] * 5


def test_real_valued_labels_are_regression(tmp_path):
    rng = np.random.default_rng(0)
    pd.DataFrame({"f0": rng.normal(size=80), "f1": rng.normal(size=80), "target": rng.normal(size=80)}
                 ).to_csv(tmp_path / "r.csv", index=False)
    cfg = load_config(write(tmp_path, tmp_path / "r.csv"), [])
    assert cfg.task == "regression" and cfg.model.kwargs == {"in_features": 2, "num_classes": 1}


def test_rgb_images_of_different_sizes_are_resized(tmp_path):
    from PIL import Image

    for k, (name, size) in enumerate([("cat", (20, 24)), ("dog", (30, 30))]):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", size, (k * 100, 0, 0)).save(tmp_path / "train" / name / "a.png")
    cfg = load_config(write(tmp_path, tmp_path / "train", model="resnet18"), [])
    assert cfg.task == "binary" and cfg.model.kwargs == {"num_classes": 1, "in_channels": 3}
    assert cfg.data.train.resize == (24, 20) and not cfg.data.train.grayscale


def test_write_config_never_overwrites_without_force(tmp_path):
    path = tmp_path / "infl.yaml"
    path.write_text("old")
    with pytest.raises(ConfigError, match="already exists") as caught:
        write_config(path, "seed: 1\n")
    assert str(path) in caught.value.message and "--force" in caught.value.hint
    assert path.read_text() == "old"
    write_config(path, "seed: 1\n", force=True)
    assert path.read_text() == "seed: 1\n"


def make(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("setup", "kwargs", "error", "match"), [
    (lambda p: p / "missing.csv", {}, ConfigError, "missing.csv: no such file"),
    (lambda p: make(p / "x.json", "{}"), {}, ConfigError, r"x.json: cannot tell the format"),
    (lambda p: (p / "empty").mkdir() or p / "empty", {}, ConfigError, "no class sub-folders"),
    (lambda p: make(p / "e.csv", ""), {}, DataError, "e.csv: the file is empty"),
    (lambda p: make(p / "one.csv", "x,label\n1,0\n2,0\n"), {}, DataError, "single value"),
    (lambda p: make(p / "t.csv", "x,label\n1,0\n2,1\n"), {"model": "cnn"}, ConfigError,
     "not images"),
    (lambda p: make(p / "t.csv", "x,label\n1,0\n2,1\n"), {"model": "mpl"}, ConfigError,
     "not a built-in"),
])
def test_bad_inputs_name_the_file(tmp_path, setup, kwargs, error, match):
    with pytest.raises(error, match=match):
        infer_config(setup(tmp_path), config_path=tmp_path / "infl.yaml", **kwargs)


def test_builtin_archs_match_the_registry():
    assert tuple(models.ARCHS) == BUILTIN_ARCHS
