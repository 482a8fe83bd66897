"""Readers of data that stays on disk or in user code: imagefolder and torchvision (images decoded
lazily, with transforms from the config) and python ("package.module:function" returning a
Dataset; runs user code on purpose); plus what every reader shares (`Raw`, `existing`,
`import_object`). `data.load_split` maps labels, checks and fingerprints what they find.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from .config import SplitConfig
from .errors import ConfigError, DataError

EDGE = 64 * 1024  # bytes hashed from each end of an image file


class Raw(NamedTuple):
    """What a format reader finds, before labels are mapped and checked."""

    ids: list[str]
    targets: Any  # label values as stored: numbers, strings, or integer indices into `names`
    names: list[str] | None  # names[j] names integer target j (class folders, a dataset's .classes)
    base: Any  # x (n, ...) float32 in memory, or a lazy dataset whose items are (x, _)
    content: bytes  # digest of the data files; labels and settings are hashed by load_split
    extra: pd.DataFrame | None = None


def import_object(spec: str, key: str) -> Callable[..., Any]:
    """Import "package.module:attribute" (also used for model factories); ConfigError naming `key`."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({e})",
                          hint="install the package or run infl from the folder that holds it") from e
    except AttributeError as e:
        raise ConfigError(f"{key}: module {module_name!r} has no {attr!r}") from e
    if not callable(obj):
        raise ConfigError(f"{key}: {spec} is a {type(obj).__name__}, not a function")
    return obj


def existing(path: Path | None, key: str, *, file: bool) -> Path:
    if path is None or not (path.is_file() if file else path.is_dir()):
        what = "file" if file else "folder"
        raise ConfigError(f"{key}: {what} not found: {path}", hint=f"set {key} to an existing {what}")
    return path


def imagefolder(cfg: SplitConfig, key: str) -> Raw:
    """Fingerprint: per image its relative path, size and first and last 64 KiB, not every byte,
    so a large folder hashes in seconds; an edit that keeps size and both ends is not seen."""
    from torchvision.datasets import ImageFolder

    root = existing(cfg.path, f"{key}.path", file=False)
    try:
        ds = ImageFolder(str(root), transform=_transform(cfg))
    except FileNotFoundError as e:
        raise DataError(f"{key}: no images in {root} ({e})", hint="put images in one sub-folder per class") from e
    files = [Path(p) for p, _ in ds.samples]
    return Raw([p.relative_to(root).as_posix() for p in files], ds.targets, list(ds.classes), ds,
                _hash_tree(root, files))


def torchvision(cfg: SplitConfig, key: str) -> Raw:
    """Built from local files, never downloaded; `data.<role>.kwargs` go to the class too. Ids are
    row indices. Fingerprint: the dataset's own folder (raw_folder, base_folder or root/<name>) as
    for imagefolder, and the labels."""
    import torchvision.datasets as tvd

    if cfg.name not in tvd.__all__ or not inspect.isclass(getattr(tvd, cfg.name, None)):
        close = difflib.get_close_matches(str(cfg.name), tvd.__all__, n=3)
        raise ConfigError(f"{key}.name: {cfg.name!r} is not a torchvision dataset",
                          hint=f"did you mean {', '.join(close)}?" if close else "for example MNIST or CIFAR10")
    cls, split, root = getattr(tvd, cfg.name), cfg.split or key.split(".")[-1], Path(str(cfg.path))
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {**cfg.kwargs, "root": str(root), "transform": _transform(cfg)}
    if "download" in params:
        kwargs["download"] = False
    if "train" in params:
        if split not in ("train", "test"):
            raise ConfigError(f"{key}.split: {cfg.name} has only train and test splits, got {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        ds = cls(**kwargs)
    except (RuntimeError, OSError) as e:
        reason = str(e).split(". ")[0]
        raise ConfigError(f"{key}.path: torchvision dataset {cfg.name} ({split}) not found under {root} ({reason})",
                          hint="infl never downloads: put the dataset's files there (for example with "
                               f"torchvision.datasets.{cfg.name}(root, download=True) once)") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot build torchvision.datasets.{cfg.name} ({e})",
                          hint=f"check {key}.split and {key}.kwargs") from e
    targets = _targets(ds)
    names = [str(c) for c in ds.classes] if getattr(ds, "classes", None) is not None else None
    folders = [getattr(ds, "raw_folder", None), root / str(getattr(ds, "base_folder", "")), root / cfg.name]
    folder = next((Path(f) for f in folders if f and Path(f) != root and Path(f).is_dir()), None)
    content = _hash_tree(folder, sorted(p for p in folder.rglob("*") if p.is_file())) if folder else b""
    return Raw([str(i) for i in range(len(targets))], targets, names, ds, content)


def python(cfg: SplitConfig, key: str) -> Raw:
    """Runs user code on purpose. Optional dataset attributes: `ids`, `classes`, `targets`.
    Fingerprint: the function's source file, ids and labels (the inputs are not hashed)."""
    fn = import_object(str(cfg.function), f"{key}.function")
    try:
        ds = fn(**cfg.kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}.kwargs: {cfg.function} does not accept them ({e})") from e
    except Exception as e:
        raise DataError(f"{key}.function: {cfg.function} raised {type(e).__name__}: {e}") from e
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise ConfigError(f"{key}.function: {cfg.function} returned a {type(ds).__name__}, not a Dataset",
                          hint="return a map-style torch Dataset whose items are (x, y)")
    targets = _targets(ds)
    given = getattr(ds, "ids", None)
    ids = [str(i) for i in (given if given is not None else range(len(targets)))]
    if len(ids) != len(targets):
        raise DataError(f"{key}.function: the dataset's ids has {len(ids)} entries for {len(targets)} rows")
    names = [str(c) for c in ds.classes] if getattr(ds, "classes", None) is not None else None
    source = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
    content = Path(source).read_bytes() if source and Path(source).is_file() else b""
    return Raw(ids, targets, names, ds, hashlib.sha256(content + json.dumps(ids).encode()).digest())


def _targets(ds: Any) -> np.ndarray:
    """Labels from `.targets` or `.labels` when present, else one pass over the dataset."""
    for attr in ("targets", "labels"):
        value = getattr(ds, attr, None)
        if value is not None and not callable(value) and len(value) == len(ds):
            return to_numpy(value)
    return to_numpy([ds[i][1] for i in range(len(ds))])


def _hash_tree(root: Path, files: list[Path]) -> bytes:
    """Per file: path relative to `root`, size, and the first and last 64 KiB."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            head = f.read(EDGE)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - EDGE, len(head)))
            h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode() + head + f.read())
    return h.digest()


def _transform(cfg: SplitConfig) -> Callable[[Any], torch.Tensor]:
    """Grayscale(1), Resize (one size means a square, so every image batches), ToTensor, Normalize."""
    from torchvision import transforms as T

    steps: list[Any] = [T.Grayscale(1)] if cfg.grayscale else []
    if cfg.resize:
        steps.append(T.Resize((cfg.resize[0], cfg.resize[-1])))
    steps.append(T.ToTensor())
    if cfg.mean is not None and cfg.std is not None:
        steps.append(T.Normalize(cfg.mean, cfg.std))
    return T.Compose(steps)


def to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], torch.Tensor):
        return torch.stack([torch.as_tensor(v) for v in values]).numpy()
    arr = np.asarray(values)
    return arr.astype(object) if arr.dtype.kind in "USO" else arr
