"""`infl train`: fit the configured model from a seeded initialization (the CLI saves nothing else).

L-BFGS runs full-batch in float64 (its line search needs it to reach a small gradient). After
adam/sgd, `train.polish` finishes the selected parameters with L-BFGS, so the checkpoint is a
stationary point in the parameters influence differentiates.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..data import CastLoader, make_loader
from ..errors import ConfigError
from ..models import save_checkpoint
from ..run import Report, Run
from ..train import minimize


def train(run: Run) -> Report:
    """Train every parameter of the run's fresh model, polish the selected ones, write model.checkpoint."""
    cfg, problem = run.cfg, run.problem
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: required by `infl train` (where to write the weights)")
    model = problem.model
    final_dtype = next(model.parameters()).dtype
    for p in model.parameters():
        p.requires_grad_(True)
    with run.timer("train"):
        result = _minimize_all(run, final_dtype)
        polished = None
        if cfg.train.optimizer != "lbfgs" and cfg.train.polish:
            selected = [dict(model.named_parameters())[n] for n in problem.params.names]
            model.to(torch.float64)
            polished = minimize(model, selected, problem.objective,
                                CastLoader(make_loader(run.train, cfg.batch_size), torch.float64), problem.n,
                                replace(cfg.train, optimizer="lbfgs", lr=1.0, epochs=200), progress=run.phase("polish"))
    model.to(final_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    with run.timer("save"):
        save_checkpoint(model, cfg.model.checkpoint)
    final = polished or result
    summary = {"command": "train", "n": problem.n, "parameters": sum(p.numel() for p in model.parameters()),
               "optimizer": cfg.train.optimizer, "objective": final.objective, "grad_norm": final.grad_norm,
               "grad_norm_all_parameters": result.grad_norm, "polished": polished is not None,
               "iterations": result.iterations, "converged": final.converged,
               "checkpoint": str(cfg.model.checkpoint)}
    warnings = []
    if not final.converged:
        warnings.append(f"training stopped at gradient norm {final.grad_norm:.3g} > train.tol={cfg.train.tol:g}"
                        " after the last epoch: influence assumes an optimum; raise train.epochs")
    return Report({}, summary, {"phases": run.timer.phases}, warnings)


def _minimize_all(run: Run, dtype: torch.dtype) -> Any:
    """Train every parameter; L-BFGS in float64, adam/sgd in the model's dtype on seeded shuffled batches."""
    cfg, model, problem = run.cfg, run.problem.model, run.problem
    generator = torch.Generator().manual_seed(cfg.seed)
    shuffled = CastLoader(make_loader(run.train, cfg.batch_size, shuffle=True, generator=generator), dtype)
    work = torch.float64 if cfg.train.optimizer == "lbfgs" else dtype
    model.to(work)
    loader = CastLoader(make_loader(run.train, cfg.batch_size), work)
    return minimize(model, list(model.parameters()), problem.objective, loader, problem.n, cfg.train,
                    shuffled=shuffled, progress=run.phase("train"))
