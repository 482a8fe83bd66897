"""Every solver on two MLP sizes and two training-set sizes: fit time, scoring time, peak memory, agreement.

Workload: synthetic 64-feature 10-class data (Gaussian features, labels from a random linear teacher plus
Gumbel noise) and 20 test rows. Models: MLP 64-128-10 (9,610 parameters), trained briefly with `infl train`
(adam, then the L-BFGS polish; weight_decay 0.01) on the first 10,000 rows; MLP 64-1024-1024-10 (1,126,410
parameters) at a seeded random initialization: only timings and memory are measured on it. The n-row
training set is the first n rows of one draw, so at n = 50k the 9,610-parameter checkpoint is near, not at,
an optimum. Solver settings: `solver.hessian: gauss_newton`, damping 1e-3 (+ weight_decay 0.01), cg max_iter
100, lissa depth 500 on minibatches of 256 rows, arnoldi rank 50, ekfac refine 2; batch_size 1024; float32
model, float64 curvature; 2 threads.

Per cell (model x n x solver), in a fresh subprocess (benchmarks/_solvers_cells.py says what each phase runs):
  fit s             make_solver(cfg.solver).fit(problem)
  self-influence s  g_i^T H^-1 g_i of all n rows, as `infl selfcheck` computes it: ||half_ihvp g||^2 (direct,
                    arnoldi), EK-FAC's self_influence_blocks (no p-sized gradient); cg and lissa need a solve
                    per row: 64 seeded random rows are solved as one block and the time is scaled to n
  train->test s     ihvp of the 20 test gradients and their mean, plus one streamed pass of
                    loss_change_if_removed over the training gradients (`infl rank`'s route); only for
                    p <= --train-to-test-max-p (default: the 1M-parameter model gets self-influence only)
  grads s           GradientSource.per_example alone (gradients discarded), for the ratio below
  peak RSS MiB      the subprocess's peak resident memory (~0.8 GiB is torch and the data before any work)
  rho               Spearman with direct at the same n: self-influence over all rows (cg/lissa: the 64
                    sampled rows) and loss_change_if_removed on the mean test loss over all rows
  ~S (R rows: s)    timed on R rows (the first ones, or the 64 sampled for cg/lissa), scaled linearly to n
Cost control: a probe subprocess per model times (best of 3) per-example gradients, HVP passes of
4/21/70(/256) vectors, lissa minibatch steps, arnoldi's half_ihvp and an EK-FAC fit on the first rows; each
phase's cost is estimated from it (worst case: every iteration taken), scaled by how much slower a matmul
runs just before the cell than at the probe (other jobs share the 2 cores), times 1.3. Phases are planned in
order while the estimate fits the cell's limit (--max-seconds-per-cell; direct, the agreement reference:
--max-seconds-reference) and what is left of --max-seconds-total. A cell whose fit does not fit is skipped
("skipped (est. N s)"), except arnoldi and ekfac, whose scoring is then timed with a stand-in fit on the first
rows (arnoldi: one Krylov pass on 256 rows; ekfac: 1,024 rows): the right shapes and cost, not the curvature,
so no agreement. Scoring that does not fit over all rows is timed on the first 512 rows (marked ~). Run
order (`priority`): the direct reference, ekfac everywhere, the other cells at the smallest n, the rest;
cheapest first within each. A worker past 3x its estimate + 120 s is killed; its finished phases are kept.

Run:  .venv/bin/python benchmarks/solvers.py [--sizes 10000,50000] [--models mlp10k,mlp1m]
          [--solvers direct,cg,lissa,arnoldi,ekfac] [--max-seconds-per-cell 480] [--max-seconds-reference 1800]
          [--max-seconds-total 2100] [--train-to-test-max-p 100000] [--set solver.lissa.depth=300 ...]
          [--dry-run] [--workdir DIR]
Ran on the 2-core shared development CPU, no GPU (README "Solvers"), defaults, 1,804 s wall:
      .venv/bin/python benchmarks/solvers.py
Timings on that machine vary up to ~4x between runs of the same cell (other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _solvers_cells as bench  # benchmarks/ is on sys.path when this file runs as a script

SOLVERS = ("direct", "cg", "lissa", "arnoldi", "ekfac")
SAFETY = 1.3


def estimates(pr: dict[str, Any], solver: str, n: int, settings: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase at the probe's speed, worst case (every iteration taken)."""
    p, g, flops = pr["p"], pr["grad"], pr["flops"]
    pr = dict(pr)  # a pass of fewer vectors costs no more than one of more (noisy timings on a shared machine)
    pr["hvp21"] = min(pr["hvp21"], pr["hvp70"])
    pr["hvp4"] = min(pr["hvp4"], pr["hvp21"])
    pr["step21"] = min(pr["step21"], pr["step70"])
    s = settings["solver"]
    est = {"grads": n * g, "tt": (n + bench.TEST_ROWS) * g}  # tt: plus the ihvp, below
    if solver == "direct":
        per_vector = pr["hvp256"] / 256 if "hvp256" in pr else pr["hvp70"] / 70
        return est | {"fit": p * per_vector * n + p**3 / 3 / flops, "si": n * g + n * p * p / flops,
                      "memory": 3 * 8 * p * p}
    if solver == "cg":
        iters = s["cg"]["max_iter"] + 1
        return est | {"fit": 0.0, "si_sample": iters * pr["hvp70"] * n, "tt": est["tt"] + iters * pr["hvp21"] * n}
    if solver == "lissa":
        depth = s["lissa"]["depth"]
        return est | {"fit": 50 * pr["hvp4"] * n + 4 * 50 * pr["step21"],  # power iterations: <= 50 passes
                      "si_sample": depth * pr["step70"] + pr["hvp70"] * n,
                      "tt": est["tt"] + depth * pr["step21"] + pr["hvp21"] * n}
    if solver == "arnoldi":
        b = s["arnoldi"]["rank"] + 20
        krylov = 300 * p * b * b / flops  # per pass: SVD, QR, projections on the basis (measured ~ this)
        return est | {"fit": 10 * (pr["hvp70"] * n + krylov) + b * g, "si": n * (g + pr["half"]),
                      "standin": pr["hvp70"] * bench.STANDIN_ROWS["arnoldi"] + krylov + b * g}
    return est | {"fit": pr["ekfac_fit_fixed"] + pr["ekfac_fit"] * n, "si": pr["ekfac_si"] * n,
                  "standin": pr["ekfac_fit_fixed"] + pr["ekfac_fit"] * min(n, bench.STANDIN_ROWS["ekfac"]),
                  "tt": est["tt"] + 3 * pr["hvp21"] * n}


def make_plan(solver: str, est: dict[str, float], limit: float, n: int,
              tt: bool = True) -> tuple[dict | None, float, str]:
    """(plan or None, its estimated seconds, why skipped): phases are added while they fit in `limit`;
    train->test only with `tt`."""
    if solver == "direct" and est["memory"] > 0.8 * _available_bytes():
        return None, 0.0, f"needs {est['memory'] / 2**40:.1f} TiB for the p x p Hessian"
    plan: dict[str, Any] = {"fit": "full", "si": None, "grads": None, "tt": False, "order": []}
    spent = est["fit"]
    if est["fit"] > limit:
        if est.get("standin", float("inf")) > limit:
            return None, 0.0, f"est. {est['fit']:.0f} s"
        plan["fit"], spent = "standin", est["standin"]
    part = min(n, bench.FIRST_ROWS) / n

    def add(phase: str, cost: float, value: Any = True) -> None:
        nonlocal spent
        plan[phase], spent = value, spent + cost
        plan["order"].append(phase)

    if "si" in est:  # factored: self-influence, then the gradients alone, then train->test
        if spent + est["si"] <= limit:
            add("si", est["si"], "full")
        elif spent + est["si"] * part <= limit:
            add("si", est["si"] * part, "sample")
        if solver != "direct" and spent + est["grads"] <= limit:
            add("grads", est["grads"], "full")
        elif solver != "direct" and spent + est["grads"] * part <= limit:
            add("grads", est["grads"] * part, "sample")
    if tt and plan["fit"] == "full" and spent + est["tt"] <= limit:
        add("tt", est["tt"])
    if "si_sample" in est and spent + est["si_sample"] <= limit:  # cg/lissa: after train->test, their use
        add("si", est["si_sample"], "solve_sample")
    if not plan["si"] and not plan["tt"]:
        scoring = est.get("si", est.get("si_sample", 0.0) * n / bench.SOLVE_SAMPLE)
        return None, 0.0, f"est. fit {est['fit']:.0f} s, self-influence {scoring:.0f} s, train->test {est['tt']:.0f} s"
    return plan, spent, ""


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**34


def priority(cell: tuple[str, int, str], smallest: int) -> int:
    """Run order: the direct references; ekfac everywhere (the < 3x and memory-vs-n targets); the other cells
    at the smallest n (agreement); the rest. Cheapest first within each, so --max-seconds-total cuts the
    most costly cells of the last group first."""
    _, n, solver = cell
    return 0 if solver == "direct" and n == smallest else 1 if solver == "ekfac" else 2 if n == smallest else 3


def run_worker(kind: str, spec: dict[str, Any], timeout: float) -> tuple[dict | None, str]:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        status = f"killed after {timeout:.0f} s"
    else:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        status = "" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {last[:200]}"
        if kind == "probe" and not status:
            return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    got = out / "result.json"
    return (json.loads(got.read_text()) if got.exists() else None), status


def slowdown(probe_flops: float) -> float:
    """How much slower a float64 matmul runs now than at the probe, in [0.5, 4]: other jobs share the cores
    (the best of three tries half a second apart, so that a passing spike does not skip a cell)."""
    best = 0.0
    for _ in range(3):
        best = max(best, bench.matmul_flops())
        time.sleep(0.5)
    return min(max(0.5, probe_flops / best), 4.0)


def per_n(phase: dict[str, Any], n: int) -> float:
    return phase["seconds"] * n / phase.get("rows", n)


def fmt_seconds(phase: dict[str, Any] | None, n: int) -> str:
    if phase is None:
        return ""
    rows, seconds = phase.get("rows", n), phase["seconds"]
    return (f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}") if rows >= n else \
        f"~{per_n(phase, n):.0f} ({rows} rows: {seconds:.1f})"


def spearman(a: Any, b: Any) -> float:
    import numpy as np
    import pandas as pd

    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(folder: Path, ref: Path) -> tuple[str, str]:
    """Spearman with the reference's self-influence (on the rows both scored) and train->test scores."""
    import numpy as np

    si = tt = ""
    if (folder / "si.npz").exists() and (ref / "si.npz").exists():
        mine, theirs = np.load(folder / "si.npz"), np.load(ref / "si.npz")
        where = {int(r): i for i, r in enumerate(theirs["rows"])}
        both = [(v, theirs["si"][where[int(r)]]) for r, v in zip(mine["rows"], mine["si"], strict=True)
                if int(r) in where]
        if len(both) > 2:
            a, b = zip(*both, strict=True)
            si = f"{spearman(a, b):.3f}" + (f" ({len(both)} rows)" if len(both) < len(theirs["rows"]) else "")
    if (folder / "overall.npy").exists() and (ref / "overall.npy").exists():
        tt = f"{spearman(np.load(folder / 'overall.npy'), np.load(ref / 'overall.npy')):.3f}"
    return si, tt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--models", default="mlp10k,mlp1m", help="of mlp10k, mlp1m")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--max-seconds-per-cell", type=float, default=480.0)
    parser.add_argument("--max-seconds-reference", type=float, default=1800.0, help="direct (the reference)")
    parser.add_argument("--train-to-test-max-p", type=int, default=100_000,
                        help="train->test only for models with at most this many parameters")
    parser.add_argument("--max-seconds-total", type=float, default=2100.0, help="the whole run, workload included")
    parser.add_argument("--train-rows", type=int, default=10_000, help="rows the mlp10k checkpoint is trained on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, every cell")
    parser.add_argument("--workdir", help="keep the workload here (reused when it matches) instead of a temp folder")
    parser.add_argument("--dry-run", action="store_true", help="probe and print the plans; run no cell")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe or args.cell:
        spec = json.loads(args.probe or args.cell)
        print(json.dumps(bench.probe(spec) if args.probe else bench.cell(spec)))
        return
    begin, load0 = time.perf_counter(), os.getloadavg()[0]
    sizes = [int(s) for s in args.sizes.split(",")]
    models, solvers = args.models.split(","), [s for s in args.solvers.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        stored, key = root / "workload.json", [sizes, models, args.train_rows]
        if stored.exists() and json.loads(stored.read_text())["key"] == key:
            trained = json.loads(stored.read_text())["trained"]
        else:
            trained = bench.make_workload(root, sizes, models, args.train_rows)
            stored.write_text(json.dumps({"key": key, "trained": trained}))
        log(f"workload ready at {time.perf_counter() - begin:.0f} s: {trained}")
        probes = {}
        for model in models:
            spec = {"config": str(root / f"{model}_{min(sizes)}.json"), "overrides": args.overrides,
                    "threads": args.threads, "out": str(root / f"probe_{model}")}
            probes[model], status = run_worker("probe", spec, 600)
            if probes[model] is None:
                raise SystemExit(f"probe {model}: {status}")
            log(f"probe {model} at {time.perf_counter() - begin:.0f} s: {probes[model]}")
        settings = json.loads(json.dumps(bench.SETTINGS))
        for item in args.overrides:  # estimates follow --set solver.<name>.<key> overrides
            dotted, _, value = item.partition("=")
            parts = dotted.split(".")
            if parts[0] == "solver" and len(parts) == 3 and parts[1] in settings["solver"]:
                settings["solver"][parts[1]][parts[2]] = json.loads(value)
        cells = [(m, n, s) for m in models for n in sizes for s in solvers]
        est = {c: estimates(probes[c[0]], c[2], c[1], settings) for c in cells}
        limit = {c: args.max_seconds_reference if c[2] == "direct" else args.max_seconds_per_cell for c in cells}
        tt = {c: probes[c[0]]["p"] <= args.train_to_test_max_p for c in cells}
        order = sorted(cells, key=lambda c: (priority(c, min(sizes)),
                                             make_plan(c[2], est[c], limit[c], c[1], tt[c])[1]))
        results: dict[tuple, dict[str, Any]] = {}
        for c in order:
            model, n, solver = c
            factor = SAFETY * slowdown(probes[model]["flops"])
            scaled = {k: v * factor if k != "memory" else v for k, v in est[c].items()}
            left = args.max_seconds_total - (time.perf_counter() - begin) - 20  # 20 s for the report
            plan, planned, why = make_plan(solver, scaled, min(limit[c], max(left, 0.0)), n, tt[c])
            if plan is None and left < limit[c] and make_plan(solver, scaled, limit[c], n, tt[c])[0] is not None:
                why += f"; {max(left, 0):.0f} s of --max-seconds-total left"
            if plan is None or args.dry_run:
                results[c] = {"skipped": why or "dry run", "est": scaled}
                log(f"{c}: {'skipped: ' + why if plan is None else 'would run'} {plan or ''} est {planned:.0f} s "
                    f"(slowdown x{factor / SAFETY:.1f})")
                continue
            spec = {"config": str(root / f"{model}_{n}.json"), "overrides": [*args.overrides, f"solver.name={solver}"],
                    "threads": args.threads, "out": str(root / f"{model}_{n}_{solver}"), "plan": plan}
            start = time.perf_counter()
            got, status = run_worker("cell", spec, max(60.0, min(3 * planned + 120, left + 60)))
            results[c] = {"plan": plan, "planned": planned, "est": scaled, "got": got or {}, "status": status,
                          "wall": time.perf_counter() - start, "tt_allowed": tt[c]}
            log(f"{c} at {time.perf_counter() - begin:.0f} s: {status or 'ok'} in {results[c]['wall']:.0f} s "
                f"(planned {planned:.0f} s, slowdown x{factor / SAFETY:.1f}): {got}")
        report(root, cells, results, probes, trained, sizes)
        print(f"\nTotal wall time {time.perf_counter() - begin:.0f} s; load average at start {load0:.1f}, at end "
              f"{os.getloadavg()[0]:.1f} (2 cores).")


def report(root: Path, cells: list[tuple], results: dict, probes: dict, trained: dict, sizes: list[int]) -> None:
    print("| model | n | p | solver | fit s | self-influence s | train->test s | grads s | peak RSS MiB |"
          " rho self-inf. vs direct | rho train->test vs direct |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for c in cells:
        model, n, solver = c
        r, p = results[c], probes[model]["p"]
        e = r["est"]
        if "skipped" in r:
            print(f"| {model} | {n:,} | {p:,} | {solver} | skipped ({r['skipped']}) | | | | | | |")
            continue
        ph, plan = r["got"].get("phases", {}), r["plan"]
        fit = (f"{ph['fit']['seconds']:.1f}" if "fit" in ph else f"skipped (est. {e['fit']:.0f} s); stand-in on "
               f"{ph['standin_fit']['rows']} rows {ph['standin_fit']['seconds']:.1f}" if "standin_fit" in ph else "")
        rows = bench.SOLVE_SAMPLE
        scoring = (f"est. {e['si']:.0f} s" if "si" in e else
                   f"est. {e['si_sample']:.0f} s for {rows} rows, ~{e['si_sample'] * n / rows:.0f} for all")
        si = fmt_seconds(ph.get("si"), n) or (f"skipped ({scoring})" if not plan["si"] else "")
        why_tt = "" if r["tt_allowed"] else "p > --train-to-test-max-p; "
        tt = fmt_seconds(ph.get("tt"), n) or ("" if plan["tt"] else f"skipped ({why_tt}est. {e['tt']:.0f} s)")
        rho_si, rho_tt = ("1", "1") if solver == "direct" else ("", "")
        if solver != "direct" and plan["fit"] == "full":
            rho_si, rho_tt = agreement(root / f"{model}_{n}_{solver}", root / f"{model}_{n}_direct")
        status = f" [{r['status']}]" if r["status"] else ""
        grads, peak = fmt_seconds(ph.get("grads"), n), r["got"].get("peak_rss_mib", float("nan"))
        print(f"| {model} | {n:,} | {p:,} | {solver} | {fit}{status} | {si} | {tt} | {grads} | {peak:.0f} | {rho_si} |"
              f" {rho_tt} |")
        if r["got"].get("describe"):
            notes.append(f"{model} n={n:,} {solver}: {json.dumps(r['got']['describe'])[:300]}")
    print("\nSelf-influence time / time of the per-example gradients alone, both over all n rows:")
    for c in cells:
        ph = results[c].get("got", {}).get("phases", {})
        if c[2] in ("ekfac", "arnoldi") and "si" in ph and "grads" in ph:
            print(f"  {c[0]} n={c[1]:,} {c[2]}: self-influence {fmt_seconds(ph['si'], c[1])} s, gradients "
                  f"{fmt_seconds(ph['grads'], c[1])} s, ratio {per_n(ph['si'], c[1]) / per_n(ph['grads'], c[1]):.3f}")
    print("\nPeak RSS MiB by n, with the phases each cell ran (compare like with like):")
    for model in dict.fromkeys(m for m, _, _ in cells):
        for solver in dict.fromkeys(s for _, _, s in cells):
            got = [(n, results[(model, n, solver)]) for n in sizes if results[(model, n, solver)].get("got")]
            if len(got) > 1:
                print(f"  {model} {solver}: " + "; ".join(
                    f"n={n:,}: {r['got']['peak_rss_mib']:.0f} (fit {r['plan']['fit']}, self-influence "
                    f"{r['plan']['si'] or '-'}, grads {r['plan']['grads'] or '-'}, train->test "
                    f"{'yes' if r['plan']['tt'] else '-'})" for n, r in got))
    print("\nProbe (seconds per row; step*: seconds per lissa step; flops: float64 matmul/s):",
          json.dumps({m: {k: v if isinstance(v, int) else float(f"{v:.3g}") for k, v in pr.items()}
                      for m, pr in probes.items()}))
    print("Checkpoints:", json.dumps(trained))
    print("Solver diagnostics (describe()):")
    for line in notes:
        print("  " + line)


if __name__ == "__main__":
    main()
