"""The text of an `infl init` config: commented YAML lines built by hand, every value through yaml.safe_dump.

init_config.py (and init_text.py for text data) infer the facts, an `Inferred`; the functions here write the
blocks: `header` (what was inferred, the next commands, seed/device/batch_size), `model_block` (task and model
for a built-in arch or a factory), `data_block` (the splits), `rest` (solver, train, output). `kv` aligns a
key's comment, `q` writes a value that safe_load reads back unchanged (odd column names stay valid YAML), `rel`
writes a path relative to the config's folder. No torch, no data reading here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

COMMENT_COLUMN = 34
LINE_WIDTH = 110


@dataclass
class Inferred:
    """What the data says: one split's YAML keys, and the facts the model block is built from."""

    split: dict[str, Any]
    rows: int
    in_features: int
    labels: np.ndarray | None = None  # the label values (csv/parquet/tensors)
    classes: list[str] | None = None  # class folder names (imagefolder)
    image: tuple[int, int, int] | None = None  # (channels, height, width) of one input, for image data
    notes: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # csv/parquet: every column but the id and the label
    text: list[str] = field(default_factory=list)  # csv/parquet: the columns that hold free text (init_text)


def header(data: Path, train: Inferred, task_note: str, config_path: Path, batch_size: int = 256) -> list[str]:
    what = f"{train.rows:,} rows" if train.classes is None else f"{train.rows:,} images"
    text = train.split.get("text")
    if train.image is not None:
        what += f" of {train.image[1]}x{train.image[2]}, {train.image[0]} channel{'s' if train.image[0] > 1 else ''}"
    elif text is not None:
        what += f", free text in {' and '.join(map(repr, [text] if isinstance(text, str) else text))}"
    else:
        what += f", {train.in_features} feature{'s' if train.in_features != 1 else ''}"
    lines = [f"# infl config written by `infl init {data}`.",
             f"# Inferred from the training data: {what}; {task_note}."]
    lines += [f"# Note: {note}." for note in train.notes]
    lines += ["# Relative paths are relative to this file's folder. Every key is documented in SPEC.md (Config).",
              "# Next: check it (loads data and model, estimates the cost), train, then rank the rows by suspicion:",
              f"#   infl check -c {config_path} && infl train -c {config_path} && infl selfcheck -c {config_path}",
              "",
              kv("seed", 0, "randomness (training, sampling) is seeded from this"),
              kv("device", "auto", "auto | cpu | cuda | cuda:N"),
              kv("batch_size", batch_size, "rows per batch for gradients and training")]
    return lines


def model_block(arch: str, task: str, outputs: int, train: Inferred, image: tuple[int, int, int] | None,
                checkpoint: str, exists: bool) -> list[str]:
    """task:, model: (a built-in arch or a factory), params: and weight_decay:."""
    c = image[0] if image else None
    size = None if image is None else image[1] if image[1] == image[2] else [image[1], image[2]]
    kwargs: dict[str, Any] = {
        "logreg": {"in_features": train.in_features, "num_classes": outputs},
        "mlp": {"in_features": train.in_features, "hidden": [128], "num_classes": outputs, "activation": "tanh"},
        "cnn": {"in_channels": c, "num_classes": outputs, "image_size": size},
        "resnet18": {"num_classes": outputs, "in_channels": c},
    }.get(arch, {})
    arch_note = {"logreg": "one Linear layer on the flattened input; or mlp, cnn (images), resnet18 (images)",
                 "mlp": "Linear-tanh-...-Linear; tanh trains to a true minimum with L-BFGS more reliably than relu",
                 "cnn": "a small LeNet-style net", "resnet18": "torchvision's, weights never downloaded"}.get(
        arch, "your factory, called with model.kwargs; it must return an nn.Module")
    outputs_note = {"binary": "num_classes: 1, one logit for task binary",
                    "classification": "num_classes: one output per class"}.get(task, "num_classes: the label width")
    lines = [kv("task", task, "classification | binary (one logit) | regression (MSE)"),
             "model:", kv("arch", arch, arch_note, 1)]
    if kwargs:
        lines.append(kv("kwargs", kwargs, outputs_note, 1))
    else:
        facts = {"in_features": train.in_features, "num_outputs": outputs, **({"image": list(image)} if image else {})}
        lines.append(kv("kwargs", {}, f"what your factory needs; the data has {q(facts)}", 1))
    lines.append(kv("checkpoint", checkpoint, "a state_dict, loaded with weights_only=True; " + (
        "it exists: check that it was trained on this data and kwargs" if exists else
        "not there yet: `infl train` writes it"), 1))
    whole = arch in ("cnn", "resnet18")
    lines.append(kv("params", "last_layer" if whole else "all", "all | last_layer | [parameter-name prefixes]; " + (
        "the final Linear layer: an exact Hessian in one pass" if whole else "every parameter")))
    lines.append(kv("weight_decay", 0.001, "the L2 term of the training objective, also part of the Hessian"))
    return lines


def data_block(train: dict[str, Any], test: dict[str, Any] | None, base: Path, found: bool,
               train_comments: tuple[str, ...] = ()) -> list[str]:
    """The data: block; `train_comments` are comment lines written after the train split's keys."""
    lines = ["data:"]
    for role, split in (("train", train), ("test", test)):
        if split is None:
            lines.append("  # test: {format: ..., path: ...}   held-out rows for `infl rank`, `verify` and `explain`")
            continue
        note = " (found next to the training data)" if role == "test" and found else ""
        lines.append(f"  {role}:{'' if not note else '  #' + note}")
        for key, value in split.items():
            if value is None or value == []:
                continue
            lines.append(kv(key, rel(value, base) if isinstance(value, Path) else value, SPLIT_NOTES.get(key, ""),
                            2))
        if split["format"] in ("csv", "parquet") and not split.get("id"):
            lines.append("    # id: COLUMN               no id column found: rows are named by their index")
        if split["format"] == "imagefolder":
            lines.append("    # mean: [..], std: [..]   optional Normalize after ToTensor (one value per channel)")
        if role == "train":
            lines += train_comments
    return lines


SPLIT_NOTES = {
    "format": "csv | parquet | imagefolder | torchvision | tensors | python",
    "text": "the free text the tokenizer reads; [A, B] for pairs",
    "label": "the column (or key) holding each row's given label",
    "id": "each row's id in the reports",
    "carry": "text columns copied into the reports, never used as features",
    "x_key": "the key of the inputs (n, ...)",
    "grayscale": "one channel",
    "resize": "[size] for a square, or [height, width]",
}


def rest(arch: str, data: Path, base: Path) -> list[str]:
    """solver:, train: and output: (the reports go to reports/NAME, NAME from the data's file or folder)."""
    name = data.parent.name if data.stem.lower() in ("train", "training") or data.is_dir() else data.stem
    out = ["output:", kv("dir", rel(base / "reports" / (name or "infl"), base),
                         "where the reports go (--out overrides it)", 1)]
    if arch == "hf":
        return ["solver:", kv("name", "ekfac", "direct | cg | arnoldi | ekfac | auto; ekfac: Kronecker-factored", 1),
                kv("damping", 0.001, "added to the Hessian's diagonal", 1),
                "train:",
                kv("optimizer", "lbfgs", "lbfgs: fit the head on the frozen body; adam: AdamW on params, then that", 1),
                *out]
    small = arch in ("logreg", "cnn", "resnet18")
    optimizer = {"logreg": ["lbfgs", 500, 1.0, 1e-5], "mlp": ["lbfgs", 1000, 1.0, 1e-5]}.get(
        arch, ["adam", 15, 0.003, 1e-4])
    return [
        "solver:",
        kv("name", "direct" if small else "auto", "direct | cg | lissa | arnoldi | ekfac | auto; " + (
            "direct: an exact dense solve" if small else "auto: direct while the Hessian fits in memory"), 1),
        kv("damping", 0.001, "added to the Hessian's diagonal", 1),
        "train:",
        kv("optimizer", optimizer[0], "lbfgs | adam | sgd; adam/sgd end with an L-BFGS polish of params", 1),
        kv("epochs", optimizer[1], "", 1),
        kv("lr", optimizer[2], "", 1),
        kv("tol", optimizer[3], "stop when the objective's gradient norm is below this", 1),
        *out,
    ]


def kv(key: str, value: Any, note: str, depth: int = 0) -> str:
    """`key: value  # note`, the note aligned at COMMENT_COLUMN, or on its own line above when it would not fit."""
    indent = "  " * depth
    text = f"{indent}{key}: {q(value)}"
    if not note:
        return text
    line = f"{text.ljust(COMMENT_COLUMN - 1)} # {note}"
    return line if len(line) <= LINE_WIDTH else f"{indent}# {note}\n{text}"


def q(value: Any) -> str:
    """A YAML flow scalar/list/mapping that safe_load reads back as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def rel(path: Path, base: Path) -> str:
    """`path` relative to the config's folder `base`; absolute when the two share only the root."""
    target = Path(path).resolve()
    if os.path.commonpath([target, base]) == target.anchor:
        return target.as_posix()
    return Path(os.path.relpath(target, base)).as_posix()


