"""`infl train` for `model.arch: hf`: fine-tune the selected parameters of a local pretrained classifier.

`train.optimizer: adam` runs AdamW (decoupled decay off: the objective's L2 over the selected parameters is in
the loss, so training minimizes the objective influence differentiates) on seeded shuffled batches in train
mode, the learning rate ramping up linearly over the first `train.warmup` of the steps and down to 0 after;
`sgd` the same with momentum. Then (`train.polish`, and always for `lbfgs`, which fine-tunes nothing else)
the head (`params: last_layer` within the selection) is finished by L-BFGS on the frozen body's features
(train.polish: computed once), so the checkpoint is a stationary point in the head. Selected block
parameters keep AdamW's end point: the summary gives the gradient norm over every selected parameter.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..data import CastLoader, make_loader
from ..errors import ConfigError, DataError
from ..models import save_checkpoint
from ..objective import Objective, ParamSpace
from ..run import Report, Run
from ..train import POLISH_ITERATIONS, polish


def train(run: Run) -> Report:
    cfg, problem = run.cfg, run.problem
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: required by `infl train` (where to write the fine-tuned weights)",
                          hint="for example checkpoint: finetuned.pt (the folder in model.path is never written)")
    model, names = problem.model, problem.params.names
    named = dict(model.named_parameters())
    selected = [named[n] for n in names]
    for p in selected:
        p.requires_grad_(True)
    warnings: list[str] = []
    if cfg.train.optimizer != "lbfgs" and cfg.train.lr >= 0.1:
        warnings.append(f"train.lr {cfg.train.lr:g} is large for fine-tuning a transformer with "
                        f"{cfg.train.optimizer}; 1e-5 .. 1e-3 is usual")
    head = [n for n in ParamSpace.select(model, "last_layer").names if n in names]
    dtype = next(model.parameters()).dtype
    with run.timer("train"):
        steps = 0
        if cfg.train.optimizer != "lbfgs":
            steps = _fine_tune(run, selected)
        polished = None
        if head and (cfg.train.optimizer == "lbfgs" or cfg.train.polish):
            polished = polish(model, head, problem.objective, make_loader(run.train, cfg.batch_size), problem.n,
                              replace(cfg.train, optimizer="lbfgs", lr=1.0, epochs=POLISH_ITERATIONS),
                              cfg.batch_size, run.progress)
            model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    value, grad_norm, accuracy = _objective(model, selected, problem.objective,
                                            CastLoader(make_loader(run.train, cfg.batch_size), dtype), problem.n)
    with run.timer("save"):
        save_checkpoint(model, cfg.model.checkpoint, cfg.model)
    summary = {"command": "train", "n": problem.n, "parameters": sum(p.numel() for p in selected),
               "trained": list(names), "optimizer": cfg.train.optimizer, "steps": steps,
               "objective": value, "grad_norm": grad_norm, "train_accuracy": accuracy,
               "polished": polished is not None, "polished_parameters": head if polished else [],
               "grad_norm_head": polished.grad_norm if polished else None,
               "converged": grad_norm <= cfg.train.tol, "checkpoint": str(cfg.model.checkpoint)}
    if grad_norm > cfg.train.tol:
        warnings.append(f"the selected parameters end at gradient norm {grad_norm:.3g} > train.tol={cfg.train.tol:g}"
                        " (L-BFGS finished only the head): influence assumes an optimum; raise train.epochs, use"
                        " params: last_layer, or raise solver.damping")
    return Report({}, summary, {"phases": run.timer.phases}, warnings)


def _fine_tune(run: Run, params: list[nn.Parameter]) -> int:
    """AdamW (or SGD) with linear warmup and decay over train.epochs of seeded shuffled batches; returns the steps."""
    cfg, problem, model = run.cfg, run.problem, run.problem.model
    generator = torch.Generator().manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    batches = CastLoader(make_loader(run.train, cfg.batch_size, shuffle=True, generator=generator), dtype)
    total = cfg.train.epochs * math.ceil(problem.n / cfg.batch_size)
    warm = max(1, round(cfg.train.warmup * total))
    optimizer = (torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0) if cfg.train.optimizer == "adam"
                 else torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    tick, device, decay = run.phase("train"), problem.device, problem.objective.weight_decay
    step = 0
    with torch.random.fork_rng(devices=[]):  # dropout draws, seeded, without touching the global RNG
        torch.manual_seed(cfg.seed)
        model.train()
        try:
            for epoch in range(cfg.train.epochs):
                for _, x, y in batches:
                    optimizer.zero_grad()
                    losses = problem.objective.per_example_loss(model(x.to(device)), y.to(device))
                    loss = losses.mean() + sum(0.5 * decay * p.square().sum() for p in params)
                    if not torch.isfinite(loss):
                        raise DataError("fine-tuning diverged: the loss became NaN/inf", hint="lower train.lr")
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    step += 1
                if tick is not None:
                    tick(epoch + 1, cfg.train.epochs)
        finally:
            model.eval()
    return step


def _objective(model: nn.Module, params: list[nn.Parameter], objective: Objective, loader: CastLoader,
               n: int) -> tuple[float, float, float | None]:
    """(J, ||grad J|| over `params`, training accuracy) at the model's current weights, in eval mode."""
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    total, correct, device = 0.0, 0, params[0].device
    for _, x, y in loader:
        y = y.to(device)
        out = model(x.to(device))
        loss = objective.per_example_loss(out, y).sum() / n
        loss.backward()
        total += float(loss.detach())
        if objective.task != "regression":
            correct += int((objective.predict(out.detach(), y)[0].reshape(-1) == y.reshape(-1).long()).sum())
    reg = sum(0.5 * objective.weight_decay * p.square().sum() for p in params)
    reg.backward()  # type: ignore[union-attr]
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return total + float(reg.detach()), norm, (correct / n if objective.task != "regression" else None)
