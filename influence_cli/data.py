"""Load a train or test split from any configured `format` into one `Split`; label checks; fast loaders.

Formats: csv and parquet (pandas; features in one float32 tensor), tensors (.pt loaded with
`weights_only=True`, or .npz without pickle) here; imagefolder, torchvision and python in
sources.py. Every error names the dotted key (`data.train.label`), the file, and up to
5 row ids. Inputs not held in memory (imagefolder, torchvision, python) are checked for NaN later,
in the gradient pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, default_collate

from . import sources
from .config import SplitConfig
from .errors import ConfigError, DataError, InflError
from .sources import Raw, existing, to_numpy

TASKS = ("classification", "binary", "regression")
_SHOWN = 5  # row ids named in a message
CHUNK_VALUES = 2**22  # csv/parquet: numbers per chunk of rows converted at a time (32 MiB as float64)
FLOAT32_MAX = float(np.finfo(np.float32).max)
# pandas' default NA strings: missing in every column but the id column, whose values are read verbatim
NA_STRINGS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


@dataclass(frozen=True)
class Split:
    """One loaded split. Row i is `ids[i]`, `labels[i]`, `dataset[i]` and `extra.iloc[i]`.

    `labels` is int64 (classification), float32 0/1 (binary) or float32 (n,) / (n, k) (regression);
    `dataset[i]` is `(x float32, labels[i])`. `classes[j]` names integer label j when the labels
    were strings or class folders. `fingerprint` is a sha256 of the content and of the settings
    that change it (not of the path, so a moved file keeps it). `task` was added to the brief's
    fields so `label_names` can print binary labels as ints. `features` names the columns of x,
    in order (csv/parquet only): pass the train split's to the test split's `load_split`.
    """

    role: str
    ids: list[str]
    labels: torch.Tensor
    dataset: Dataset
    fingerprint: str
    extra: pd.DataFrame
    group: str | None = None
    classes: list[str] | None = None
    task: str = "classification"
    features: tuple[str, ...] | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def label_names(self, labels: torch.Tensor | np.ndarray) -> list:
        """Labels (or predicted labels) as report values: class names, ints, or floats.

        Regression floats keep float32's shortest repr (0.1, not 0.10000000149); rows of (n, k) become lists.
        """
        arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if self.task == "regression":
            arr = arr.astype(np.float32)
            return [float(str(v)) for v in arr] if arr.ndim == 1 else [[float(str(v)) for v in r] for r in arr]
        ints = [int(v) for v in arr.reshape(-1)]
        if self.classes is None:
            return ints
        return [self.classes[i] if 0 <= i < len(self.classes) else i for i in ints]


class TensorRows(Dataset):
    """An in-memory dataset: `x` (n, ...) float32 and labels (n, ...); `make_loader` slices it per batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class LabeledDataset(Dataset):
    """Wraps a lazy dataset so each item is `(x as float32 tensor, labels[i])`, whatever the source gives.

    A row that cannot be read (a corrupt image, an item user code fails on) is a DataError naming
    `key`, the file (for image folders) and the row id: the boundary where PIL, torchvision and
    user datasets meet ours."""

    def __init__(self, base: Any, labels: torch.Tensor, ids: Sequence[str] | None = None, key: str = "data") -> None:
        self.base, self.labels, self.ids, self.key = base, labels, ids, key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = self.base[i][0]
            if not isinstance(x, (torch.Tensor, np.ndarray, list, tuple, int, float)):  # a PIL image
                from torchvision.transforms.functional import to_tensor

                x = to_tensor(x)
            return torch.as_tensor(x, dtype=torch.float32), self.labels[i]
        except InflError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL, torchvision and user code raise anything for a bad row
            raise DataError(f"{self.key}: {self._row(i)} ({type(e).__name__}: {_first_line(e)})",
                            hint="fix or remove that file" if self._file(i) else "fix that row") from e

    def _file(self, i: int) -> str | None:
        samples = getattr(self.base, "samples", None)
        return str(samples[i][0]) if isinstance(samples, list) and 0 <= i < len(samples) else None

    def _row(self, i: int) -> str:
        rid = f"row id {self.ids[i]!r}" if self.ids is not None and 0 <= i < len(self.ids) else f"row {i}"
        file = self._file(i)
        return f"cannot read image {file} ({rid})" if file else f"cannot read {rid}"


def load_split(cfg: SplitConfig, role: str, task: str, classes: list[str] | None = None, *,
               features: Sequence[str] | None = None) -> Split:
    """Load `data.<role>`. For the test split pass the train split's `classes`, so string labels
    and class folders map to the same integers; a test label train never saw is a DataError. Pass
    its `features` too: csv/parquet columns are then taken by these names, in this order, whatever
    the file's column order; a missing one, or a column that would be a feature but is not one of
    these, is a DataError naming it.

    The fingerprint hashes what the math reads: the inputs (in-memory x, or the image/dataset
    files), the ids, the mapped labels and classes, the task and the settings that change them
    (transforms, feature names); not the path, nor the group and carry columns.
    """
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {' | '.join(TASKS)}, got {task!r}")
    key = f"data.{role}"
    if cfg.format not in ("csv", "parquet", "tensors") and (cfg.group or cfg.carry):
        raise ConfigError(f"{key}.group/carry: only csv, parquet and tensors data have extra columns")
    if cfg.format not in ("csv", "parquet") and cfg.features is not None:
        raise ConfigError(f"{key}.features: only csv and parquet data have feature columns")
    readers = {"tensors": _tensors, "imagefolder": sources.imagefolder, "torchvision": sources.torchvision,
               "python": sources.python}
    if cfg.text is not None:
        raw, names_of_x = _text(cfg, key), None
    else:
        raw, names_of_x = _tabular(cfg, key, features) if cfg.format in ("csv", "parquet") else (
            readers[cfg.format](cfg, key), None)
    if not raw.ids:
        raise DataError(f"{key}: the dataset at {cfg.path or cfg.function} has no rows", hint="check the file")
    index = pd.Index(raw.ids)
    if not index.is_unique:
        shown = ", ".join(repr(d) for d in index[index.duplicated()].unique()[:_SHOWN])
        raise DataError(f"{key}.id: duplicate ids {shown}", hint="each row needs its own id")
    labels, names = _labels(raw.targets, raw.ids, key, task, classes, raw.names)
    in_memory = isinstance(raw.base, torch.Tensor)
    dataset = TensorRows(raw.base, labels) if in_memory else LabeledDataset(raw.base, labels, raw.ids, key)
    if cfg.text is not None:
        from .text import TextRows

        dataset = TextRows(raw.base, labels)
    extra = raw.extra if raw.extra is not None else pd.DataFrame(index=pd.RangeIndex(len(raw.ids)))
    digest = _fingerprint(raw, labels, cfg, names_of_x)
    digest.update(json.dumps([task, names], default=str).encode())
    return Split(role, raw.ids, labels, dataset, digest.hexdigest(), extra, cfg.group, names, task, names_of_x)


def validate_labels(split: Split, task: str, num_outputs: int) -> None:
    """Check the labels fit a model with `num_outputs` outputs; DataError naming up to 5 rows."""
    key, y = f"data.{split.role}", split.labels
    if task == "regression":
        width = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
        if width != num_outputs:
            raise DataError(f"{key}: labels have width {width} but the model has {num_outputs} outputs",
                            hint="make the model's last layer match the label width (model.kwargs)")
        return
    if task == "binary" and num_outputs != 1:
        raise DataError(f"{key}: task binary needs a model with 1 output (one logit), this one has {num_outputs}",
                        hint="set model.kwargs.num_classes: 1")
    bad = ((y != 0) & (y != 1)) if task == "binary" else ((y < 0) | (y >= num_outputs))
    rows = torch.nonzero(bad).flatten().tolist()
    if not rows:
        return
    i = rows[0]
    first = f"label {split.label_names(y[i:i + 1])[0]} of row id {split.ids[i]!r}"
    more = f" (and row ids {_name_rows(split.ids, rows[1:], _SHOWN - 1)})" if len(rows) > 1 else ""
    if task == "binary":
        raise DataError(f"{key}: {first}{more} is not 0 or 1, as task binary needs")
    raise DataError(f"{key}: {first}{more} is out of range for a model with {num_outputs} classes "
                    "(model.kwargs.num_classes)", hint="raise model.kwargs.num_classes or fix the labels")


class CastLoader:
    """A re-iterable loader of (row_idx, x, y) whose floating inputs are cast to the compute dtype."""

    def __init__(self, loader: Any, dtype: torch.dtype) -> None:
        self.loader, self.dtype = loader, dtype

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx, x, y in self.loader:
            yield idx, (x.to(self.dtype) if x.is_floating_point() else x), y


def make_loader(split: Split, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, rows: range | None = None) -> DataLoader:
    """Batches `(row_idx (B,) int64, x (B, ...), y (B, ...))`, in row order unless `shuffle`.
    `rows` (in order only): just these rows; a range starting at a multiple of batch_size yields
    the same batches as the full loader does there (how shards skip finished work unread).

    In-memory data comes out a batch at a time with no per-row Python work: in row order the x and
    y of a batch are views of the split's tensors (do not write to them), shuffled they are one
    index_select. Lazy data is read row by row in this process (num_workers=0).
    """
    fast = isinstance(split.dataset, TensorRows)
    dataset: Dataset = _SlicedRows(split.dataset, not shuffle) if fast else _IndexedRows(split.dataset)
    sampler: Any = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    if rows is not None:
        if shuffle:
            raise ValueError("make_loader: rows= needs shuffle=False")
        sampler = range(max(rows.start, 0), min(rows.stop, len(dataset)))
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      collate_fn=_identity if fast else default_collate, num_workers=0)


class _SlicedRows(Dataset):
    """One whole batch per call: a view when the rows are in order, else one index_select."""

    def __init__(self, data: TensorRows, in_order: bool) -> None:
        self.data, self.in_order = data, in_order

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trim = getattr(self.data, "trim", None)  # text: cut the batch to its longest row
        if self.in_order:
            start, stop = indices[0], indices[-1] + 1
            idx, x, y = torch.arange(start, stop), self.data.x[start:stop], self.data.y[start:stop]
        else:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x, y = self.data.x.index_select(0, idx), self.data.y.index_select(0, idx)
        return idx, (trim(x, idx) if trim else x), y


class _IndexedRows(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        x, y = self.data[i]
        return i, x, y


def _identity(batch: Any) -> Any:
    return batch


# ---- formats: each reads `data.<role>` into a Raw


def _tabular(cfg: SplitConfig, key: str, trained: Sequence[str] | None) -> tuple[Raw, tuple[str, ...]]:
    """(Raw, feature names). `trained`: the train split's feature names, which this split's columns
    must hold (by name).

    Streamed (`_tabular_streamed`): the features go a chunk of rows at a time into one float32 array, so the
    whole file is never held as a DataFrame (peak ~ the float32 features for Parquet, twice that for csv, whose
    row count is unknown until the end). A file that cannot be streamed to exactly what the whole-frame read
    gives (any error, or a column whose inferred type differs between chunks) is read whole
    (`_tabular_whole`), which also raises the error messages."""
    path = existing(cfg.path, f"{key}.path", file=True)
    try:
        return _tabular_streamed(path, cfg, key, trained)
    except Exception:  # noqa: BLE001 - pandas/pyarrow raise many types; the whole-frame read is the reference
        return _tabular_whole(path, cfg, key, trained)


def _tabular_whole(path: Path, cfg: SplitConfig, key: str, trained: Sequence[str] | None
                   ) -> tuple[Raw, tuple[str, ...]]:
    """The file read into one DataFrame: the reference for `_tabular_streamed`, and what names any error."""
    df = _read_table(path, cfg, key)
    df.columns = cols = [str(c) for c in df.columns]
    _require(key, {**_named(cfg), "features": list(cfg.features or []) if trained is None else []}, cols,
             "column", path.name)
    ids = _ids(df[cfg.id], key) if cfg.id else [str(i) for i in range(len(df))]
    features = _feature_names(cfg, key, trained, cols, path.name)
    x = _numeric_features(df[features], ids, key)
    extra = df[_extra_names(cfg)].reset_index(drop=True)
    return Raw(ids, df[cfg.label].to_numpy(), None, x, b"", extra), tuple(features)  # x is hashed, not the file


class _Unstreamable(Exception):
    """The chunks of a file disagree on a column's type: the whole-frame read could differ, so it is used."""


def _tabular_streamed(path: Path, cfg: SplitConfig, key: str, trained: Sequence[str] | None
                      ) -> tuple[Raw, tuple[str, ...]]:
    """`_tabular_whole`'s result without holding the file as one DataFrame: the columns other than the features
    (label, id, group, carry: small) are kept whole, the features converted chunk by chunk."""
    cols = _parquet_columns(path) if cfg.format == "parquet" else [str(c) for c in pd.read_csv(path, nrows=0).columns]
    _require(key, {**_named(cfg), "features": list(cfg.features or []) if trained is None else []}, cols,
             "column", path.name)
    features = _feature_names(cfg, key, trained, cols, path.name)
    others = list(dict.fromkeys(c for c in (cfg.label, cfg.id, cfg.group, *cfg.carry) if c))
    read = _parquet_streamed if cfg.format == "parquet" else _csv_streamed
    small, ids, x = read(path, others, features, cfg, key)
    extra = small[_extra_names(cfg)].reset_index(drop=True)
    return Raw(ids, small[cfg.label].to_numpy(), None, x, b"", extra), tuple(features)  # x is hashed, not the file


def _feature_names(cfg: SplitConfig, key: str, trained: Sequence[str] | None, cols: list[str],
                   file: str) -> list[str]:
    """The feature columns, in order: the train split's, `features`, or every column the config does not name."""
    taken = {cfg.label, cfg.id, cfg.group, *cfg.carry}
    clash = [c for c in (cfg.features or trained or ()) if c in taken]
    if clash:
        raise ConfigError(f"{key}.features: {clash[0]!r} is also the label, id, group or a carry column")
    if trained is not None:
        features = _trained_features(cfg, key, list(trained), cols, taken, file)
    else:
        features = list(cfg.features) if cfg.features is not None else [c for c in cols if c not in taken]
    if not features:
        raise ConfigError(f"{key}.features: no feature columns left in {file}", hint="list them in features")
    if len(set(features)) != len(features):
        raise ConfigError(f"{key}.features: {_first_repeat(features)!r} is listed twice")
    return features


def _same_types(types: dict[str, Any], chunk: pd.DataFrame) -> None:
    """Record each column's type in `types` (from its first chunk); _Unstreamable if `chunk` has another."""
    for name, dtype in chunk.dtypes.items():
        if types.setdefault(str(name), dtype) != dtype:
            raise _Unstreamable(f"column {name!r} has type {dtype} in one chunk, {types[str(name)]} in another")


def _parquet_columns(path: Path) -> list[str]:
    """The columns `pd.read_parquet` gives (index columns stored by pandas left out), as text."""
    import pyarrow.parquet as pq

    return [str(c) for c in pq.ParquetFile(path).schema_arrow.empty_table().to_pandas().columns]


def _parquet_streamed(path: Path, others: list[str], features: list[str], cfg: SplitConfig, key: str
                      ) -> tuple[pd.DataFrame, list[str], torch.Tensor]:
    """(the `others` columns as `pd.read_parquet` reads them, the ids, the features (n, F) float32): per row
    group, a few feature columns at a time (about CHUNK_VALUES numbers) written into one preallocated array. Column
    subsets, not record batches: pyarrow decodes a whole row group for `iter_batches` (pandas writes 1M-row
    groups), so batches of rows held ~3x the features at once here, while a column subset decodes only itself."""
    import pyarrow.parquet as pq

    small = pd.read_parquet(path, columns=others)
    small.columns = [str(c) for c in small.columns]
    file = pq.ParquetFile(path)
    meta = file.metadata
    if len(small) != meta.num_rows:
        raise _Unstreamable("row counts differ")
    ids = _ids(small[cfg.id], key) if cfg.id else [str(i) for i in range(meta.num_rows)]
    x = np.empty((meta.num_rows, len(features)), dtype=np.float32)
    start, types = 0, {}
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        width = max(1, CHUNK_VALUES // max(rows, 1))
        for c in range(0, len(features), width):
            frame = file.read_row_group(group, columns=features[c : c + width]).to_pandas()
            _same_types(types, frame)
            if len(frame) != rows:
                raise _Unstreamable("row counts differ")
            x[start : start + rows, c : c + width] = _numeric_features(frame, ids[start : start + rows], key).numpy()
        start += rows
    return small, ids, torch.from_numpy(x)


def _csv_streamed(path: Path, others: list[str], features: list[str], cfg: SplitConfig, key: str
                  ) -> tuple[pd.DataFrame, list[str], torch.Tensor]:
    """(the `others` columns, the ids, the features (n, F) float32) from chunks of rows read as `_read_table`
    reads the whole file; the float32 chunks are joined at the end. Errors name chunk rows, not ids: any error
    sends the file to `_tabular_whole`, whose message is the one shown."""
    parts, blocks, types = [], [], {}
    rows = max(1024, CHUNK_VALUES // (len(features) + len(others)))
    for chunk in pd.read_csv(path, chunksize=rows, **_csv_options(path, cfg)):
        chunk.columns = [str(c) for c in chunk.columns]
        _same_types(types, chunk)
        blocks.append(_numeric_features(chunk[features], [str(i) for i in range(len(chunk))], key).numpy())
        parts.append(chunk[others])
    if not parts:
        raise _Unstreamable("no rows")
    small = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    ids = _ids(small[cfg.id], key) if cfg.id else [str(i) for i in range(len(small))]
    x = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return small, ids, torch.from_numpy(x)


def _text(cfg: SplitConfig, key: str) -> Raw:
    """Text columns tokenized by model.path's tokenizer (text.py); the text goes into the reports too."""
    from . import text

    path = existing(cfg.path, f"{key}.path", file=True)
    df = _read_table(path, cfg, key)
    df.columns = cols = [str(c) for c in df.columns]
    _require(key, {**_named(cfg), "text": list(cfg.text or ())}, cols, "column", path.name)
    clash = [c for c in cfg.text or () if c in (cfg.label, cfg.id)]
    if clash:
        raise ConfigError(f"{key}.text: {clash[0]!r} is also the label or id column")
    ids = _ids(df[cfg.id], key) if cfg.id else [str(i) for i in range(len(df))]
    x = text.tokenize([text.column(df[c], ids, f"{key}.text") for c in cfg.text or ()], cfg.tokenizer,
                      cfg.max_length, key)
    extra = df[list(dict.fromkeys([*(cfg.text or ()), *_extra_names(cfg)]))].reset_index(drop=True)
    return Raw(ids, df[cfg.label].to_numpy(), None, x, b"", extra)  # the tokens are hashed


def _read_table(path: Path, cfg: SplitConfig, key: str) -> pd.DataFrame:
    """The file as a DataFrame; csv ids and text as text, verbatim ("NA", "None", "007" stay what they are)."""
    try:
        if cfg.format == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, **_csv_options(path, cfg))
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}.path: {path} is empty (no header row, no rows)", hint="check the file") from None
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise ConfigError(f"{key}.path: cannot read {path} as {cfg.format} ({type(e).__name__}: {e})",
                          hint=f"check the file, or set {key}.format") from e


def _csv_options(path: Path, cfg: SplitConfig) -> dict[str, Any]:
    """pd.read_csv's options: the id and text columns as text, verbatim; pandas' NA strings elsewhere."""
    verbatim = [c for c in (cfg.id, *(cfg.text or ())) if c]
    if not verbatim:
        return {}
    header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
    na = {c: NA_STRINGS for c in header if c not in verbatim}
    return {"dtype": {c: str for c in verbatim if c in header} or None, "keep_default_na": False, "na_values": na}


def _trained_features(cfg: SplitConfig, key: str, trained: list[str], cols: list[str], taken: set[Any],
                      file: str) -> list[str]:
    """The train split's feature names, checked against this split's columns and settings."""
    if cfg.features is not None and sorted(cfg.features) != sorted(trained):
        raise ConfigError(f"{key}.features: {list(cfg.features)} differ from the train split's features {trained}",
                          hint=f"drop {key}.features (the test split inherits data.train's) or list the same columns")
    missing = [c for c in trained if c not in cols]
    if missing:
        names = ", ".join(repr(c) for c in missing[:_SHOWN])
        raise DataError(f"{key}: {file} lacks the feature column{'s' if len(missing) > 1 else ''} {names} the "
                        "model reads (the train split's features)", hint="add them to the file, or retrain without them")
    if cfg.features is None:
        unknown = [c for c in cols if c not in taken and c not in trained]
        if unknown:
            names = ", ".join(repr(c) for c in unknown[:_SHOWN])
            raise DataError(f"{key}: column{'s' if len(unknown) > 1 else ''} {names} in {file} would be a feature but "
                            f"{'is' if len(unknown) == 1 else 'are'} not one of the train split's ({', '.join(trained)})",
                            hint=f"list it under {key}.carry, or set {key}.features")
    return trained


def _first_repeat(items: list[str]) -> str:
    seen: set[str] = set()
    return next(c for c in items if c in seen or seen.add(c))  # type: ignore[func-returns-value]


def _tensors(cfg: SplitConfig, key: str) -> Raw:
    """A dict saved by torch.save (.pt/.pth) or numpy.savez (.npz). The labels are under
    `data.<role>.label`; when that is the default "label" and the file has no such key, under "y"."""
    path = existing(cfg.path, f"{key}.path", file=True)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                data: Any = {k: f[k] for k in f.files}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{key}.path: cannot read {path} as a tensors file ({type(e).__name__}: {e})",
                          hint="save a dict of tensors with torch.save, or arrays with numpy.savez") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{key}.path: {path} holds a {type(data).__name__}, not a dict of tensors",
                          hint=f"save {{'{cfg.x_key}': x, 'y': y}}")
    if cfg.label == "label" and "label" not in data and "y" in data:
        cfg = dataclasses.replace(cfg, label="y")
    _require(key, {"x_key": [cfg.x_key], **_named(cfg)}, [str(k) for k in data], "key", path.name)
    try:
        x = torch.as_tensor(np.asarray(data[cfg.x_key]), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{key}.x_key: {cfg.x_key!r} in {path.name} is not a numeric array ({e})") from e
    if x.ndim == 0:
        raise DataError(f"{key}.x_key: {cfg.x_key!r} in {path.name} is a scalar, not an array (n, ...)")
    n = len(x)
    columns = {name: to_numpy(data[name]) for name in (cfg.label, cfg.id, cfg.group, *cfg.carry) if name}
    for name, col in columns.items():
        if len(col) != n:
            raise DataError(f"{key}: {name!r} in {path.name} has {len(col)} rows but {cfg.x_key!r} has {n}")
    ids = _ids(pd.Series(columns[cfg.id]), key) if cfg.id else [str(i) for i in range(n)]
    bad = torch.nonzero(~torch.isfinite(_flat(x)).all(1)).flatten().tolist()
    if bad:
        raise DataError(f"{key}: NaN or inf in {cfg.x_key!r} at row ids {_name_rows(ids, bad)}", hint="fix the data")
    extra = pd.DataFrame({c: columns[c] for c in _extra_names(cfg)}, index=pd.RangeIndex(n))
    return Raw(ids, columns[cfg.label], None, x, b"", extra)  # x is hashed, not the file


# ---- helpers


def _labels(values: Any, ids: list[str], key: str, task: str, classes: list[str] | None,
            names: list[str] | None) -> tuple[torch.Tensor, list[str] | None]:
    """Stored label values -> (labels, class names). Integer targets stay as they are unless
    `names` names them (class folders) or `classes` (the train split's) is given; then, like
    strings, they map to their index in `classes`, or else in `names` or the sorted strings."""
    arr = to_numpy(values)
    if task == "regression" and arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            i = next((i for i, row in enumerate(_flat(arr)) if not all(map(_is_number, row))), 0)
            raise DataError(f"{key}.label: task regression needs numbers, row id {ids[i]!r} has {arr[i]!r}") from None
    numeric = arr.dtype.kind in "biuf"
    if numeric:
        bad = np.nonzero(~np.isfinite(_flat(arr).astype(np.float64)).all(1))[0]
        if len(bad):
            raise DataError(f"{key}.label: missing, NaN or inf label at row ids {_name_rows(ids, bad)}")
        if task == "regression":
            with np.errstate(over="ignore"):
                y = arr.astype(np.float32)
            huge = np.nonzero(~np.isfinite(_flat(y)).all(1))[0]
            if len(huge):
                raise DataError(f"{key}.label: labels beyond float32's range (|y| > {FLOAT32_MAX:.3g}) at row ids "
                                f"{_name_rows(ids, huge)}", hint="rescale the targets")
            return torch.as_tensor(y), None
    dtype = torch.int64 if task == "classification" else torch.float32
    arr = arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr
    if arr.ndim != 1:
        raise DataError(f"{key}.label: task {task} needs one label per row, got shape {arr.shape}")
    if numeric:
        with np.errstate(invalid="ignore"):  # a value beyond int64 casts to garbage, which the check below names
            whole = arr.astype(np.int64)
        bad = np.nonzero(whole != arr)[0]
        if len(bad):
            raise DataError(f"{key}.label: label {arr[bad[0]]} of row id {ids[bad[0]]!r} is not a whole number",
                            hint="for real-valued targets use task: regression")
        if names is None and classes is None:
            return torch.as_tensor(whole, dtype=dtype), None
        out = np.nonzero((whole < 0) | (whole >= len(names or ())))[0] if names is not None else []
        if len(out):
            raise DataError(f"{key}.label: target {whole[out[0]]} of row id {ids[out[0]]!r} has no class name")
        arr = np.asarray(names, dtype=object)[whole] if names is not None else whole.astype(str)
    missing = [i for i, v in enumerate(arr) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise DataError(f"{key}.label: missing label at row ids {_name_rows(ids, missing)}")
    text = [str(v) for v in arr]
    known = list(classes if classes is not None else names if names is not None else sorted(set(text)))
    index = {c: j for j, c in enumerate(known)}
    unseen = [i for i, v in enumerate(text) if v not in index]
    if unseen:
        raise DataError(f"{key}.label: label {text[unseen[0]]!r} of row id {ids[unseen[0]]!r} is not a class of "
                        "the train split", hint=f"train classes are: {', '.join(known[:20])}")
    if task == "binary" and len(known) > 2:
        raise DataError(f"{key}.label: task binary needs 2 classes, found {len(known)}: {', '.join(known[:10])}")
    return torch.as_tensor([index[v] for v in text], dtype=dtype), known


def _numeric_features(df: pd.DataFrame, ids: list[str], key: str) -> torch.Tensor:
    """df's columns as one C-contiguous (rows, columns) float32 tensor (pandas gives a single-dtype frame
    column-major: rows are then contiguous for the batches, and the layout does not depend on how the file was
    chunked); DataError naming the column and row ids for text, NaN/inf or values beyond float32."""
    for col in df.columns:
        if not (pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col])):
            coerced = pd.to_numeric(df[col], errors="coerce")
            bad = np.nonzero((coerced.isna() & df[col].notna()).to_numpy())[0]
            if len(bad):
                raise DataError(f"{key}.features: column {col!r} is not numeric (row id {ids[bad[0]]!r} has "
                                f"{df[col].iloc[bad[0]]!r})", hint=f"list it under {key}.carry or drop it from "
                                f"{key}.features")
            df = df.assign(**{col: coerced})
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in the cast: reported below
        x = df.to_numpy(dtype=np.float32, na_value=np.nan, copy=True)
    bad_rows = np.nonzero(~np.isfinite(x).all(1))[0]
    if len(bad_rows):
        cols = [c for c, ok in zip(df.columns, np.isfinite(x[bad_rows]).all(0), strict=True) if not ok]
        wide = df.iloc[bad_rows].to_numpy(dtype=np.float64, na_value=np.nan)
        huge = np.nonzero(np.isfinite(wide).all(1))[0]
        if len(huge):
            row = bad_rows[huge[0]]
            raise DataError(f"{key}: features of row id {ids[row]!r} ({', '.join(cols[:5])}) are beyond float32's "
                            f"range (|x| > {FLOAT32_MAX:.3g})", hint="rescale those columns or fix the values")
        raise DataError(f"{key}: missing, NaN or inf features ({', '.join(cols[:5])}) at row ids "
                        f"{_name_rows(ids, bad_rows)}", hint="fill or drop those rows")
    return torch.from_numpy(np.ascontiguousarray(x))


def _ids(col: pd.Series, key: str) -> list[str]:
    """Ids as text. csv ids arrive verbatim ("NA" is an id); a missing or empty one is refused."""
    empty = col.isna().to_numpy() | np.array([isinstance(v, str) and not v.strip() for v in col], dtype=bool)
    if empty.any():
        rows = np.nonzero(empty)[0]
        raise DataError(f"{key}.id: missing id at rows {', '.join(str(i) for i in rows[:_SHOWN])}",
                        hint="give every row a non-empty id (rows are counted from 0 after the header)")
    if pd.api.types.is_float_dtype(col) and (col == col.round()).all():
        col = col.astype(np.int64)
    return [str(v) for v in col]


def _named(cfg: SplitConfig) -> dict[str, list[str]]:
    """The columns or keys the config names, by config field."""
    return {"label": [cfg.label], "id": [cfg.id] if cfg.id else [], "group": [cfg.group] if cfg.group else [],
            "carry": list(cfg.carry)}


def _require(key: str, wanted: dict[str, list[str]], available: list[str], what: str, file: str) -> None:
    """ConfigError `data.<role>.<field>: column 'x' not found in FILE; columns are: ...`."""
    for field, names in wanted.items():
        for name in (n for n in names if n not in available):
            close = difflib.get_close_matches(name, available, n=1)
            raise ConfigError(f"{key}.{field}: {what} {name!r} not found in {file}; {what}s are: "
                              f"{', '.join(available[:30])}", hint=f"did you mean {close[0]!r}?" if close else None)


def _extra_names(cfg: SplitConfig) -> list[str]:
    return list(dict.fromkeys(([cfg.group] if cfg.group else []) + list(cfg.carry)))


def _flat(a: Any) -> Any:
    """(n, ...) -> (n, m) for numpy arrays and tensors, also when n is 0."""
    return a.reshape(len(a), -1) if len(a) else a.reshape(0, 0)


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _name_rows(ids: Sequence[str], rows: Any, limit: int = _SHOWN) -> str:
    rows = list(rows)
    shown = ", ".join(repr(ids[int(i)]) for i in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


NOT_HASHED = ("path", "group", "carry", "features", "tokenizer")  # features: as the resolved names; tokenizer: its tokens


def _fingerprint(raw: Raw, labels: torch.Tensor, cfg: SplitConfig, features: tuple[str, ...] | None) -> Any:
    """sha256 over x (in memory: its bytes, shape and dtype; else the reader's digest of the
    files), ids, labels and the settings that change them."""
    digest = hashlib.sha256()
    if isinstance(raw.base, torch.Tensor):
        x = raw.base.detach().cpu().contiguous().numpy()
        digest.update(json.dumps([list(x.shape), str(x.dtype)]).encode())
        digest.update(memoryview(x.reshape(-1)).cast("B"))  # no copy of a large feature matrix
    else:
        digest.update(raw.content)
    digest.update(json.dumps(raw.ids).encode())
    digest.update(labels.contiguous().numpy().tobytes())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HASHED}
    digest.update(json.dumps([settings, features], sort_keys=True, default=str).encode())
    return digest


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"
