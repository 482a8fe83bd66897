"""`infl train`: fit the configured model from a seeded initialization (the CLI saves nothing else).

L-BFGS runs full-batch in float64 (its line search needs it to reach a small gradient). After
adam/sgd, `train.polish` finishes the selected parameters with L-BFGS, so the checkpoint is a
stationary point in the parameters influence differentiates.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..health import accuracy_warnings
from ..models import save_checkpoint
from ..run import Report, Run
from ..train import POLISH_ITERATIONS, fit


def train(run: Run) -> Report:
    """Train every parameter of the run's fresh model, polish the selected ones, write model.checkpoint."""
    if run.cfg.model.arch == "hf":  # fine-tune the selected parameters of a pretrained folder
        from .train_hf import train as fine_tune

        return fine_tune(run)
    cfg, problem = run.cfg, run.problem
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: required by `infl train` (where to write the weights)")
    model = problem.model
    with run.timer("train"):
        result, polished = fit(model, problem, run.train, cfg, run.progress)
    with run.timer("save"):
        save_checkpoint(model, cfg.model.checkpoint, cfg.model)
    final = polished or result
    summary = {"command": "train", "n": problem.n, "parameters": sum(p.numel() for p in model.parameters()),
               "optimizer": cfg.train.optimizer, "objective": final.objective, "grad_norm": final.grad_norm,
               "grad_norm_all_parameters": result.grad_norm, "polished": polished is not None,
               "iterations": result.iterations, "converged": final.converged,
               "checkpoint": str(cfg.model.checkpoint), "train_accuracy": final.accuracy, "head_only": final.head_only}
    warnings = ([] if final.converged else [not_converged_advice(cfg, model, final, polished is not None)]
                ) + accuracy_warnings(final.accuracy)
    return Report({}, summary, {"phases": run.timer.phases}, warnings)


def not_converged_advice(cfg: Any, model: torch.nn.Module, final: Any, polished: bool) -> str:
    """What to change when training stopped above train.tol, from what the run saw: L-BFGS that
    stopped before its budget stalled in its line search (more epochs will not help; a ReLU
    network's kinks are the usual cause), one that used its whole budget needs more epochs."""
    head = (f"training stopped at gradient norm {final.grad_norm:.3g} > train.tol={cfg.train.tol:g}: influence"
            " assumes an optimum;")
    lbfgs = cfg.train.optimizer == "lbfgs" or polished
    budget = POLISH_ITERATIONS if polished else cfg.train.epochs
    relu = any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    if lbfgs and final.iterations < budget:
        tips = ["L-BFGS stalled before its budget, so more epochs will not help"]
        if relu:
            tips.append("ReLU kinks stall it: use model.kwargs.activation: tanh (smooth)")
        if cfg.params == "all":
            tips.append("or params: last_layer (a convex head)")
        tips.append(f"or accept the point with train.tol: {final.grad_norm * 2:.1g} and a larger solver.damping")
        return f"{head} {'; '.join(tips)}"
    if lbfgs:
        return f"{head} L-BFGS used all {budget} iterations: raise train.epochs"
    return (f"{head} {cfg.train.optimizer} does not reach a stationary point: keep train.polish: true (L-BFGS"
            " finishes the selected parameters) or use train.optimizer: lbfgs")
