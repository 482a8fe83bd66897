"""The Newton step of removing a whole group: the group-influence estimate that holds for big groups.

Notation as in groups.py: J = (1/n) sum_i L_i + 0.5 wd ||theta||^2, M ~= (hess J + damping I)^-1 the
solver's inverse, U a group, g_U = sum_{i in U} g_i, H_U = sum_{i in U} hess L_i (exact or Gauss-Newton,
as problem.hessian). Removing U (weights 0, n fixed) leaves the objective J_U = J - (1/n) sum_{i in U} L_i,
whose gradient at the checkpoint theta* is -g_U / n and whose Hessian is M^-1 - H_U / n. One Newton step
on J_U from theta* is

    x = (M^-1 - H_U / n)^-1 g_U / n,

exact for quadratic objectives (linear regression, any model where the loss is quadratic in theta),
whatever the group's size. The first-order step d = M g_U / n (Koh et al. 2019) is its first term: it
ignores that the group's own curvature leaves with it, which is what makes first order wrong, even in
sign, for groups beyond a few percent of the rows.

Solving it costs O(group) work per iteration, for every solver: preconditioned conjugate gradients on
A = M^-1 - H_U / n with the solver's own M as preconditioner (its factored form when it has one, which
is linear). A p never needs M^-1: every search direction is p = z + beta p with z = M r, so
q = M^-1 p = r + beta q is carried along, and A p = q - H_U p / n takes one pass over the group's rows
(their curvature along p) and one M-apply per iteration. The preconditioned operator M A = I - M H_U / n
has eigenvalues in (0, 1] when M is exact, clustered at 1 for small groups, so few iterations are
needed; Polak-Ribiere's beta keeps it stable when M is inexact (lissa, cg). All groups are solved
together, one (G, p) block per iteration.

The test loss changes by gbar.x (+ 0.5 x^T H_t x): since M is symmetric and a = M gbar,
gbar.x = a^T M^-1 x = a^T (b - r) + a^T H_U x / n, with b = g_U / n (a^T b = the first-order sum) and r
the final residual, so nothing more is applied. `curvature_share` = x^T (H_U / n) x / x^T M^-1 x is
how much of the curvature along its own step the group holds: near 1 the objective without the group is
much flatter than with it, the step is long, and one Newton step on a non-quadratic objective can be far
off.

Chord corrections follow for the groups that need them (curvature_share above CHORD_SHARE, at most
CHORD_GROUPS of them, largest share first): the gradient of J_U at theta* + x over every training row (one
gradient pass per group), and another solve of the same system, A dx = -grad J_U(theta* + x), so
x <- x + dx (a chord-Newton step: the Hessian stays the one at theta*; repeated, it converges to the
retrained minimum), up to CHORD_STEPS times, each time only for the groups whose estimate moved by more
than CHORD_DONE. A step (the Newton step included) is kept only if it lowers |grad J_U|: one that raises
it (a non-convex objective, where the curvature at theta* points the wrong way) is halved up to
MAX_HALVINGS times and then given back (the Newton step itself: replaced by the first-order step d), and
the group is marked not converged. gbar.dx follows from the
same identity. A group whose last correction still moved its
estimate by more than CHORD_TRUST is far from converged: the caller warns and points to
`infl verify --groups`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .gradients import BLOCK_BYTES, GradientSource
from .objective import Problem
from .solvers import Solver

MAX_ITER = 30
TOL = 1e-8
CHORD_SHARE = 0.1  # groups holding more of the curvature along their step get a chord correction
CHORD_GROUPS = 32  # at most this many (each costs one gradient pass over every training row)
CHORD_STEPS = 4  # chord corrections at most, each only for the groups whose estimate still moves
CHORD_DONE = 0.02  # a correction under this fraction of the estimate: that group is done
CHORD_TRUST = 0.1  # the last correction moved the estimate by more than this fraction: not converged
MAX_HALVINGS = 3  # a step that raised |grad J_U| is halved up to this many times, then given back


@dataclass(frozen=True)
class NewtonSteps:
    """Per group (G,): the test-loss change gbar.x (without test curvature), the step x (G, p),
    curvature_share, whether PCG met its tolerance (with the iterations it took) and, after `corrected`,
    the chord correction's part of `change` (0 for groups without one)."""

    change: Tensor
    steps: Tensor
    curvature_share: Tensor
    converged: Tensor
    iterations: int
    correction: Tensor | None = None

    def untrusted(self) -> Tensor:
        """(G,) bool: PCG short of its tolerance, or a last chord correction above CHORD_TRUST of the estimate."""
        bad = ~self.converged
        if self.correction is not None:
            bad = bad | (self.correction.abs() > CHORD_TRUST * self.change.abs())
        return bad


def removal_steps(problem: Problem, solver: Solver, member: Tensor, a: Tensor, b: Tensor, d: Tensor,
                  corrections: int = CHORD_STEPS) -> NewtonSteps:
    """The Newton step of removing each group, then up to `corrections` chord corrections for the groups
    that need them, each step kept only while it lowers |grad J_U| (see the module docstring)."""
    first = newton_steps(problem, solver, member, a, b, d)
    share = first.curvature_share
    steps, change, converged = first.steps.clone(), first.change.clone(), first.converged.clone()
    correction = torch.zeros_like(first.change)
    iterations = first.iterations
    last_step, last_change = first.steps.clone(), first.change.clone()  # the step added last, per group
    norm = b.norm(dim=1)  # |grad J_U| at theta*: g_U / n
    halvings = torch.zeros(len(share), dtype=torch.long)
    done = torch.zeros(len(share), dtype=torch.long)
    chosen = [g for g in torch.argsort(share, descending=True).tolist() if float(share[g]) > CHORD_SHARE]
    active = sorted(chosen[:CHORD_GROUPS])
    while active:
        pick = torch.as_tensor(active, device=member.device)
        grads = objective_gradients_without(problem, member, pick, steps[pick])
        now = grads.norm(dim=1)
        solve, keep_going = [], []
        for j, g in enumerate(active):
            if float(now[j]) > float(norm[g]):  # the last step overshot: halve it, or give it back
                converged[g] = False
                if int(halvings[g]) < MAX_HALVINGS:
                    halvings[g] += 1
                    steps[g] -= 0.5 * last_step[g]
                    change[g] -= 0.5 * last_change[g]
                    last_step[g] *= 0.5
                    last_change[g] *= 0.5
                    correction[g] = last_change[g]
                    keep_going.append(g)
                elif int(done[g]) == 0:  # the Newton step itself failed: the first-order step d instead
                    steps[g], change[g] = d[g], a @ b[g]
                else:
                    steps[g] -= last_step[g]
                    change[g] -= last_change[g]
                continue
            norm[g] = now[j]
            moved = float(last_change[g].abs()) > CHORD_DONE * float(change[g].abs())
            if int(done[g]) < corrections and (int(done[g]) == 0 or moved):
                solve.append(j)
        if solve:
            sub = torch.as_tensor([active[j] for j in solve], device=member.device)
            remap = torch.full((len(share),), -1, dtype=torch.long, device=member.device)
            remap[sub] = torch.arange(len(solve), device=member.device)
            sub_member = torch.where(member >= 0, remap[member.clamp_min(0)], member)
            rhs = -grads[solve]
            more = newton_steps(problem, solver, sub_member, a, rhs, _preconditioner(solver)(rhs))
            iterations += more.iterations
            steps[sub] += more.steps
            change[sub] += more.change
            last_step[sub], last_change[sub] = more.steps, more.change
            correction[sub] = more.change
            converged[sub] &= more.converged
            done[sub.cpu()] += 1
            keep_going += sub.tolist()
        active = sorted(keep_going)
    return NewtonSteps(change, steps, share, converged, iterations, correction)


def objective_gradients_without(problem: Problem, member: Tensor, groups: Tensor, steps: Tensor) -> Tensor:
    """(k, p): row j is grad J_U(theta* + steps[j]) for U = group groups[j]: every training row but the
    group's, each at its own parameters; one pass over the training rows, the k points vmapped."""
    space, n, obj = problem.params, problem.n, problem.objective
    theta, rest = space.split(problem.model, torch.float64)
    base = space.flatten({k: v[None] for k, v in theta.items()}, batched=True)[0]
    points = space.unflatten(base[None] + steps.to(torch.float64))

    def batch_loss(th: dict[str, Tensor], keep: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(problem.model, {**th, **rest}, (x,))
        return (obj.per_example_loss(out, y) * keep).sum() / n

    total = torch.zeros_like(steps, dtype=torch.float64)
    device = problem.device
    for idx, x, y in problem.train_loader:
        x = x.to(device=device, dtype=torch.float64 if x.is_floating_point() else x.dtype)
        y = y.to(device)
        rows = member[idx.cpu()].to(device)
        keep = (rows[None, :] != groups.to(device)[:, None]).to(torch.float64)  # (k, B)
        per = max(1, BLOCK_BYTES // max(1, 8 * 4 * (space.size + x[0].numel() * len(x))))
        for s in range(0, len(groups), per):
            part = {k: v[s : s + per] for k, v in points.items()}
            g = vmap(grad(batch_loss), in_dims=(0, 0, None, None))(part, keep[s : s + per], x, y)
            total[s : s + per] += space.flatten(g, batched=True)
    return total + obj.weight_decay * (base[None] + steps.to(torch.float64))


def newton_steps(problem: Problem, solver: Solver, member: Tensor, a: Tensor, b: Tensor, d: Tensor,
                 max_iter: int = MAX_ITER, tol: float = TOL) -> NewtonSteps:
    """Solve (M^-1 - H_U / n) x = b for every group at once (see the module docstring).

    member: (n,) each row's group index (-1: none); a: (p,) = M gbar; b: (G, p) = g_U / n; d: (G, p) =
    M b (the first-order step, already solved by the caller)."""
    apply_m = _preconditioner(solver)
    group_hvp = _group_curvature(problem, member)
    n = problem.n
    x = torch.zeros_like(b)
    hx = torch.zeros_like(b)  # H_U x / n, carried along
    r, z = b.clone(), d.clone()
    p, q = z.clone(), r.clone()
    rz = (r * z).sum(1)
    start = rz.abs().clamp_min(1e-300)
    done = rz.abs() <= tol**2 * start
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        hp = group_hvp(p) / n
        ap = q - hp
        pap = (p * ap).sum(1)
        ok = (pap > 0) & ~done  # pap <= 0: A is not positive definite along p (M too small); stop there
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(rz))
        x += alpha[:, None] * p
        hx += alpha[:, None] * hp
        r_new = r - alpha[:, None] * ap
        z_new = apply_m(r_new)
        rz_new = (r_new * z_new).sum(1)
        beta = torch.where(ok, (r_new * (z_new - z)).sum(1) / rz.clamp_min(1e-300), torch.zeros_like(rz))
        beta = beta.clamp_min(0.0)
        r, z = torch.where(ok[:, None], r_new, r), torch.where(ok[:, None], z_new, z)
        p = torch.where(ok[:, None], z + beta[:, None] * p, p)
        q = torch.where(ok[:, None], r + beta[:, None] * q, q)
        rz = torch.where(ok, rz_new, rz)
        done = done | ~ok | (rz.abs() <= tol**2 * start)
        if bool(done.all()):
            break
    converged = rz.abs() <= max(tol, 1e-6) ** 2 * start
    change = a @ (b - r).T + a @ hx.T  # = gbar . x, see the module docstring
    total = (x * (b - r)).sum(1) + (x * hx).sum(1)  # x^T M^-1 x = x^T A x + x^T H_U x / n
    share = (x * hx).sum(1) / total.clamp_min(1e-300)
    return NewtonSteps(change.reshape(-1), x, share, converged, iterations)


def _preconditioner(solver: Solver) -> Callable[[Tensor], Tensor]:
    """The solver's M as a linear map: its factored form when it has one (refinement is not linear)."""
    apply = getattr(solver, "factored_ihvp", None) or solver.ihvp
    return lambda v: apply(v).to(torch.float64)


def _group_curvature(problem: Problem, member: Tensor) -> Callable[[Tensor], Tensor]:
    """V (G, p) -> (G, p): row g is H_{U_g} V_g = sum over group g's rows of hess(L_i) V_g. One pass over
    the training rows, each batch's rows of group g against V_g only (GradientSource.minibatch_hvp)."""
    source = GradientSource(problem)
    shift = problem.objective.weight_decay + problem.damping

    def apply(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for idx, x, y in problem.train_loader:
            groups = member[idx.cpu()]
            for g in torch.unique(groups[groups >= 0]).tolist():
                keep = (groups == g).to(x.device)
                rows = int(keep.sum())
                mean = source.minibatch_hvp(v[g : g + 1], x[keep], y[keep.to(y.device)])  # mean hess + shift
                out[g] += ((mean[0] - shift * v[g]) * rows).to(out.dtype)
        return out

    return apply
