"""Example user code for `format: python` and `model.arch: module:factory` (see digits_python.yaml).

infl imports hooks from the config file's folder and the current directory. This runs your code on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset


class DigitsCsv(Dataset):
    """(x, y) rows of a digits CSV; `ids` and `classes` are optional attributes infl uses when present."""

    def __init__(self, path: str) -> None:
        frame = pd.read_csv(Path(__file__).parent / path)  # relative to this file
        self.ids = frame["id"].astype(str).tolist()
        self.targets = torch.tensor(frame["label"].to_numpy().copy(), dtype=torch.long)
        pixels = frame[[f"p{i}" for i in range(64)]].to_numpy(dtype=np.float32)
        self.x = torch.from_numpy(pixels).view(-1, 1, 8, 8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def digits_dataset(path: str) -> Dataset:
    return DigitsCsv(path)


def tiny_convnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))
