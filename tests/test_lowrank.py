"""The low-rank screen (lowrank.py): its per-pair bound holds deterministically, it is tight when the held solves
are low rank, it declines when they are not, and rank's top K equals the plain float32 product's with it.

References: float64 products of the float32 inputs (the exact value of h . g), and the plain float32 product's
top K through the same merge rank uses.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from influence_cli import lowrank as lowrank_mod
from influence_cli.commands.rank import _empty_top, merge_top
from influence_cli.lowrank import LowRankScreen

OUT, IN = 96, 95  # a Linear layer with bias: in' = 96, low rank pays up to k = 12
REST = 37  # columns of parameters outside the screened layer


def _case(t_count: int, rows: int, rank: int | None, noise: float, seed: int = 0):
    """(held (T, p), layers, slots, factors (r (B, 1, out), a (B, 1, in)), grads (B, p)): one screened Linear layer
    whose held parts are rank-`rank` plus `noise` (None: full rank), then REST other columns."""
    gen = torch.Generator().manual_seed(seed)
    wide = IN + 1
    if rank is None:
        parts = torch.randn(t_count, OUT, wide, generator=gen)
    else:
        parts = torch.randn(t_count, OUT, rank, generator=gen) @ torch.randn(t_count, rank, wide, generator=gen)
        parts += noise * torch.randn(t_count, OUT, wide, generator=gen)
    held = torch.cat([parts[:, :, :IN].reshape(t_count, -1), parts[:, :, IN], torch.randn(t_count, REST, generator=gen)],
                     1)
    slots = {"fc.weight": slice(0, OUT * IN), "fc.bias": slice(OUT * IN, OUT * IN + OUT)}
    layer = types.SimpleNamespace(path="fc", module=nn.Linear(IN, OUT), weight="fc.weight", bias="fc.bias")
    r = torch.randn(rows, 1, OUT, generator=gen) * torch.rand(rows, 1, 1, generator=gen) ** 3
    a = torch.randn(rows, 1, IN, generator=gen)
    grads = torch.cat([(r[:, 0, :, None] * a[:, 0, None, :]).reshape(rows, -1), r[:, 0],
                       torch.randn(rows, REST, generator=gen)], 1)
    return held, [layer], slots, (layer, a, r), grads


@pytest.mark.parametrize("rank,noise", [(3, 1e-4), (3, 1e-2), (5, 0.0)])
def test_the_bound_holds_for_every_pair_and_is_tight_when_the_solves_are_low_rank(rank, noise):
    held, layers, slots, factors, grads = _case(40, 300, rank, noise)
    screen, info = LowRankScreen.build(held, layers, slots)
    assert screen is not None and info["used"] and info["ranks"] == {"fc": lowrank_mod.MIN_RANK}
    approx, margin = screen.bounds(grads, [factors])
    exact = held.double() @ grads.double().T
    err = (approx.double() - exact).abs()
    assert bool((err <= margin.double()).all())  # deterministic: every pair
    scale = held.double().norm(dim=1)[:, None] * grads.double().norm(dim=1)[None]
    assert float((margin.double() / scale).median()) < 10 * noise + 1e-4  # tight: residual-sized
    if noise:  # the residual dominates the bound (without noise: float32 rounding's worst case, far above it)
        assert float((err / margin.double()).max()) > 1e-3


def test_a_block_without_factors_for_the_layer_is_scored_exactly():
    held, layers, slots, _, grads = _case(10, 50, 3, 1e-3)
    screen, _ = LowRankScreen.build(held, layers, slots)
    approx, margin = screen.bounds(grads, None)
    exact = held.double() @ grads.double().T
    assert bool(((approx.double() - exact).abs() <= margin.double()).all())
    assert screen.stats["exact_layer_blocks"] == 1


def test_full_rank_solves_and_small_layers_are_declined():
    held, layers, slots, _, _ = _case(20, 10, None, 0.0)
    screen, info = LowRankScreen.build(held, layers, slots)
    assert screen is None and info["used"] is False and "not low rank" in info["reason"]
    small = types.SimpleNamespace(path="fc", module=nn.Linear(12, 10), weight="fc.weight", bias="fc.bias")
    screen, info = LowRankScreen.build(torch.randn(5, 130), [small], {"fc.weight": slice(0, 120),
                                                                      "fc.bias": slice(120, 130)})
    assert screen is None and "no Linear layer" in info["reason"]


def _stream_top(held, grads, factors, k, block, screen, n):
    t_count = len(held)
    helpful, harmful = _empty_top(t_count, k)
    layer, a, r = factors
    for s in range(0, len(grads), block):
        g, idx = grads[s : s + block], torch.arange(s, min(s + block, len(grads)))
        if screen is None:
            scores = held @ g.T / n
            merge_top(helpful, 0, t_count, scores, idx, largest=True)
            merge_top(harmful, 0, t_count, scores, idx, largest=False)
        else:
            above, below = helpful[0].min(1).values.float(), harmful[0].max(1).values.float()
            high, low = screen.scores(g, 1.0 / n, k, torch.nextafter(above, torch.tensor(-math.inf)),
                                      torch.nextafter(below, torch.tensor(math.inf)),
                                      factors=[(layer, a[s : s + block], r[s : s + block])])
            merge_top(helpful, 0, t_count, high, idx, largest=True)
            merge_top(harmful, 0, t_count, low, idx, largest=False)
    return helpful, harmful


@pytest.mark.parametrize("noise", [1e-3, 0.3])  # 0.3: a loose bound (forced below), many pairs rescored
def test_screened_top_k_equals_float32(monkeypatch, noise):
    monkeypatch.setattr(lowrank_mod, "RESIDUAL_TOL", 10.0)  # accept the rank even when the bound is loose
    held, layers, slots, factors, grads = _case(30, 2000, 3, noise, seed=2)
    n = len(grads)
    for k in (1, 10):
        screen, _ = LowRankScreen.build(held, layers, slots)
        want = _stream_top(held, grads, factors, k, 128, None, n)
        got = _stream_top(held, grads, factors, k, 128, screen, n)
        for side in (0, 1):
            assert torch.equal(got[side][1].sort(1).values, want[side][1].sort(1).values)
            assert torch.allclose(got[side][0].sort(1).values, want[side][0].sort(1).values, rtol=1e-5, atol=1e-9)
        assert 0 < screen.stats["rescored"] < screen.stats["pairs"]
        if noise < 0.01:
            assert screen.stats["rescored"] < 0.1 * screen.stats["pairs"]  # tight: few pairs rescored


def test_rank_with_the_low_rank_screen_equals_without(tmp_path, capsys, monkeypatch):
    """End to end: an MLP with two 96-wide hidden layers, EK-FAC, rank.screen auto (the low-rank screen; its
    tolerance opened so it is used whatever the held solves) against false: the same helpful and harmful rows in
    the same order, values within float32 rounding, overall.csv identical."""
    from conftest import run_cli

    monkeypatch.setattr(lowrank_mod, "RESIDUAL_TOL", 10.0)
    monkeypatch.setattr(lowrank_mod, "MIN_FLOPS", 0.0)  # a small product: the screen is tried all the same
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 40))
    y = (x[:, :3] @ rng.normal(size=(3, 5))).argmax(1)
    y[rng.choice(3000, 300, replace=False)] = rng.integers(0, 5, 300)
    for name, rows in (("train", slice(0, 2800)), ("test", slice(2800, 3000))):
        frame = pd.DataFrame(x[rows], columns=[f"f{i}" for i in range(40)])
        frame.insert(0, "id", [f"{name}{i}" for i in range(len(frame))])
        frame["label"] = y[rows]
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {arch: mlp, kwargs: {in_features: 40, hidden: [96, 96], num_classes: 5}, checkpoint: m.pt}\n"
        "data:\n  train: {format: csv, path: train.csv, label: label, id: id}\n"
        "  test: {format: csv, path: test.csv, label: label, id: id}\n"
        "solver: {name: ekfac, damping: 0.001, ekfac: {refine: 0}}\n"
        "train: {optimizer: adam, epochs: 3, lr: 0.01, polish: false}\ncache: {enabled: false}\n")
    assert run_cli(capsys, "train", "-c", str(config), "--quiet")[0] == 0
    docs = {}
    for mode in ("auto", "false"):
        code, out, err = run_cli(capsys, "rank", "-c", str(config), "-o", str(tmp_path / mode), "--json",
                                 "--set", f"rank.screen={mode}", "--set", "solver.ekfac.refine=0")
        assert code == 0, err
        docs[mode] = json.loads(out)
    low = docs["auto"]["scoring"]["low_rank"]
    assert low["used"] is True and low["ranks"] and 0 < low["rescored"] < low["pairs"]
    assert "low_rank" not in docs["false"]["scoring"]
    for name in ("helpful.csv", "harmful.csv"):
        a, b = (pd.read_csv(tmp_path / mode / name) for mode in ("false", "auto"))
        pd.testing.assert_frame_equal(a.drop(columns="loss_change_if_removed"), b.drop(columns="loss_change_if_removed"))
        scale = float(a.loss_change_if_removed.abs().max())
        assert float((a.loss_change_if_removed - b.loss_change_if_removed).abs().max()) <= 1e-5 * scale
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "false" / "overall.csv"),
                                  pd.read_csv(tmp_path / "auto" / "overall.csv"))
