"""Agreement of each approximate solver with the exact (direct) solver, through the real pipeline.

Train->test influence is where approximations break, so the headline figure is the Spearman
correlation of `loss_change_if_removed` on the mean test loss (overall.csv) with direct's; also
the mean overlap of the per-test top-10 helpful/harmful rows, the Spearman of self-influence, the
share of flipped labels in the top 10% (digits answer key), and fit/score times.

Run:  .venv/bin/python benchmarks/solver_agreement.py [CONFIG] [--solvers cg,lissa,arnoldi,ekfac]
          [--set key=value ...]        (overrides applied to every solver, direct included)
Defaults: configs/digits.yaml (650-parameter logistic regression). A solver may carry one setting of its own
block as NAME:key=value, e.g. --solvers ekfac:refine=0,ekfac:refine=2 (solver.ekfac.refine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from influence_cli import api
from influence_cli.config import load_config
from influence_cli.run import Report

ROOT = Path(__file__).resolve().parents[1]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def run(config: str, overrides: list[str]) -> tuple[Report, Report, float]:
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    ranked = api.rank(cfg)
    seconds = time.perf_counter() - start
    return ranked, api.selfcheck(cfg), seconds


def tops(frame: pd.DataFrame) -> dict[str, set]:
    return {t: set(g["train_id"]) for t, g in frame.groupby("test_id")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--solvers", default="cg,lissa,arnoldi,ekfac")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--answer-key", default=str(ROOT / "sample_data" / "digits" / "answer_key.csv"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    key = pd.read_csv(args.answer_key, dtype={"id": str})
    flipped = set(key.loc[key["flipped"] == 1, "id"])

    ref_rank, ref_self, ref_seconds = run(args.config, [*args.overrides, "solver.name=direct"])
    ref_overall = ref_rank.tables["overall.csv"].set_index("id")["loss_change_if_removed"]
    ref_si = ref_self.tables["selfcheck.csv"].set_index("id")["self_influence"]
    ref_help, ref_harm = tops(ref_rank.tables["helpful.csv"]), tops(ref_rank.tables["harmful.csv"])

    def flips_top10(si: pd.Series) -> float:
        top = si.sort_values(ascending=False).index[: int(np.ceil(0.1 * len(si)))]
        return len(set(top) & flipped) / max(len(flipped), 1)

    print(f"config {args.config} {' '.join(args.overrides)}; direct: rank {ref_seconds:.1f} s, "
          f"flips in top 10% {flips_top10(ref_si):.3f}")
    print("| solver | overall Spearman | top-10 helpful / harmful overlap | self-influence Spearman | "
          "flips in top 10% | fit s | rank s |")
    print("|---|---|---|---|---|---|---|")
    for name in [s for s in args.solvers.split(",") if s]:
        solver, _, setting = name.partition(":")
        own = [f"solver.{solver}.{setting}"] if setting else []
        try:
            ranked, selfc, seconds = run(args.config, [*args.overrides, f"solver.name={solver}", *own])
        except Exception as e:  # noqa: BLE001 - report and go on with the next solver
            print(f"| {name} | failed: {type(e).__name__}: {e} | | | | | |")
            continue
        overall = ranked.tables["overall.csv"].set_index("id")["loss_change_if_removed"].loc[ref_overall.index]
        si = selfc.tables["selfcheck.csv"].set_index("id")["self_influence"].loc[ref_si.index]
        helpful, harmful = tops(ranked.tables["helpful.csv"]), tops(ranked.tables["harmful.csv"])
        h = np.mean([len(helpful[t] & ref_help[t]) / len(ref_help[t]) for t in ref_help])
        m = np.mean([len(harmful[t] & ref_harm[t]) / len(ref_harm[t]) for t in ref_harm])
        print(f"| {name} | {spearman(overall.to_numpy(), ref_overall.to_numpy()):.3f} | {h:.2f} / {m:.2f} | "
              f"{spearman(si.to_numpy(), ref_si.to_numpy()):.3f} | {flips_top10(si):.3f} | "
              f"{ranked.summary['phases_seconds']['fit']:.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
