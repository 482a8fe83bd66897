"""Text data for `infl init`: which csv/parquet columns hold free text, and the Hugging Face folder that reads it.

A column is free text when its values are strings, many of them distinct (at least a fifth of the rows), and
most rows hold two words or more, with 20 characters or 3 words a row on average: sentences, reviews, titles.
Not short categories ("New York" repeats), names ("Ada Lovelace": two short words), ids, hashes or URLs (no
spaces). Two such columns are a sentence pair (`text: [A, B]`); of three or more the first is the text and the
others are carried into the reports.

Text needs `--model DIR`, a local save_pretrained folder. Its config.json, read as JSON (no transformers or
torch here), gives the head's outputs (num_labels) and the position embeddings. The config gets `model.arch:
hf`, `params: last_layer`, `solver: ekfac` and `model.checkpoint: head.pt` beside the data, which `infl train`
writes (the head polished on the frozen body's features) when it is not there yet.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError
from .init_yaml import COMMENT_COLUMN, Inferred, kv

MIN_DISTINCT = 0.2  # share of the rows with distinct values, at least
MIN_CHARS, MIN_WORDS = 20, 3  # mean characters, or mean words, of a row, at least one of the two
MAX_TOKENS = 512  # hf.MAX_TOKENS: the default max_length cap (a test keeps the two equal)
FOLDER_HINT = "a local Hugging Face folder (save_pretrained: config.json, model.safetensors, tokenizer)"
_DEFAULT_NAME = re.compile(r"LABEL_\d+")


@dataclass(frozen=True)
class Folder:
    """A save_pretrained folder as its config.json describes it."""

    path: Path
    num_labels: int
    positions: int | None  # max_position_embeddings
    labels: list[str] | None  # id2label's names in id order, unless they are transformers' LABEL_0, LABEL_1, ...


def is_free_text(column: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return False
    values = column.dropna()
    if values.empty or not values.map(lambda v: isinstance(v, str)).all():
        return False
    if values.nunique() < max(2, MIN_DISTINCT * len(values)):
        return False
    words = values.str.count(r"\S+")
    return bool((words >= 2).mean() >= 0.5 and (values.str.len().mean() >= MIN_CHARS or words.mean() >= MIN_WORDS))


def text_columns(df: pd.DataFrame, names: list[str]) -> list[str]:
    """The columns of `names` that hold free text, in the file's order."""
    return [c for c in names if is_free_text(df[c])]


def model_folder(model: str | None, builtins: tuple[str, ...]) -> Folder | None:
    """The --model folder when `model` names a path (a folder, or anything with a slash); None for an arch."""
    if model is None or model in builtins or not ("/" in model or os.sep in model or Path(model).is_dir()):
        return None
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model}: {'a file' if path.exists() else 'no such folder'}, not {FOLDER_HINT}",
                          hint="pass the folder itself, or a built-in arch: logreg, mlp, cnn, resnet18")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"--model {path}: the folder has no config.json, so it is not a Hugging Face folder",
                          hint="save the model there with model.save_pretrained(DIR) and the tokenizer with "
                               "tokenizer.save_pretrained(DIR)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"--model {path}: no .safetensors weights (infl never loads a pickled .bin)",
                          hint="resave with model.save_pretrained(DIR, safe_serialization=True)")
    try:
        facts = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--model {path}: cannot read {config} as JSON ({e})", hint="resave the model") from None
    if not isinstance(facts, dict):
        raise ConfigError(f"--model {path}: {config} holds a {type(facts).__name__}, not a JSON object")
    id2label = facts.get("id2label") if isinstance(facts.get("id2label"), dict) else {}
    given = facts.get("num_labels")
    num_labels = given if isinstance(given, int) and given > 0 else len(id2label) or 2  # transformers' default: 2
    names = [str(id2label.get(str(i), "")) for i in range(len(id2label))]
    named = bool(names) and not all(_DEFAULT_NAME.fullmatch(n) for n in names)
    positions = facts.get("max_position_embeddings")
    return Folder(path, int(num_labels), positions if isinstance(positions, int) and positions > 0 else None,
                  names if named else None)


def apply(train: Inferred, data: Path, folder: Folder | None, model: str | None) -> bool:
    """Make `train` a text split when the config is for text (returns True): with --model DIR, or for data
    whose only inputs are free text, which then needs --model DIR (ConfigError, exit 2). csv/parquet data with
    neither numeric features nor free text is a DataError."""
    fmt = train.split["format"]
    if folder is not None and fmt not in ("csv", "parquet"):
        raise ConfigError(f"--model {folder.path}: a Hugging Face folder reads text columns of csv or parquet "
                          f"data; {data} is {fmt} data", hint="use a built-in arch: logreg, mlp, cnn, resnet18")
    shown = ", ".join(map(repr, train.text))
    if fmt in ("csv", "parquet") and not train.in_features and not train.text and folder is None:
        split = train.split
        raise DataError(f"{split['path']}: no numeric feature columns besides id {split['id']!r} and label "
                        f"{split['label']!r}", hint="infl reads numeric features, or free text (sentences) with "
                                                    "--model DIR, a local Hugging Face folder")
    if folder is None:
        if not train.text:
            return False
        if train.in_features:
            train.notes.append(f"{shown} look{'s' if len(train.text) == 1 else ''} like free text: carried into the "
                               "reports; for a text classifier pass --model DIR, a local Hugging Face folder")
            return False
        given = f" (--model {model} reads numeric features)" if model else ""
        columns = f"column{'s' if len(train.text) > 1 else ''} {shown}"
        raise ConfigError(f"{data}: the input is free text ({columns}), which needs --model PATH, {FOLDER_HINT}"
                          f"{given}; nothing written", hint=f"infl init {data} --model PATH/TO/FOLDER")
    if not train.text:
        others = ", ".join(map(repr, train.columns)) or "none"
        raise ConfigError(f"--model {folder.path}: {data} has no free-text column (columns besides the id and the "
                          f"label: {others})", hint="text columns hold sentences: many distinct values of several "
                                                    "words; or write text: COLUMN into the config by hand")
    text = train.text[:2] if len(train.text) == 2 else train.text[:1]
    if len(train.text) > 2:
        train.notes.append(f"{shown} all look like free text: {text[0]!r} is the text, the others are carried; for "
                           "a sentence pair set text: [A, B]")
    split = train.split
    train.split = {"format": fmt, "path": split["path"], "text": text[0] if len(text) == 1 else text,
                   "label": split["label"], "id": split["id"], "carry": [c for c in train.columns if c not in text]}
    train.notes.append("model.arch hf needs the extra: pip install -e '.[hf]' (transformers >= 5)")
    return True


def fit_task(task: str, outputs: int, note: str, folder: Folder, labels: np.ndarray | None) -> tuple[str, int, str]:
    """(task, outputs, note) for the folder's head: its num_labels outputs must cover the labels."""
    n, where = folder.num_labels, f"--model {folder.path}: config.json has num_labels {folder.num_labels}"
    hint = (f"save a model with that many outputs there: AutoModelForSequenceClassification.from_pretrained(..., "
            f"num_labels={outputs}).save_pretrained(DIR)")
    if task == "regression":
        if n != outputs:
            raise ConfigError(f"{where}, but the labels have width {outputs}", hint=hint)
        return task, n, note
    if task == "binary" and n == 1:
        return task, 1, note
    if task == "binary":
        task, note = "classification", f"{note}; the folder's head has {n} outputs, so task classification"
    elif n < outputs:
        raise ConfigError(f"{where}, but the labels have {outputs} classes", hint=hint)
    elif n > outputs:
        note += f"; the folder's head has {n} outputs, {n - outputs} of them never a label"
    ours = sorted({str(v) for v in labels}) if labels is not None and labels.dtype.kind not in "biuf" else None
    if folder.labels and ours and set(folder.labels) == set(ours) and folder.labels != ours:
        note += (f"; config.json's id2label orders the classes {', '.join(folder.labels)}, infl numbers them in "
                 "sorted order: `infl train` fits the head to infl's")
    return task, n, note


def model_block(folder: Folder, task: str, path: str, checkpoint: str, exists: bool) -> list[str]:
    """task:, model: (arch hf), params: and weight_decay: for the folder."""
    return [kv("task", task, "classification | binary (one logit) | regression (MSE)"),
            "model:",
            kv("arch", "hf", "a Hugging Face sequence classifier, loaded offline (never from a hub)", 1),
            kv("path", path, f"a save_pretrained folder; its head has {folder.num_labels} output"
                             f"{'s' if folder.num_labels != 1 else ''} (num_labels)", 1),
            kv("checkpoint", checkpoint, "the head `infl train` fits; " + (
                "it exists: check that it was trained on this data and folder" if exists else
                "not there yet: `infl train` writes it (without this line the folder's own weights are audited)"), 1),
            kv("params", "last_layer", "the classification head; {last_blocks: 1} adds the last transformer block"),
            kv("weight_decay", 0.01, "the L2 term of the training objective, also part of the Hessian")]


def data_comments(folder: Folder) -> tuple[str, ...]:
    """The commented max_length line of the train split: the default the config gets without it."""
    limit = min(MAX_TOKENS, folder.positions or MAX_TOKENS)
    return (f"    # max_length: {limit}".ljust(COMMENT_COLUMN + 1) + "tokens a row (the default: the least of the "
            "tokenizer's limit, the model's positions, 512)",)
