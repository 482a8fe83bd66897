"""Agreement of the iterative solvers (cg, lissa) with direct on a real workload, and their wall time.

For each solver, runs `api.rank` (train -> test influence: `loss_change_if_removed` of every
training row on the mean test loss, the `overall.csv` column) and optionally `api.selfcheck`,
and compares the scores with the direct solver's: Spearman and Pearson correlation, and the overlap
of the 10 most helpful / harmful rows. Prints one line per solver and the solver's own diagnostics.
A solver may carry one setting of its own block as NAME:key=value (ekfac:refine=0 is --set solver.ekfac.refine=0).

    .venv/bin/python benchmarks/iterative_agreement.py -c configs/digits.yaml
    .venv/bin/python benchmarks/iterative_agreement.py -c configs/digits.yaml --solvers lissa \
        --set solver.lissa.depth=3000 --selfcheck
    .venv/bin/python benchmarks/iterative_agreement.py -c configs/digits.yaml \
        --solvers ekfac:refine=0 ekfac:refine=1 ekfac:refine=2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from influence_cli import api
from influence_cli.config import load_config
from influence_cli.run import Report


def _scores(report: Report, table: str, column: str) -> np.ndarray:
    frame = report.tables[table].sort_values("id")
    return frame[column].to_numpy(dtype=float)


def _overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> tuple[float, float]:
    top = len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k
    bottom = len(set(np.argsort(a)[:k]) & set(np.argsort(b)[:k])) / k
    return top, bottom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/digits.yaml")
    parser.add_argument("--solvers", nargs="+", default=["cg", "lissa"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="extra --set for the solvers")
    parser.add_argument("--selfcheck", action="store_true", help="also compare self-influence (n solves)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    commands = [("rank", "overall.csv", "loss_change_if_removed")]
    if args.selfcheck:
        commands.append(("selfcheck", "selfcheck.csv", "self_influence"))
    for command, table, column in commands:
        run = api.rank if command == "rank" else api.selfcheck
        start = time.perf_counter()
        ref = run(load_config(args.config, ["solver.name=direct"]))
        print(f"{command} direct: {time.perf_counter() - start:.1f}s  phases {ref.manifest['phases_seconds']}")
        expected = _scores(ref, table, column)
        for spec in args.solvers:
            name, _, setting = spec.partition(":")
            own = [f"solver.{name}.{setting}"] if setting else []
            cfg = load_config(args.config, [f"solver.name={name}", *own, *args.overrides])
            start = time.perf_counter()
            got = run(cfg)
            wall = time.perf_counter() - start
            scores = _scores(got, table, column)
            helpful, harmful = _overlap(scores, expected)
            print(f"{command} {spec}: {wall:.1f}s  spearman {spearmanr(scores, expected).statistic:.5f}"
                  f"  pearson {pearsonr(scores, expected).statistic:.5f}  top-10 overlap {helpful:.1f}/{harmful:.1f}"
                  f"  phases {got.manifest['phases_seconds']}")
            print("   ", json.dumps(got.manifest["solver"]))
            for warning in got.warnings:
                print("    warning:", warning)


if __name__ == "__main__":
    main()
