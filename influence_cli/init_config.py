"""`infl init DATA`: a commented YAML config inferred from the training data, for `infl check` to confirm.

What is inferred, and from what:
- `format`: csv / parquet by extension, tensors for .pt/.pth/.npz, imagefolder for a folder of class folders.
- csv/parquet: the id column (id, index, ...; else the row index), the label column (label, target, class,
  y, ...; else the last column that is not free text), the numeric feature columns (`in_features`) and the
  other columns, which are carried into the reports (a text feature would be an error). Free text
  (init_text.py) with `--model DIR`, a local Hugging Face folder, makes a text config (`model.arch: hf`);
  free text alone without it is an error.
- tensors: the keys of the inputs, labels and ids; `in_features` = the size of one input.
- imagefolder: the class folders, and from one image per class the size and channels (grayscale for
  one-channel images), with a resize when the sizes differ or are too small for the cnn.
- the task from the labels: two classes give `task: binary` with one logit (`num_classes: 1`); real-valued
  labels with many distinct values give `regression`; else `classification` with `num_classes` classes.
No torch here (torchvision only to list an image folder as ImageFolder would); init_yaml.py writes the text.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from . import init_text
from .errors import ConfigError, DataError
from .files import write_file
from .init_yaml import Inferred, data_block, header, model_block, rel, rest

BUILTIN_ARCHS = ("logreg", "mlp", "cnn", "resnet18")  # models.ARCHS (a test keeps the two equal)
ID_NAMES = ("id", "ids", "index", "idx", "uid", "row_id", "sample_id", "key")
LABEL_NAMES = ("label", "labels", "target", "targets", "class", "y", "category")
X_KEYS = ("x", "inputs", "input", "features", "images", "data")
TENSOR_SUFFIXES = (".pt", ".pth", ".npz")
TABULAR_ROWS = 200_000  # rows read to infer a csv's columns and classes
REGRESSION_DISTINCT = 50  # a whole-valued float label with more distinct values is a regression target
CNN_MIN_SIDE = 12  # models.cnn's smallest image side


def infer_config(data: Path, test: Path | None = None, model: str | None = None,
                 config_path: Path = Path("infl.yaml")) -> str:
    """The commented YAML text of a config for training data `data` (and `test`, default: a sibling named
    like `data` with train -> test, when there is one), for model `model` (a built-in arch,
    "package.module:factory" or a Hugging Face folder; default logreg, or cnn for image folders). Paths are
    written relative to the folder of `config_path`. ConfigError for an unknown format or arch, DataError for
    unusable data."""
    data, config_path = Path(data), Path(config_path)
    train = _inspect(data, "DATA")
    folder = init_text.model_folder(model, BUILTIN_ARCHS)
    arch = "hf" if folder else _arch(model) or ("cnn" if train.split["format"] == "imagefolder" else "logreg")
    init_text.apply(train, data, folder, model)
    if test is None:
        test = _sibling_test(data)
        found = test is not None
    else:
        test, found = Path(test), False
        if _format(test, "--test") != train.split["format"]:
            raise ConfigError(f"--test {test}: format {_format(test, '--test')} differs from DATA's "
                              f"({train.split['format']})", hint="pass test data in the same format")
    test_split = _test_split(train, test) if test is not None else None
    task, outputs, task_note = _task(train)
    if folder is not None:
        task, outputs, task_note = init_text.fit_task(task, outputs, task_note, folder, train.labels)
    image = train.image
    if arch in ("cnn", "resnet18") and image is None:
        raise ConfigError(f"--model {arch}: {data} holds flat feature rows, not images",
                          hint="use logreg or mlp for tabular data")
    if arch == "cnn" and train.split["format"] == "tensors" and min(image[1:]) < CNN_MIN_SIDE:
        raise ConfigError(f"--model cnn: the images in {data} are {image[1]}x{image[2]}, smaller than the "
                          f"{CNN_MIN_SIDE} pixels cnn needs (a tensors file cannot be resized)",
                          hint="use logreg or mlp, or save larger images")
    if arch == "cnn" and train.split["format"] == "imagefolder":
        image = _cnn_resize(train, test_split, image)
    base = config_path.resolve().parent
    name = "head" if folder else arch if arch in BUILTIN_ARCHS else "model"
    checkpoint = data.parent / f"{name}.pt"
    lines = header(data, train, task_note, config_path, batch_size=64 if folder else 256)
    if folder is None:
        lines += model_block(arch, task, outputs, train, image, rel(checkpoint, base), checkpoint.exists())
    else:
        lines += init_text.model_block(folder, task, rel(folder.path, base), rel(checkpoint, base), checkpoint.exists())
    lines += data_block(train.split, test_split, base, found, init_text.data_comments(folder) if folder else ())
    lines += rest(arch, data, base)
    text = "\n".join(lines) + "\n"
    yaml.safe_load(text)  # a bug here, not the user's: the text must be YAML
    return text


def write_config(path: Path, text: str, force: bool = False) -> Path:
    """Write the config atomically; refuses to replace an existing file unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"-c {path}: is a folder, not a config file", hint="pass -c PATH/infl.yaml")
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; infl init does not overwrite it",
                          hint="pass --force to replace it, or -c OTHER.yaml to write another file")
    return write_file(path, text.encode("utf-8"))


# ---- reading the data


def _format(path: Path, what: str) -> str:
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file or folder",
                          hint="give a .csv, .parquet, .pt/.npz file or an image folder with one sub-folder per class")
    if path.is_dir():
        return "imagefolder"
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", **dict.fromkeys(TENSOR_SUFFIXES, "tensors")}
    if suffix not in formats:
        raise ConfigError(f"{what} {path}: cannot tell the format from the extension {suffix or '(none)'}",
                          hint="infl init reads .csv, .parquet, .pt, .pth, .npz and image folders; "
                               "for other data write the config by hand (see configs/)")
    return formats[suffix]


def _inspect(path: Path, what: str) -> Inferred:
    fmt = _format(path, what)
    return {"csv": _tabular, "parquet": _tabular, "tensors": _tensors, "imagefolder": _imagefolder}[fmt](path, fmt)


def _tabular(path: Path, fmt: str) -> Inferred:
    try:
        if fmt == "csv":
            df = pd.read_csv(path, nrows=TABULAR_ROWS, keep_default_na=False, na_values=["", "NA", "NaN", "nan"])
        else:
            df = pd.read_parquet(path)
    except ImportError as e:
        raise ConfigError(f"{path}: reading parquet needs pyarrow ({e})", hint="pip install 'influence-cli[parquet]'"
                          ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header row)", hint="check the file") from None
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a damaged file; the file is the cause
        raise DataError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    df.columns = [str(c) for c in df.columns]
    if df.empty:
        raise DataError(f"{path}: has a header but no rows", hint="check the file")
    notes = []
    id_col = _pick(df.columns, ID_NAMES)
    if id_col is not None and df[id_col].duplicated().any():
        notes.append(f"column {id_col!r} has duplicate values, so rows are identified by their index")
        id_col = None
    label = _pick([c for c in df.columns if c != id_col], LABEL_NAMES)
    if label is None:
        others = [c for c in df.columns if c != id_col] if len(df.columns) > 1 else []
        if not others:
            raise DataError(f"{path}: has only the column {df.columns[0]!r}; a label and features are needed")
        label = ([c for c in others if not init_text.is_free_text(df[c])] or others)[-1]
        which = "the last column" + (" that is not free text" if label != others[-1] else "")
        notes.append(f"no column is named {', '.join(LABEL_NAMES[:4])}...: took {which}, {label!r}, as label")
    others = [c for c in df.columns if c not in (id_col, label)]
    features = [c for c in others if _numeric(df[c])]
    carry = [c for c in others if c not in features]
    text = init_text.text_columns(df, carry)  # no features and no text: init_text.apply refuses the data
    if len(df) == TABULAR_ROWS:
        notes.append(f"inferred from the first {TABULAR_ROWS:,} rows")
    split = {"format": fmt, "path": path, "label": label, "id": id_col, "carry": carry}
    return Inferred(split, len(df), len(features), labels=df[label].to_numpy(), notes=notes, columns=others, text=text)


def _tabular_columns(path: Path, fmt: str) -> list[Any]:
    try:
        if fmt == "csv":
            return list(pd.read_csv(path, nrows=0).columns)
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except ImportError as e:
        raise ConfigError(f"{path}: reading parquet needs pyarrow ({e})", hint="pip install 'influence-cli[parquet]'"
                          ) from None
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a damaged file; the file is the cause
        raise DataError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _tensors(path: Path, fmt: str) -> Inferred:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data: Any = {k: f[k] for k in f.files}
        else:
            import torch

            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - numpy/torch raise many types for a damaged file; the file is the cause
        raise DataError(f"{path}: cannot read it as a tensors file ({type(e).__name__}: {e})",
                        hint="save a dict of arrays with numpy.savez, or of tensors with torch.save") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: holds a {type(data).__name__}, not a dict of arrays", hint="save {'x': x, 'y': y}")
    arrays = {str(k): _as_numpy(v) for k, v in data.items()}
    x_key = _pick(arrays, X_KEYS) or next((k for k, v in arrays.items() if v.ndim >= 2), None)
    if x_key is None:
        raise DataError(f"{path}: no input array (keys {', '.join(arrays)}); expected x with shape (n, ...)",
                        hint="save the inputs under the key x")
    x = arrays[x_key]
    n = len(x) if x.ndim else 0
    label = _pick([k for k in arrays if k != x_key and arrays[k].ndim >= 1 and len(arrays[k]) == n], LABEL_NAMES)
    if label is None:
        raise DataError(f"{path}: no label array of {n} rows (keys {', '.join(arrays)})",
                        hint="save the labels under the key y")
    id_key = _pick([k for k in arrays if k not in (x_key, label) and arrays[k].ndim == 1 and len(arrays[k]) == n],
                   ID_NAMES)
    shape = tuple(int(s) for s in x.shape[1:])
    image = (shape[0], shape[1], shape[2]) if len(shape) == 3 else None
    split = {"format": "tensors", "path": path, "x_key": x_key, "label": label, "id": id_key}
    return Inferred(split, n, int(np.prod(shape)) if shape else 1, labels=arrays[label], image=image)


def _imagefolder(path: Path, fmt: str) -> Inferred:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: a folder, but with no class sub-folders",
                          hint="imagefolder needs one sub-folder per class: train/cat/1.png, train/dog/2.png") from None
    firsts, rows = [], 0
    for name in classes:
        files = sorted(str(Path(r) / f) for r, _, fs in os.walk(path / name, followlinks=True) for f in fs
                       if has_file_allowed_extension(f, IMG_EXTENSIONS))
        if not files:
            raise DataError(f"{path / name}: the class folder {name!r} holds no images",
                            hint=f"images end in {', '.join(IMG_EXTENSIONS)}; remove the folder or add its images")
        firsts.append(files[0])
        rows += len(files)
    sizes, modes = [], []
    for file in firsts:
        try:
            with Image.open(file) as im:
                sizes.append((im.height, im.width))
                modes.append(im.mode)
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{file}: cannot open it as an image ({e})", hint="fix or remove the file") from None
    gray = all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes)
    (h, w), notes = sizes[0], []
    split: dict[str, Any] = {"format": "imagefolder", "path": path, "grayscale": gray or None}
    if len(set(sizes)) > 1:
        split["resize"] = [h, w]
        notes.append(f"images differ in size ({', '.join(f'{a}x{b}' for a, b in sorted(set(sizes))[:4])}): "
                     f"all are resized to {h}x{w}")
    channels = 1 if gray else 3
    return Inferred(split, rows, channels * h * w, classes=list(classes), image=(channels, h, w), notes=notes)


def _sibling_test(data: Path) -> Path | None:
    name = data.name
    for a, b in (("train", "test"), ("Train", "Test"), ("TRAIN", "TEST"), ("train", "val")):
        if a in name:
            candidate = data.with_name(name.replace(a, b))
            if candidate.exists() and candidate != data:
                return candidate
    return None


def _test_split(train: Inferred, test: Path) -> dict[str, Any]:
    """The test block: the train split's keys with the test path, after checking the test data has them."""
    split = {**train.split, "path": test}
    fmt = split["format"]
    if fmt in ("csv", "parquet"):
        columns = [str(c) for c in _tabular_columns(test, fmt)]
        text = train.split.get("text") or []
        needed = [c for c in (train.split["label"], train.split["id"], *train.split["carry"],
                              *([text] if isinstance(text, str) else text)) if c]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"--test {test}: lacks the column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))} that the training data {train.split['path']} has")
    elif fmt == "tensors":
        other = _inspect(test, "--test")
        if other.in_features != train.in_features:
            raise DataError(f"--test {test}: inputs of size {other.in_features}, the training data's are "
                            f"{train.in_features}")
        split.update(x_key=other.split["x_key"], label=other.split["label"], id=other.split["id"])
    return split


def _task(train: Inferred) -> tuple[str, int, str]:
    """(task, model outputs, a sentence on the labels)."""
    where = f"{train.split['path']}: label {train.split.get('label')!r}"
    if train.classes is not None:
        k = len(train.classes)
        if k < 2:
            raise DataError(f"{train.split['path']}: only one class folder ({train.classes[0]!r})",
                            hint="a classifier needs at least two classes")
        shown = ", ".join(train.classes[:10]) + (", ..." if k > 10 else "")
        return ("binary", 1, f"2 class folders ({shown}): task binary") if k == 2 else (
            "classification", k, f"{k} class folders ({shown})")
    labels = np.asarray(train.labels)
    if labels.ndim > 1 and labels.shape[1:] != (1,):
        if labels.dtype.kind == "f":
            return "regression", int(np.prod(labels.shape[1:])), f"labels of shape {labels.shape[1:]}: regression"
        raise DataError(f"{where} has shape {labels.shape}, not one label per row")
    labels = labels.reshape(len(labels))
    if labels.dtype.kind in "biuf":
        values = labels.astype(np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"{where} has missing, NaN or inf values", hint="fix or drop those rows")
        distinct = np.unique(values)
        whole = bool(np.all(distinct == np.round(distinct)))
        if labels.dtype.kind == "f" and (not whole or len(distinct) > REGRESSION_DISTINCT):
            return "regression", 1, f"real-valued labels ({len(distinct):,} distinct values): regression"
        if len(distinct) < 2:
            raise DataError(f"{where} has a single value, {distinct[0]:g}", hint="a classifier needs two classes")
        if distinct[0] < 0:
            raise DataError(f"{where} has negative classes (e.g. {distinct[0]:g}); classes are 0..K-1",
                            hint="map the labels to 0..K-1, or use text labels")
        if len(distinct) == 2 and set(distinct) == {0.0, 1.0}:
            return "binary", 1, "labels 0 and 1: task binary"
        k = int(distinct[-1]) + 1
        gap = "" if k == len(distinct) else f"; only {len(distinct)} of the classes 0..{k - 1} occur"
        return "classification", k, f"integer labels 0..{k - 1}: {k} classes{gap}"
    text = sorted({str(v) for v in labels})
    if len(text) < 2:
        raise DataError(f"{where} has a single value, {text[0]!r}", hint="a classifier needs two classes")
    shown = ", ".join(text[:10]) + (", ..." if len(text) > 10 else "")
    if len(text) == 2:
        return "binary", 1, f"text labels {shown}: task binary (0 = {text[0]}, 1 = {text[1]})"
    return "classification", len(text), f"{len(text)} text labels ({shown}), numbered in sorted order"


def _cnn_resize(train: Inferred, test_split: dict[str, Any] | None, image: tuple[int, int, int]
                ) -> tuple[int, int, int]:
    c, h, w = image
    k = max(1, math.ceil(CNN_MIN_SIDE / min(h, w)))
    if k > 1:
        h, w = h * k, w * k
        train.split["resize"] = [h] if h == w else [h, w]
        train.notes.append(f"images of {image[1]}x{image[2]} are resized to {h}x{w}: cnn needs at least "
                           f"{CNN_MIN_SIDE} pixels a side")
        if test_split is not None:
            test_split["resize"] = train.split["resize"]
    return c, h, w


def _arch(model: str | None) -> str:
    if model is None:
        return ""
    if ":" in model or model in BUILTIN_ARCHS:
        return model
    import difflib

    close = difflib.get_close_matches(model, BUILTIN_ARCHS, n=1)
    raise ConfigError(f"--model {model!r}: not a built-in architecture",
                      hint=f"did you mean {close[0]}?" if close else f"built-ins: {', '.join(BUILTIN_ARCHS)}, "
                           "package.module:factory, or a local Hugging Face folder (a path)")


def _pick(names: Any, wanted: tuple[str, ...]) -> str | None:
    """The first of `names` that is, ignoring case, one of `wanted` (in `wanted`'s order)."""
    lower = {str(n).lower(): str(n) for n in reversed(list(names))}
    return next((lower[w] for w in wanted if w in lower), None)


def _numeric(column: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return True
    coerced = pd.to_numeric(column, errors="coerce")
    return bool(coerced.notna().sum() == column.notna().sum())


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
