"""Self-influence of every training row: `infl selfcheck` (EK-FAC) against kronfluence's self scores, one run.

The workload is train_test_speed.py's (built by its `build` into --work: --n rows of Gaussian features, an MLP
features-256-256-classes (ReLU) trained briefly with Adam, EK-FAC with damping 1e-3 and weight decay 1e-3).
Each side runs in its own process (peak RSS is that process's):
  infl         `infl selfcheck --gallery none --no-cache`: the whole command (load, fit, the scoring pass with
               self-influence and grad J, the leave-one-out audit, the reports) and its phases
  kronfluence  (if importable) `fit_all_factors` (EK-FAC) and `compute_self_scores` on the same model, data, damping
               (damping + weight decay, as infl's A = H + wd + damping) and batch size
and prints one JSON line with both, their ratio (total and fit+scoring) and the Spearman of the two self-influence
columns. Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/self_influence_speed.py [--n 50000] [--threads 1]

(kronfluence: `pip install kronfluence --no-deps opt-einsum einconv accelerate einops` into the venv.)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_test_speed import BATCH, DAMPING, WEIGHT_DECAY, build, infl, kronfluence_analyzer, kronfluence_run  # noqa: E402

from influence_cli.stats import spearman  # noqa: E402


def kronfluence_worker(work: Path, threads: int) -> None:
    """EK-FAC factors and self scores with kronfluence; prints a JSON line, saves the (n,) scores."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    analyzer, tensors = kronfluence_analyzer(work, threads)
    train = tensors("train")
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=BATCH, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac"))
    fit = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_self_scores("self", "ekfac", train, per_device_train_batch_size=BATCH, overwrite_output_dir=True,
                                 score_args=ScoreArguments(damping_factor=DAMPING + WEIGHT_DECAY))
    scoring = time.perf_counter() - start
    scores = analyzer.load_self_scores("self")["all_modules"].double().numpy()
    np.save(work / "kronfluence_self.npy", scores)
    print(json.dumps({"fit_s": round(fit, 1), "self_scores_s": round(scoring, 1), "total_s": round(fit + scoring, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/infl-self-influence")
    parser.add_argument("--kronfluence-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.kronfluence_worker:
        kronfluence_worker(work, args.threads)
        return
    config = build(work, args.n, 10, args.features, args.classes, args.hidden, args.epochs, "mlp")
    res: dict = {"n": args.n, "features": args.features, "classes": args.classes, "hidden": args.hidden,
                 "threads": args.threads}
    res["infl"] = infl(config, "selfcheck", work / "selfcheck", args.threads, False, "--gallery", "none")
    phases = res["infl"]["phases_s"]
    res["infl"]["fit_plus_score_s"] = round(phases.get("fit", 0.0) + phases.get("score", 0.0), 1)
    res["kronfluence"] = kronfluence_run(__file__, work, args.threads)
    if "error" not in res["kronfluence"]:
        theirs = np.load(work / "kronfluence_self.npy")
        ids = pd.read_parquet(work / "train.parquet", columns=["id"]).id.to_numpy()
        mine = pd.read_csv(work / "selfcheck" / "selfcheck.csv").set_index("id").self_influence.reindex(ids)
        res["spearman_self_influence"] = round(float(spearman(mine.to_numpy(), theirs)), 6)
        res["ratio_total"] = round(res["kronfluence"]["total_s"] / res["infl"]["wall_s"], 2)
        res["ratio_fit_plus_score"] = round(res["kronfluence"]["total_s"] / res["infl"]["fit_plus_score_s"], 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
