"""Text rows: tokenized once by the model folder's tokenizer, kept in memory, padded per batch.

`tokenize` turns one text column (or two, for sentence pairs) into an integer tensor (n, C, L_max): channel 0
the token ids, 1 the attention mask, 2 the token type ids when the tokenizer makes them (hf.py reads them in
this order), each row right-padded with the tokenizer's pad id and mask 0. `TextRows` is the dataset: a batch
is cut to its own longest row (dynamic padding), so a row's gradient does not depend on its neighbours
(padding changes nothing: the mask hides it from attention, and the classifier reads the first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import hf
from .data import TensorRows
from .errors import DataError

CHANNELS = ("input_ids", "attention_mask", "token_type_ids")


class TextRows(TensorRows):
    """x (n, C, L_max) int64 packed tokens, y labels, lengths (n,) tokens per row; row i is x[i, :, :lengths[i]]."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        self.lengths = x[:, 1].sum(dim=1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i, :, : int(self.lengths[i])], self.y[i]

    def trim(self, x: Tensor, idx: Tensor) -> Tensor:
        """A batch of rows `idx` cut to its longest row."""
        return x[:, :, : int(self.lengths[idx].max())] if len(idx) else x


def column(values: pd.Series, ids: Sequence[str], key: str) -> list[str]:
    """A text column as a list of str; a missing value is a DataError naming the row."""
    missing = np.nonzero(values.isna().to_numpy())[0]
    if len(missing):
        shown = ", ".join(repr(ids[int(i)]) for i in missing[:5])
        raise DataError(f"{key}: missing text at row ids {shown}", hint="fill those rows (an empty string is text)")
    return [str(v) for v in values]


def tokenize(columns: list[list[str]], tokenizer_dir: Path | None, max_length: int | None, key: str) -> Tensor:
    """(n, C, L_max) int64, truncated to `max_length` tokens (default: the model's limit, hf.max_positions)."""
    tok = hf.load_tokenizer(tokenizer_dir)
    limit = max_length or hf.max_positions(tokenizer_dir, tok)
    try:
        enc = tok(*columns, truncation=True, max_length=limit, padding=False)
    except (ValueError, TypeError) as e:
        raise DataError(f"{key}.text: the tokenizer of {tokenizer_dir} cannot encode the text ({e})") from e
    names = [c for c in CHANNELS if c in enc]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise DataError(f"{key}.text: the tokenizer of {tokenizer_dir} returns {list(enc)}, without input_ids and "
                        "attention_mask", hint="use the tokenizer the model was trained with")
    rows = enc["input_ids"]
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        raise DataError(f"{key}.text: every row tokenizes to nothing", hint="check the text column")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.zeros(len(rows), len(names), width, dtype=torch.int64)
    x[:, 0] = pad
    for i in range(len(rows)):
        for c, name in enumerate(names):
            values = enc[name][i]
            x[i, c, : len(values)] = torch.as_tensor(values, dtype=torch.int64)
    return x
