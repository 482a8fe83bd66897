"""The measuring half of benchmarks/solvers.py: the workload, the cost probe, and one cell, each run in a
fresh process (the parent reads their JSON; peak RSS is the process's own).

A cell runs the phases its plan names, in order, and rewrites result.json after each, so a cell killed for
overrunning keeps what it finished:
  fit        make_solver(cfg.solver).fit(problem); "standin": fit on the first rows only (arnoldi: one
             Krylov pass on 256 rows; ekfac: 1,024 rows), to time scoring when the real fit is too costly
  si         self-influence g^T H^-1 g: api.selfcheck's route (squared norms of half_ihvp, EK-FAC's
             self_influence_blocks, or one batched solve per block of rows for cg/lissa) over all rows
             ("full"), the first 512 rows ("sample"), or 64 seeded random rows gathered into one
             block, one solve ("solve_sample", cg/lissa)
  grads      GradientSource.per_example alone, gradients discarded: all rows or the first 512
  tt         `infl rank`'s route: ihvp of the 20 test gradients and their mean, then one streamed pass of
             loss_change_if_removed over the training gradients
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli import api
from influence_cli.config import ModelConfig, load_config
from influence_cli.data import CastLoader, make_loader
from influence_cli.gradients import GradientSource
from influence_cli.models import build_model, save_checkpoint
from influence_cli.run import Run
from influence_cli.scores import loss_change_if_removed, self_influence
from influence_cli.solvers import RowScorer, make_solver
from influence_cli.solvers.ekfac import EkfacSolver

MODELS = {"mlp10k": [128], "mlp1m": [1024, 1024]}
SETTINGS = {"weight_decay": 0.01, "batch_size": 1024, "device": "cpu", "seed": 0,
            "solver": {"damping": 1e-3, "hessian": "gauss_newton", "cg": {"max_iter": 100},
                       "lissa": {"depth": 500, "batch_size": 256}, "arnoldi": {"rank": 50}}}
TEST_ROWS, SOLVE_SAMPLE, FIRST_ROWS = 20, 64, 512
STANDIN_ROWS = {"arnoldi": 256, "ekfac": 1024}


def make_workload(folder: Path, sizes: list[int], models: list[str], train_rows: int) -> dict[str, Any]:
    """Data (train_N.pt: the first N rows of one draw; test.pt), checkpoints, a config per (model, n)."""
    gen = torch.Generator().manual_seed(0)
    total = max(*sizes, train_rows)
    teacher = torch.randn(64, 10, generator=gen) * 3 / 8
    x = torch.randn(total + TEST_ROWS, 64, generator=gen)
    y = (x @ teacher - torch.log(-torch.log(torch.rand(len(x), 10, generator=gen)))).argmax(1)  # + Gumbel noise
    for n in sorted({*sizes, train_rows}):
        torch.save({"x": x[:n].clone(), "y": y[:n].clone()}, folder / f"train_{n}.pt")
    torch.save({"x": x[total:].clone(), "y": y[total:].clone()}, folder / "test.pt")
    info: dict[str, Any] = {}
    for model in models:
        kwargs = {"in_features": 64, "hidden": MODELS[model], "num_classes": 10}
        ckpt = folder / f"{model}.pt"
        base = {**SETTINGS, "model": {"arch": "mlp", "kwargs": kwargs, "checkpoint": str(ckpt)}}
        if model == "mlp10k":  # near an optimum, for agreement: `infl train` with adam, then the L-BFGS polish
            train = {**base, "batch_size": 256, "train": {"optimizer": "adam", "lr": 0.003, "epochs": 15},
                     "data": {"train": {"format": "tensors", "path": str(folder / f"train_{train_rows}.pt")}}}
            (folder / "train.json").write_text(json.dumps(train))
            start = time.perf_counter()
            summary = api.train(load_config(folder / "train.json")).summary
            info[model] = {"trained_on_rows": train_rows, "seconds": round(time.perf_counter() - start, 1),
                           "grad_norm": float(f"{summary['grad_norm']:.3g}"),
                           "objective": float(f"{summary['objective']:.4g}")}
        else:  # timings and memory only
            torch.manual_seed(0)
            save_checkpoint(build_model(ModelConfig(arch="mlp", kwargs=kwargs)), ckpt)
            info[model] = {"trained_on_rows": 0, "note": "seeded random initialization"}
        for n in sizes:
            cfg = {**base, "data": {"train": {"format": "tensors", "path": str(folder / f"train_{n}.pt")},
                                    "test": {"format": "tensors", "path": str(folder / "test.pt")}}}
            (folder / f"{model}_{n}.json").write_text(json.dumps(cfg))
    return info


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_of(fn: Callable[[], Any], cheap: float = 10.0) -> float:
    """Seconds of fn: the fastest of three runs when one takes under `cheap` seconds, else of two (other jobs
    share the cores: a single timing can be several times too slow)."""
    first = timed(fn)[0]
    return min(first, *(timed(fn)[0] for _ in range(2 if first < cheap else 1)))


def matmul_flops() -> float:
    a = torch.randn(1024, 1024, dtype=torch.float64)
    a @ a
    return 2 * 1024**3 / min(timed(lambda: a @ a)[0] for _ in range(8))


class OneBlock:
    """Rows `rows` of a loader of (idx, x, y) gathered into ONE batch: cg/lissa then solve them at once."""

    def __init__(self, loader: Any, rows: torch.Tensor, n: int) -> None:
        self.loader, self.mask = loader, torch.zeros(n, dtype=torch.bool)
        self.mask[rows] = True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        parts = [(i[k], x[k], y[k]) for i, x, y in self.loader if bool((k := self.mask[i]).any())]
        yield tuple(torch.cat(t) for t in zip(*parts, strict=True))


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Costs on the first rows (seconds per row unless noted): per-example gradients, HVP passes of k
    vectors, lissa's minibatch steps (seconds per step), arnoldi's half_ihvp, EK-FAC fit and scoring."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["config"], spec["overrides"])
    inp = api.open_run(cfg)
    p = inp.problem.params.size
    m = min(inp.problem.n, 2048 if p < 100_000 else 256)
    sub = dataclasses.replace(inp.problem, train_loader=inp.stream(inp.train, range(m)), n=m)
    source = GradientSource(sub)
    for _ in source.per_example(inp.stream(inp.train, range(8))):  # warm-up
        pass
    source.hvp(torch.randn(1, p, dtype=torch.float64))
    res: dict[str, Any] = {"p": p, "rows": m, "flops": matmul_flops()}
    res["grad"] = best_of(lambda: [b.grads.sum() for b in source.per_example(sub.train_loader)]) / m
    for k in (4, 21, 70) + ((256,) if p <= 20_000 else ()):
        v = torch.randn(k, p, dtype=torch.float64)
        res[f"hvp{k}"] = best_of(lambda v=v: source.hvp(v)) / m
    batch = min(m, cfg.solver.lissa.batch_size or cfg.batch_size)
    _, x, y = next(iter(inp.stream(inp.train, range(batch))))
    for k in (21, 70):  # a minibatch step: per call costs dominate small batches (large p: ~ the pass above)
        v = torch.randn(k, p, dtype=torch.float64)
        res[f"step{k}"] = (best_of(lambda v=v: [source.minibatch_hvp(v, x, y) for _ in range(3)]) / 3
                           if p < 100_000 else res[f"hvp{k}"] * batch)
    rows = min(m, 64)  # arnoldi's half_ihvp with a random orthonormal rank-r basis (its exact code path)
    grads = torch.randn(rows, p)
    basis = torch.linalg.qr(torch.randn(p, cfg.solver.arnoldi.rank, dtype=torch.float64)).Q.T.contiguous()

    def half() -> torch.Tensor:
        v64 = grads.double()
        a = v64 @ basis.T
        return ((a * 2.0) @ basis + (v64 - a @ basis) / 3.0).square().sum(1)

    res["half"] = best_of(half) / rows
    solver, big = EkfacSolver(cfg.solver), min(inp.problem.n, 2048 if p < 100_000 else 1024)

    def fit(rows: int) -> float:
        return best_of(lambda: solver.fit(dataclasses.replace(sub, train_loader=inp.stream(inp.train, range(rows)), n=rows)))

    fit(8)  # warm-up
    t_small, t_big = fit(big // 4), fit(big)
    res["ekfac_fit"] = max(t_big - t_small, 0.3 * t_big) / (big - big // 4)  # per row beyond the fixed cost
    res["ekfac_fit_fixed"] = max(t_big - res["ekfac_fit"] * big, 0.0)  # eigendecompositions
    res["ekfac_si"] = best_of(lambda: solver.self_influence_fast(inp.stream(inp.train, range(big)), big)) / big
    return res


def cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, n, solver) cell, the phases of spec["plan"]; results saved after every phase."""
    torch.set_num_threads(spec["threads"])
    out, plan = Path(spec["out"]), spec["plan"]
    res: dict[str, Any] = {"phases": {}}

    def save(phase: str, seconds: float, **extra: Any) -> None:
        res["phases"][phase] = {"seconds": seconds, **extra}
        res["peak_rss_mib"] = peak_mib()
        (out / "result.json").write_text(json.dumps(res))

    cfg = load_config(spec["config"], spec["overrides"])
    inp = api.open_run(cfg, 'rank', need_test=True)
    problem, n, name = inp.problem, inp.problem.n, cfg.solver.name
    res["rss_after_load_mib"] = peak_mib()
    source = GradientSource(problem)
    if plan["fit"] == "standin":
        rows = min(n, STANDIN_ROWS[name])
        sub = dataclasses.replace(problem, train_loader=inp.stream(inp.train, range(rows)), n=rows)
        one_pass = dataclasses.replace(cfg.solver.arnoldi, max_iter=1)
        seconds, solver = timed(lambda: make_solver(dataclasses.replace(cfg.solver, arnoldi=one_pass)).fit(sub))
        save("standin_fit", seconds, rows=rows)
    else:
        seconds, solver = timed(lambda: make_solver(cfg.solver, problem).fit(problem))
        save("fit", seconds)
    for _ in source.per_example(inp.stream(inp.train, range(8))):  # warm-up of the scoring code paths
        pass
    fast = solver.self_influence_blocks if isinstance(solver, RowScorer) else None
    if fast is not None:
        solver.self_influence_fast(inp.stream(inp.train, range(8)), n)
    for phase in plan["order"]:
        if phase == "si":
            _self_influence(plan["si"], inp, solver, source, out, save)
        elif phase == "grads":
            count = n if plan["grads"] == "full" else min(n, FIRST_ROWS)
            loader = problem.train_loader if count == n else inp.stream(inp.train, range(count))
            seconds, _ = timed(lambda ld=loader: [float(b.grads[:, 0].sum()) for b in source.per_example(ld)])
            save("grads", seconds, rows=count)
        elif phase == "tt":
            seconds, ihvp_seconds = _train_to_test(cfg, inp, solver, source, out)
            save("tt", seconds, ihvp_seconds=ihvp_seconds)
    res["describe"] = _brief(solver.describe())
    save("done", 0.0)
    return res


def _self_influence(how: str, inp: Run, solver: Any, source: GradientSource, out: Path,
                    save: Callable[..., None]) -> None:
    problem, n = inp.problem, inp.problem.n
    if how == "solve_sample":  # cg/lissa: seeded random rows, one block, one batched solve
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:SOLVE_SAMPLE].sort().values
        loader: Any = OneBlock(problem.train_loader, rows, n)
    else:
        rows = torch.arange(n if how == "full" else min(n, FIRST_ROWS))
        loader = problem.train_loader if how == "full" else inp.stream(inp.train, range(len(rows)))
    fast = solver.self_influence_blocks if isinstance(solver, RowScorer) else None

    def score() -> np.ndarray:
        if fast is not None:
            return solver.self_influence_fast(loader, n)[rows].numpy()
        si = np.zeros(n)
        for b in source.per_example(loader):
            si[b.idx.numpy()] = self_influence(b.grads, solver).cpu().numpy()
        return si[rows.numpy()]

    seconds, si = timed(score)
    np.savez(out / "si.npz", rows=rows.numpy(), si=si)
    save("si", seconds, rows=len(rows))


def _train_to_test(cfg: Any, inp: Run, solver: Any, source: GradientSource,
                   out: Path) -> tuple[float, float]:
    problem, n = inp.problem, inp.problem.n
    start = time.perf_counter()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    test = CastLoader(make_loader(inp.test, cfg.batch_size), dtype)
    grads = torch.cat([b.grads.double() for b in source.per_example(test)])
    ihvp_seconds, ihvp = timed(lambda: solver.ihvp(torch.cat([grads, grads.mean(0, keepdim=True)])))
    overall = np.zeros(n)
    for b in source.per_example(problem.train_loader):
        overall[b.idx.numpy()] = loss_change_if_removed(ihvp, b.grads, n)[-1].cpu().numpy()
    seconds = time.perf_counter() - start
    np.save(out / "overall.npy", overall)
    return seconds, ihvp_seconds


def _brief(described: dict[str, Any]) -> dict[str, Any]:
    keep = ("factorization", "iterations_max", "not_converged", "hvp_passes", "residual_max", "residual_median",
            "scale", "lambda_max", "steps_max", "passes", "converged", "residual_max_relative",
            "complement_constant", "refine_residual_max", "ekfac_residual_max", "warnings")
    return {k: v for k, v in described.items() if k in keep}
