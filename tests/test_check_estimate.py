"""`infl check`'s estimates against the phases themselves, measured in the same process (ratios, not wall-clock
limits): within 3x on the sample configs, for the gradient pass, each solver's fit, a solve with refine (and
cg's), and selfcheck's and rank's phases as the manifest times them (issue 12, bug 1)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from influence_cli import api, estimates
from influence_cli.commands.check import gradient_seconds, phase_estimates
from influence_cli.config import load_config
from influence_cli.gradients import GradientSource
from influence_cli.run import Run
from influence_cli.solvers import make_solver

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 0.05  # seconds: below this the timer measures noise, not the phase


def _config(name, *overrides):
    return load_config(ROOT / "configs" / f"{name}.yaml", ["cache.enabled=false", *overrides])


def _within_3x(estimate, measured):
    estimate, measured = max(estimate, FLOOR), max(measured, FLOOR)
    return measured / 3 <= estimate <= measured * 3


def _units(run):
    return estimates.measure(run.problem, gradient_seconds(run))


@pytest.mark.parametrize("name", ["digits", "digits_mlp", "digits_images"])
def test_gradient_estimate_is_within_3x_of_the_measured_pass(name):
    run = Run.open(_config(name), "check")
    estimate = gradient_seconds(run)
    source = GradientSource(run.problem)
    measured = []
    for _ in range(3):  # the median of three passes: the machine is shared
        start = time.perf_counter()
        for _block in source.per_example(run.problem.train_loader, run.train.ids):
            pass
        measured.append(time.perf_counter() - start)
    actual = sorted(measured)[1]
    assert actual / 3 <= estimate <= actual * 3, (estimate, measured)


# every solver's fit where it is cheap enough for the suite (direct on the MLP forms 3,010 HVPs: ~1-2 min)
FITS = [("digits", "direct"), ("digits", "lissa"), ("digits", "arnoldi"), ("digits", "ekfac"),
        ("digits_mlp", "lissa"), ("digits_mlp", "arnoldi"), ("digits_mlp", "ekfac"),
        ("digits_images", "direct"), ("digits_images", "ekfac"), ("digits_images", "arnoldi")]


@pytest.mark.parametrize(("config", "solver"), FITS)
def test_fit_estimate_is_within_3x_of_the_measured_fit(config, solver):
    run = Run.open(_config(config, f"solver.name={solver}"), "check")
    estimate = estimates.fit_seconds(solver, run.cfg.solver, _units(run))
    fits = []
    for _ in range(3):  # the median of three fits: the machine is shared (one slow fit once read 3.2x)
        start = time.perf_counter()
        make_solver(run.cfg.solver, run.problem).fit(run.problem)
        fits.append(time.perf_counter() - start)
    measured = sorted(fits)[1]
    assert _within_3x(estimate, measured), (estimate, fits)


@pytest.mark.parametrize(("config", "solver", "setting"), [
    ("digits_mlp", "ekfac", "solver.ekfac.refine=2"), ("digits_mlp", "arnoldi", "solver.arnoldi.refine=4"),
    ("digits", "cg", "solver.cg.max_iter=20")])
def test_solve_estimate_is_within_3x_of_the_measured_solve(config, solver, setting):
    """One ihvp call on 40 test rows: refine's HVP passes (check prints them as refine's cost), or cg's."""
    run = Run.open(_config(config, f"solver.name={solver}", setting), "check")
    units = _units(run)
    fitted = make_solver(run.cfg.solver, run.problem).fit(run.problem)
    v = torch.randn(40, run.problem.params.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    fitted.ihvp(v)
    measured = time.perf_counter() - start
    estimate = estimates.solve_seconds(solver, run.cfg.solver, units, 40)
    assert _within_3x(estimate, measured), (estimate, measured)


@pytest.mark.parametrize("command", ["selfcheck", "rank"])
def test_phase_estimates_are_within_3x_of_the_manifest_phases(command):
    cfg = _config("digits")
    run = Run.open(cfg, "check", need_test=True)
    units = _units(run)
    fit = estimates.fit_seconds("direct", cfg.solver, units)
    est = phase_estimates("direct", cfg.solver, units, fit, run.test.n)
    phases = (api.selfcheck(cfg) if command == "selfcheck" else api.rank(cfg)).manifest["phases_seconds"]
    assert _within_3x(est["fit"], phases["fit"]), (est, phases)
    key = "selfcheck_score" if command == "selfcheck" else "rank_score"
    assert _within_3x(est[key], phases["score"]), (est, phases)


def test_check_prints_refine_cost_and_warns_when_it_dominates(capsys, monkeypatch):
    from conftest import run_cli

    from influence_cli.commands import check

    monkeypatch.setattr(check, "REFINE_WARN_SECONDS", 0.0)  # the share decides, whatever this machine's speed

    code, out, err = run_cli(capsys, "check", "-c", str(ROOT / "configs" / "digits_mlp.yaml"), "--set",
                             "solver.name=ekfac", "--set", "solver.ekfac.refine=8")
    assert code == 0
    assert "refine 8 = 9 HVP passes x" in " ".join(out.split())
    assert "refine 8 costs" in err and "lower solver.ekfac.refine" in err
    code, out, err = run_cli(capsys, "check", "-c", str(ROOT / "configs" / "digits_mlp.yaml"), "--json", "--set",
                             "solver.name=ekfac", "--set", "solver.ekfac.refine=0")
    assert code == 0 and "refine" not in __import__("json").loads(out)["phase_estimates"]
