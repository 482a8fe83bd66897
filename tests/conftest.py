"""Tiny float64 problems with exact answers, shared by the numerical tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from influence_cli.config import SolverConfig
from influence_cli.objective import Objective, ParamSpace, Problem

torch.set_num_threads(1)  # tiny problems: threads only contend (measured 80x slower L-BFGS on a loaded 2-core box)


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Python's own Ctrl-C handler for every test, however pytest was started: a shell's background job (`cmd &`)
    starts with SIGINT ignored, and the interrupt tests then see no KeyboardInterrupt at all."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class ListLoader:
    """Re-iterable (row_idx, x, y) batches over in-memory tensors, in row order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        for s in range(0, len(self.x), self.batch_size):
            idx = torch.arange(s, min(s + self.batch_size, len(self.x)))
            yield idx, self.x[idx], self.y[idx]


@dataclass
class Case:
    problem: Problem
    x: torch.Tensor
    y: torch.Tensor

    def flat_loss(self, flat: torch.Tensor) -> torch.Tensor:
        """The full objective as a function of the flat selected parameters (for autograd checks)."""
        pr = self.problem
        named = dict(pr.model.named_parameters())
        params = {k: v.detach() for k, v in named.items()}
        params.update(pr.params.unflatten(flat))
        out = torch.func.functional_call(pr.model, params, (self.x,))
        return pr.objective.per_example_loss(out, self.y).mean() + pr.objective.regularizer(flat)

    def flat_params(self) -> torch.Tensor:
        return self.problem.params.flatten(self.problem.params.values(self.problem.model))

    def exact_hessian(self) -> torch.Tensor:
        """Independent reference: autograd's dense Hessian of the objective, plus damping."""
        h = torch.autograd.functional.hessian(self.flat_loss, self.flat_params())
        return h + self.problem.damping * torch.eye(len(h), dtype=h.dtype)


def make_case(kind: str, n: int = 40, d: int = 5, classes: int = 3, batch_size: int = 16, damping: float = 1e-3,
              weight_decay: float = 1e-2, hessian: str = "exact", seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "ridge":
        model = nn.Linear(d, 1).double()
        y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        task = "regression"
    elif kind == "logreg":
        model = nn.Linear(d, classes).double()
        y = torch.randint(0, classes, (n,), generator=g)
        task = "classification"
    elif kind == "binary":
        model = nn.Linear(d, 1).double()
        y = (x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
        task = "binary"
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, classes)).double()
        y = torch.randint(0, classes, (n,), generator=g)
        task = "classification"
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    model.eval().requires_grad_(False)
    problem = Problem(model=model, objective=Objective(task, weight_decay), params=ParamSpace.select(model, "all"),
                      train_loader=ListLoader(x, y, batch_size), n=n, damping=damping, hessian=hessian)
    return Case(problem, x, y)


def solver_config(**kw) -> SolverConfig:
    return SolverConfig(**kw)


@pytest.fixture(params=["ridge", "logreg", "binary", "mlp"])
def case(request) -> Case:
    return make_case(request.param)


def trained_case(kind: str, n: int = 40, **kw) -> Case:
    """make_case (weight decay 1e-2, damping 0 unless given) trained to its optimum with float64
    L-BFGS, so influence's first-order conditions hold (gradient norm < 1e-7)."""
    from influence_cli.config import TrainConfig
    from influence_cli.train import minimize

    kw = {"weight_decay": 1e-2, "damping": 0.0, **kw}
    case = make_case(kind, n=n, **kw)
    params = list(case.problem.model.parameters())
    for p in params:
        p.requires_grad_(True)
    result = minimize(case.problem.model, params, case.problem.objective, case.problem.train_loader, n,
                      TrainConfig(optimizer="lbfgs", epochs=2000, tol=1e-11))
    for p in params:
        p.requires_grad_(False)
    assert result.grad_norm < 1e-7, result.grad_norm
    return case


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI's entry point in process: (exit code, stdout, stderr)."""
    from influence_cli import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
