"""Out-of-fold outputs (`selfcheck --cross-fit K`): what a model that never saw a row predicts for it.

For a model that memorizes its training labels (an MLP with little weight decay), one fit cannot tell a
flipped label it learned from a clean one: the training loss is ~0 for both, and the influence (Newton)
estimate of leaving a row out sees only the local curvature around the memorizing minimum. Cross-fitting
asks the question directly, as confident learning does (Northcutt et al. 2021): the rows are split into K
folds stratified by label (seeded by `seed`), and for each fold a fresh model (the configured
architecture, initialized with seed + 1 + fold) is trained with the configured recipe (`train:`, the same
as `infl train`) on the other K - 1 folds; its outputs on the held-out fold are that fold's out-of-fold
outputs. The removed rows keep n fixed in the objective (weights 0, as `infl verify` retrains), so the
data term is (K-1)/K of the full one's against the same weight decay.

Cost: K trainings (`infl train` K times on (K-1)/K of the rows) plus one forward pass; memory as
`infl train`. The checkpoint is not used for the out-of-fold outputs, only to score the training loss.
`estimate_seconds` bounds that cost before it is spent (what `selfcheck.cross_fit: auto` decides on).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from .config import Config
from .data import CastLoader, Split, make_loader
from .errors import ConfigError
from .models import build_model
from .objective import Objective
from .train import minimize

ProgressFn = Callable[..., None]  # progress(phase, done, total, **info), the CLI's


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold index in 0..folds-1: each label's rows shuffled (seeded) and dealt round-robin, so every
    fold holds about 1/folds of each class. Regression targets: one stratum."""
    n = len(labels)
    if folds < 2 or folds > n:
        raise ConfigError(f"--cross-fit: must be between 2 and the number of rows ({n}), got {folds}")
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    strata = labels if labels.dtype.kind in "iub" else np.zeros(n, dtype=np.int64)
    start = 0
    for value in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == value))
        out[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)
    return out


AUTO_FOLDS = 5  # selfcheck.cross_fit: auto
AUTO_MIN_ROWS = 2 * AUTO_FOLDS  # auto cross-fits no smaller training set: each fold holds out at least two rows


def training_passes(cfg: Config) -> int:
    """Passes over the data one training with the `train:` recipe makes at most: L-BFGS evaluates the full
    objective at most epochs * 5/4 times (torch's max_eval), adam/sgd run `epochs` epochs; plus the final
    evaluation `minimize` always makes."""
    return (cfg.train.epochs * 5 // 4 if cfg.train.optimizer == "lbfgs" else cfg.train.epochs) + 1


def estimate_seconds(cfg: Config, split: Split, objective: Objective, device: torch.device, dtype: torch.dtype,
                     folds: int, budget: float = float("inf")) -> float:
    """An upper estimate of out_of_fold_outputs' wall time: folds x training_passes x one pass over the data. A
    pass is priced on the first batch as the trainings run it (a fresh model in their dtype): `minimize` itself,
    with the recipe cut to PROBE_EPOCHS, on that batch alone (the optimizer's own work, the weight decay term)
    per pass it made, plus a warm forward and backward of a full batch for each further batch. L-BFGS usually
    stops at train.tol before its last evaluation, so the trainings take less. When the forward and backward
    passes alone already exceed `budget`, that lower figure is returned without the probe (a large model's
    estimate then costs a few batches, not a few trainings' worth)."""
    if split.n == 0:
        return 0.0
    work = torch.float64 if cfg.train.optimizer == "lbfgs" else dtype
    model = _fresh(cfg, device, work, cfg.seed + 1)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    rows = min(cfg.batch_size, split.n)
    first = CastLoader(make_loader(split, cfg.batch_size, rows=range(rows)), work)  # the first batch, as loaded

    def forward_backward() -> None:
        for _, x, y in first:
            objective.per_example_loss(model(x.to(device)), y.to(device)).sum().backward()
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    forward_backward()  # warm: allocations, kernel selection
    one = time.perf_counter() - start
    for _ in range(3 if one < 1.0 else 1):
        start = time.perf_counter()
        forward_backward()
        one = min(one, time.perf_counter() - start)
    batches = -(-split.n // rows)
    floor = folds * training_passes(cfg) * batches * one
    if floor > budget:
        return floor
    passes = [0]

    def count(done: int, total: int, **_: object) -> None:
        passes[0] += 1

    minimize(model, params, objective, first, rows, replace(cfg.train, epochs=1, tol=1e-300), shuffled=first)  # warm
    passes[0] = 1  # minimize's final evaluation
    start = time.perf_counter()
    minimize(model, params, objective, first, rows, replace(cfg.train, epochs=PROBE_EPOCHS, tol=1e-300),
             shuffled=first, progress=count)
    per_pass = (time.perf_counter() - start) / passes[0]
    return folds * training_passes(cfg) * (per_pass + (batches - 1) * one)


PROBE_EPOCHS = 4


def out_of_fold_outputs(cfg: Config, split: Split, objective: Objective, device: torch.device,
                        dtype: torch.dtype, folds: int, progress: ProgressFn | None = None, *,
                        assignment: np.ndarray | None = None, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """(n, C) float64: each row's model output from the fold model that did not train on it. progress
    gets phase "cross_fit", counting L-BFGS evaluations or epochs over the folds trained here. `assignment`:
    each row's fold (default: stratified_folds of the labels, seeded by cfg.seed). `part` (r, R): train only
    the folds k with k mod R = r (torchrun rank r of R); the other folds' rows stay 0, so the sum over the R
    parts is the whole (a fold's model depends on its seed, not on who trains it)."""
    labels = split.labels.numpy().reshape(split.n)
    fold = assignment if assignment is not None else stratified_folds(
        labels.astype(np.int64) if objective.task != "regression" else labels, folds, cfg.seed)
    out: np.ndarray | None = None
    work = torch.float64 if cfg.train.optimizer == "lbfgs" else dtype
    mine = [k for k in range(folds) if k % part[1] == part[0]]
    for step, k in enumerate(mine):
        model = _fresh(cfg, device, work, cfg.seed + 1 + k)
        exclude = torch.from_numpy(fold == k)
        generator = torch.Generator().manual_seed(cfg.seed + 1 + k)
        shuffled = CastLoader(make_loader(split, cfg.batch_size, shuffle=True, generator=generator), work)
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        minimize(model, params, objective, CastLoader(make_loader(split, cfg.batch_size), work), split.n, cfg.train,
                 exclude=exclude, shuffled=shuffled,
                 progress=None if progress is None else _fold_progress(progress, step, len(mine)))
        for p in params:
            p.requires_grad_(False)
        held = _outputs(model, split, cfg.batch_size, work, np.flatnonzero(fold == k))
        if out is None:
            out = np.zeros((split.n, held[1].shape[1]))
        out[held[0]] = held[1]
    if out is None:  # no fold here (more ranks than folds): zeros of the model's output width
        model = _fresh(cfg, device, work, cfg.seed + 1)
        width = _outputs(model, split, cfg.batch_size, work, np.arange(min(split.n, 1)))[1].shape[1]
        out = np.zeros((split.n, width))
    return out


def _fresh(cfg: Config, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the global RNG
        torch.manual_seed(seed)
        return build_model(cfg.model).to(device=device, dtype=dtype).train(False)


def _outputs(model: nn.Module, split: Split, batch_size: int, dtype: torch.dtype,
             rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx_all, outs = [], []
    device = next(model.parameters()).device
    keep = torch.zeros(split.n, dtype=torch.bool)
    keep[torch.from_numpy(rows)] = True
    with torch.no_grad():
        for idx, x, _ in CastLoader(make_loader(split, batch_size), dtype):
            sel = keep[idx]
            if not bool(sel.any()):
                continue
            o: Tensor = model(x[sel.to(x.device)].to(device)).double().cpu()
            idx_all.append(idx[sel].numpy())
            outs.append(o.reshape(int(sel.sum()), -1).numpy())
    if not outs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 1))
    return np.concatenate(idx_all), np.concatenate(outs)


def _fold_progress(progress: ProgressFn, k: int, folds: int) -> ProgressFn:
    def tick(done: int, total: int, **info: object) -> None:
        progress("cross_fit", k * total + done, folds * total, **info)

    return tick
