"""`infl init` on text data: free-text columns are found (short categorical strings are not), `--model DIR` (a
local Hugging Face folder) makes an `arch: hf` config that `infl check` accepts, and without the folder, or
with a folder that is not one, init exits 2 and writes nothing. Only the tests that load the model need
transformers; detection and the errors run without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_cli as run

from influence_cli import init_text
from influence_cli.config import load_config
from influence_cli.errors import ConfigError, DataError
from influence_cli.init_config import infer_config, write_config

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ROOT / "sample_data" / "text_topics"
WORDS = "the a battery soup match team laptop fresh score goal slow quick screen".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 9)))) + f" {i}" for i in range(n)]


def folder(path: Path, num_labels: int | None = None, **extra) -> Path:
    """A stand-in save_pretrained folder: config.json and an (empty) safetensors file, enough for init."""
    path.mkdir(parents=True)
    config = {"model_type": "bert", "max_position_embeddings": 64, **extra}
    if num_labels is not None:
        config["num_labels"] = num_labels
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")
    return path


def infer(data: Path, model: str | None = None, tmp: Path | None = None) -> dict:
    return yaml.safe_load(infer_config(data, model=model, config_path=(tmp or data.parent) / "infl.yaml"))


# ---- detection


@pytest.mark.parametrize(("values", "text"), [
    (sentences(40), True),
    (["a long review of the product, which broke " + str(i) for i in range(40)], True),  # long: words and characters
    (["cat", "dog", "eel", "fox"] * 10, False),  # short categories
    (["New York", "Los Angeles", "San Francisco Bay"] * 14, False),  # spaces, but few distinct values
    ([f"Ada Lovelace{i}" for i in range(40)], False),  # names: two short words
    ([f"3f2a9c1e-77b0-4d5e-9a61-{i:012d}" for i in range(40)], False),  # ids: long, no spaces
    ([f"https://example.com/items/{i}/page" for i in range(40)], False),
    (list(range(40)), False),
])
def test_free_text_is_many_distinct_rows_of_several_words(values, text):
    assert init_text.is_free_text(pd.Series(values)) is text


def test_sample_text_column_is_found_and_the_label_column_is_not():
    df = pd.read_csv(TOPICS / "train.csv")
    assert init_text.text_columns(df, ["text", "true_label"]) == ["text"]


def test_short_categorical_strings_alone_are_not_text(tmp_path):
    pd.DataFrame({"id": range(30), "city": ["New York", "Paris", "Rome"] * 10, "label": [0, 1] * 15}
                 ).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="no numeric feature columns besides id 'id' and label 'label'"):
        infer(tmp_path / "d.csv")
    with pytest.raises(ConfigError, match="has no free-text column .columns besides the id and the label: 'city'"):
        infer(tmp_path / "d.csv", str(folder(tmp_path / "m")))


def test_text_beside_numeric_features_stays_tabular_and_is_carried(tmp_path):
    pd.DataFrame({"x": np.arange(30.0), "review": sentences(30), "label": [0, 1] * 15}
                 ).to_csv(tmp_path / "d.csv", index=False)
    text = infer_config(tmp_path / "d.csv", config_path=tmp_path / "infl.yaml")
    raw = yaml.safe_load(text)
    assert raw["model"]["arch"] == "logreg" and raw["data"]["train"]["carry"] == ["review"]
    assert "'review' looks like free text" in text and "--model DIR" in text


def test_unnamed_label_is_the_last_column_that_is_not_text(tmp_path):
    pd.DataFrame({"sentiment": ["pos", "neg"] * 15, "review": sentences(30)}).to_csv(tmp_path / "d.csv", index=False)
    text = infer_config(tmp_path / "d.csv", model=str(folder(tmp_path / "m", 1)), config_path=tmp_path / "infl.yaml")
    raw = yaml.safe_load(text)
    assert raw["data"]["train"]["label"] == "sentiment" and raw["data"]["train"]["text"] == "review"
    assert "took the last column that is not free text, 'sentiment'" in text and raw["task"] == "binary"


# ---- the config, without loading the model


def test_sample_with_its_folder_gives_an_hf_config(tmp_path):
    config = tmp_path / "conf" / "infl.yaml"
    text = infer_config(TOPICS / "train.csv", model=str(TOPICS / "model"), config_path=config)
    raw = yaml.safe_load(text)
    assert raw["model"]["arch"] == "hf" and "kwargs" not in raw["model"]
    assert (config.parent / raw["model"]["path"]).resolve() == TOPICS / "model"
    assert (config.parent / raw["model"]["checkpoint"]).resolve() == TOPICS / "head.pt"
    assert raw["params"] == "last_layer" and raw["solver"]["name"] == "ekfac" and raw["task"] == "classification"
    for role in ("train", "test"):
        split = raw["data"][role]
        assert split["text"] == "text" and split["label"] == "label" and split["id"] == "id"
        assert split["carry"] == ["true_label"] and "max_length" not in split
    assert "# max_length: 64" in text  # the default, as a comment: the model has 64 positions
    cfg = load_config(write_config(config, text), [])  # loads without transformers: nothing is tokenized yet
    assert cfg.data.train.text == ("text",) and cfg.data.test.text == ("text",)
    assert cfg.data.train.tokenizer == TOPICS / "model"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_two_text_columns_are_a_pair(tmp_path, suffix):
    frame = pd.DataFrame({"premise": sentences(30, 1), "hypothesis": sentences(30, 2), "tag": ["a"] * 30,
                          "label": [0, 1, 2] * 10})
    if suffix == "parquet":
        pytest.importorskip("pyarrow")
        frame.to_parquet(tmp_path / "pairs.parquet")
    else:
        frame.to_csv(tmp_path / "pairs.csv", index=False)
    raw = infer(tmp_path / f"pairs.{suffix}", str(folder(tmp_path / "m", 3)))
    train = raw["data"]["train"]
    assert train["text"] == ["premise", "hypothesis"] and train["carry"] == ["tag"]


@pytest.mark.parametrize(("num_labels", "task"), [(1, "binary"), (2, "classification"), (None, "classification")])
def test_two_classes_follow_the_folders_head(tmp_path, num_labels, task):
    pd.DataFrame({"text": sentences(20), "label": ["no", "yes"] * 10}).to_csv(tmp_path / "d.csv", index=False)
    assert infer(tmp_path / "d.csv", str(folder(tmp_path / "m", num_labels)))["task"] == task


def test_id2label_in_another_order_is_noted(tmp_path):
    pd.DataFrame({"text": sentences(30), "label": ["a", "b", "c"] * 10}).to_csv(tmp_path / "d.csv", index=False)
    model = folder(tmp_path / "m", 3, id2label={"0": "c", "1": "a", "2": "b"})
    assert "id2label orders the classes c, a, b" in infer_config(tmp_path / "d.csv", model=str(model),
                                                                 config_path=tmp_path / "infl.yaml")


# ---- errors: exit 2, nothing written


def test_text_without_model_exits_2_and_writes_nothing(capsys, tmp_path):
    config = tmp_path / "infl.yaml"
    code, _, err = run(capsys, "init", str(TOPICS / "train.csv"), "-c", str(config))
    assert code == 2 and "needs --model PATH" in err and "Hugging Face folder" in err and "config.json" in err
    assert not config.exists()
    code, _, err = run(capsys, "init", str(TOPICS / "train.csv"), "--model", "logreg", "-c", str(config))
    assert code == 2 and "--model logreg reads numeric features" in err and not config.exists()


def test_folder_without_config_json_exits_2_naming_it(capsys, tmp_path):
    (tmp_path / "weights").mkdir()
    config = tmp_path / "infl.yaml"
    code, _, err = run(capsys, "init", str(TOPICS / "train.csv"), "--model", str(tmp_path / "weights"),
                       "-c", str(config))
    assert code == 2 and f"{tmp_path / 'weights'}: the folder has no config.json" in err and not config.exists()


@pytest.mark.parametrize(("setup", "match"), [
    (lambda p: str(p / "nowhere/model"), "no such folder"),
    (lambda p: str(folder(p / "m", 3) / "config.json"), "a file, not a local Hugging Face folder"),
    (lambda p: (folder(p / "m", 3) / "model.safetensors").unlink() or str(p / "m"), "no .safetensors weights"),
    (lambda p: str(folder(p / "m", 2)), "num_labels 2, but the labels have 3 classes"),
])
def test_bad_folders_name_themselves(tmp_path, setup, match):
    with pytest.raises(ConfigError, match=match):
        infer(TOPICS / "train.csv", setup(tmp_path), tmp_path)


def test_folder_for_image_or_tensor_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reads text columns of csv or parquet data; .* is tensors data"):
        infer(ROOT / "sample_data/digits_tensors/train.npz", str(folder(tmp_path / "m", 10)), tmp_path)


def test_max_tokens_matches_hf():
    from influence_cli import hf

    assert init_text.MAX_TOKENS == hf.MAX_TOKENS


# ---- with the model (transformers)


def test_init_then_check_passes_on_the_sample(capsys, tmp_path):
    pytest.importorskip("transformers")
    shutil.copytree(TOPICS, tmp_path / "text_topics")
    config = tmp_path / "infl.yaml"
    code, _, err = run(capsys, "init", str(tmp_path / "text_topics/train.csv"), "--model",
                       str(tmp_path / "text_topics/model"), "-c", str(config))
    assert code == 0, err
    raw = yaml.safe_load(config.read_text())
    assert raw["data"]["train"]["text"] == "text" and raw["model"]["arch"] == "hf"
    code, _, err = run(capsys, "check", "-c", str(config), "--quiet")
    assert code == 0, err


def test_without_a_checkpoint_train_writes_it(capsys, tmp_path):
    pytest.importorskip("transformers")
    shutil.copytree(TOPICS / "model", tmp_path / "model")
    pd.read_csv(TOPICS / "train.csv").head(150).to_csv(tmp_path / "train.csv", index=False)
    config = tmp_path / "infl.yaml"
    assert run(capsys, "init", str(tmp_path / "train.csv"), "--model", str(tmp_path / "model"), "-c", str(config)
               )[0] == 0
    assert "not there yet: `infl train` writes it" in config.read_text()
    code, _, err = run(capsys, "check", "-c", str(config), "--quiet")
    assert code == 2 and "head.pt not found; run `infl train" in err
    code, _, err = run(capsys, "train", "-c", str(config), "--quiet")
    assert code == 0 and (tmp_path / "head.pt").is_file(), err
    code, _, err = run(capsys, "check", "-c", str(config), "--quiet")
    assert code == 0, err
