"""The bfloat16 screen (screen.py): stochastic rounding, the per-pair error bound, and top K equal to float32's.

References: float64 products (the exact value of h . g for float32 inputs), and the plain float32 product's top K
through the same merge rank uses. The adversarial case is data whose round-to-nearest errors align (equal
values): there the deterministic bfloat16 product misses its bound while the stochastic one keeps it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from influence_cli import screen as screen_mod
from influence_cli.commands.rank import _empty_top, merge_top
from influence_cli.screen import Screen, chunk_norms, plan, stochastic_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above float32 x (truncation and its next value in magnitude)."""
    bits = x.view(torch.int32)
    down = (bits & ~0xFFFF).view(torch.float32)
    up = torch.where((bits & 0xFFFF) == 0, bits, (bits & ~0xFFFF) + 0x10000).view(torch.float32)
    lo, hi = torch.minimum(down, up), torch.maximum(down, up)
    return lo, hi


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(60, generator=gen) * 10.0 ** torch.randint(-6, 6, (60,), generator=gen),
                   torch.tensor([0.0, -0.0, 1.0, -3.0, 0.1, -0.1, 1e-30, 3.3e38])])
    reps = 4000
    rounded = stochastic_bf16(x.repeat(reps, 1), generator=torch.Generator().manual_seed(2)).float()
    lo, hi = _neighbours(x)
    assert bool(((rounded == lo) | (rounded == hi)).all())
    # unbiased: the mean over draws is x within 5 standard errors of a two-point draw (ulp / (2 sqrt(reps)))
    err = (rounded.double().mean(0) - x.double()).abs()
    assert bool((err <= 5 * (hi - lo).double() / (2 * math.sqrt(reps)) + 1e-300).all())
    # exactly representable values never move
    exact = torch.tensor([1.0, -2.0, 0.5, 0.0, 384.0]).repeat(50, 1)
    assert torch.equal(stochastic_bf16(exact, generator=torch.Generator().manual_seed(3)).float(), exact)


def test_chunk_norms_are_squared_4_norms():
    x = torch.randn(5, 3 * screen_mod.COLUMNS // 2 + 37, dtype=torch.float32)
    got = chunk_norms(x).double()
    c = screen_mod.CHUNK
    want = torch.stack([x[:, s : s + c].double().pow(4).sum(1).sqrt() for s in range(0, x.shape[1], c)], 1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=0)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    t, b, p = 30, 40, 5000
    gauss = (torch.randn(t, p, generator=gen), torch.randn(b, p, generator=gen))
    heavy = (torch.randn(t, p, generator=gen) ** 3, torch.randn(b, p, generator=gen) ** 5)
    # round-to-nearest errors align: every entry the same non-representable value, signs of g follow h's
    h = torch.full((t, p), 0.30078125 + 2.0**-11)
    aligned = (h, torch.full((b, p), 0.7 + 2.0**-12))
    sparse = gauss[0] * (torch.rand(t, p, generator=gen) < 0.05), gauss[1] * (torch.rand(b, p, generator=gen) < 0.5)
    return {"gauss": gauss, "heavy": heavy, "aligned": aligned, "sparse": sparse}


@pytest.mark.parametrize("case", ["gauss", "heavy", "aligned", "sparse"])
def test_bound_holds_for_every_pair(case):
    held, grads = _cases()[case]
    screen = Screen.build(held, len(grads), seed=5)
    approx, margin = screen.bounds(grads)
    exact = held.double() @ grads.double().T
    assert bool(((approx.double() - exact).abs() <= margin.double()).all())
    if case == "aligned":  # deterministic rounding breaks a bound of the same size: the reason for the dither
        nearest = (held.bfloat16() @ grads.bfloat16().T).double()
        assert bool(((nearest - exact).abs() > margin.double()).all())
    if case == "gauss":  # and the bound is useful: far below |h||g|
        scale = held.double().norm(dim=1)[:, None] * grads.double().norm(dim=1)[None]
        assert float((margin.double() / scale).max()) < 0.01


def _stream_top(held: torch.Tensor, grads: torch.Tensor, k: int, block: int, use_screen: bool, n: int):
    t_count = len(held)
    helpful, harmful = _empty_top(t_count, k)
    screen = Screen.build(held, block) if use_screen else None
    for s in range(0, len(grads), block):
        g, idx = grads[s : s + block], torch.arange(s, min(s + block, len(grads)))
        if screen is None:
            scores = held @ g.T / n
            merge_top(helpful, 0, t_count, scores, idx, largest=True)
            merge_top(harmful, 0, t_count, scores, idx, largest=False)
        else:
            above, below = helpful[0].min(1).values.float(), harmful[0].max(1).values.float()
            high, low = screen.scores(g, 1.0 / n, k, torch.nextafter(above, torch.tensor(-math.inf)),
                                      torch.nextafter(below, torch.tensor(math.inf)))
            merge_top(helpful, 0, t_count, high, idx, largest=True)
            merge_top(harmful, 0, t_count, low, idx, largest=False)
    return helpful, harmful, screen


@pytest.mark.parametrize("pair_cost", [0, 10**9])  # 0: gathered pairs; huge: candidate columns scored densely
def test_screened_top_k_equals_float32(monkeypatch, pair_cost):
    monkeypatch.setattr(screen_mod, "PAIR_COST", pair_cost)
    gen = torch.Generator().manual_seed(6)
    t_count, p, n = 50, 3000, 2400
    basis = torch.randn(8, p, generator=gen)  # gradients near a low-dimensional subspace, as real ones are
    held = torch.randn(t_count, 8, generator=gen) @ basis + 0.3 * torch.randn(t_count, p, generator=gen)
    scale = torch.rand(n, 1, generator=gen) ** 4 * 3  # a few rows with large gradients
    grads = (torch.randn(n, 8, generator=gen) @ basis + 0.3 * torch.randn(n, p, generator=gen)) * scale
    for k in (1, 10):
        want = _stream_top(held, grads, k, 128, False, n)
        got = _stream_top(held, grads, k, 128, True, n)
        for side in (0, 1):
            assert torch.equal(got[side][1].sort(1).values, want[side][1].sort(1).values)
            assert torch.allclose(got[side][0].sort(1).values, want[side][0].sort(1).values, rtol=1e-5, atol=1e-9)
        stats = got[2].stats
        assert 0 < stats["rescored"] < 0.5 * stats["pairs"]  # the screen saved most pairs
        branch = "screened_blocks" if pair_cost == 0 else "dense_blocks"
        assert stats[branch] > 0


def test_plan_declines_float64_false_few_rows_and_small_products():
    cpu = torch.device("cpu")
    assert plan(False, torch.float32, 1000, 10**5, 10**5, cpu)[0] is False
    used, info = plan("auto", torch.float64, 1000, 10**5, 10**5, cpu)
    assert used is False and "float64" in info["reason"]
    assert plan("auto", torch.float32, 4, 10**5, 10**5, cpu)[0] is False
    used, info = plan("auto", torch.float32, 100, 1000, 1000, cpu)
    assert used is False and "small product" in info["reason"]
    used, info = plan(True, torch.float32, 4, 10**5, 10, cpu)
    assert used is True and info["miss_probability_per_pair"] == screen_mod.MISS


def test_rank_with_screen_equals_without(tmp_path):
    """End to end on the digits MLP with small shards (the floor passes between shards): the same helpful and
    harmful rows in the same order, values within float32 rounding."""
    from influence_cli import api
    from influence_cli.config import load_config

    root = Path(__file__).resolve().parents[1]
    reports = {}
    for mode in ("true", "false"):
        cfg = load_config(root / "configs" / "digits_mlp.yaml",
                          [f"rank.screen={mode}", "cache.enabled=false", "cache.shard_rows=256",
                           "solver.name=ekfac", "solver.ekfac.refine=0", f"output.dir={tmp_path / mode}"])
        reports[mode] = api.rank(cfg, test_ids=None)
    info = reports["true"].summary["scoring"]["screen"]
    assert info["used"] is True and 0 < info["rescored"] < info["pairs"]
    assert reports["false"].summary["scoring"]["screen"]["used"] is False
    for name in ("helpful.csv", "harmful.csv"):
        a, b = reports["false"].tables[name], reports["true"].tables[name]
        pd.testing.assert_frame_equal(a.drop(columns="loss_change_if_removed"), b.drop(columns="loss_change_if_removed"))
        scale = float(a.loss_change_if_removed.abs().max())
        assert float((a.loss_change_if_removed - b.loss_change_if_removed).abs().max()) <= 1e-5 * scale
    pd.testing.assert_frame_equal(reports["false"].tables["overall.csv"], reports["true"].tables["overall.csv"])
    json.dumps(info)  # the summary stays JSON


def test_auto_calibrates_and_says_why():
    """auto on a large product measures the device and reports the prediction, whichever way it decides."""
    used, info = plan("auto", torch.float32, 64, 20000, 100000, torch.device("cpu"))
    assert info["predicted_cost_ratio"] > 0 and info["float32_block_s"] > 0
    assert used is (info["predicted_cost_ratio"] <= screen_mod.MAX_COST_RATIO)
    assert used or "predicted" in info["reason"]
