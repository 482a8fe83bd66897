"""How suspicion's loss weight and the flag rule were chosen: alternatives scored on label_errors.py's cached cells.

Reads the cells `benchmarks/label_errors.py --cache DIR --draws ...` wrote (nothing is trained here; a missing
cell is computed as label_errors.py computes it) and prints, for each alternative:

- `weights`: suspicion = w rank(loss) + (1 - w) mean(rank(leave-one-out loss), rank(leave-one-out margin)) for
  w in WEIGHTS; for logistic regression from one fit's Newton leave-one-out, for the MLP from the out-of-fold
  outputs (what selfcheck audits a memorizing model with). Per cell the mean over the draws of recall at 10%,
  20% and average precision, minus the best of loss / self_influence / cleanlab; the table gives the cells within
  0.01, the mean and the worst of that gap.
- `flags` (10% noise): confident learning's own rows against the same count taken from the top of the default
  suspicion, and two rules that were dropped; cells where the mean count per draw is within 30% of the flips at
  pooled precision >= 0.7.

From the repository root (the draws the README quotes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_rules.py --cache DIR --models logreg --draws 0,1,2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_rules.py --cache DIR --models logreg --draws 5,6,7
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_rules.py --cache DIR --models logreg --draws 0,1,2,5,6,7
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_rules.py --cache DIR --models mlp --draws 0,1,2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_rules.py --cache DIR --draws 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import label_errors as le  # noqa: E402

from influence_cli.report import top_mask  # noqa: E402
from influence_cli.suspicion import class_probs, fit_temperature, flag_errors, label_margin, percentile_rank  # noqa: E402

WEIGHTS = (1 / 3, 0.5, 0.6, 0.7, 0.8, 0.9)
BASELINES = ("loss", "self_influence", "cleanlab")


def held_out(c: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(held-out loss, held-out margin): out-of-fold when the cell has them, else the Newton leave-one-out."""
    y = c["labels"]
    if "oof_outputs" in c:
        p = class_probs(c["oof_outputs"])
        return -np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)), label_margin(p, y)
    return c["loo_loss"], label_margin(class_probs(c["loo_outputs"]), y)


def weights(args: argparse.Namespace, model: str, draws: list[int]) -> list[str]:
    gaps: dict[str, list[float]] = {}
    for name in le.DATASETS:
        for rate in (0.1, 0.2):
            for kind in ("uniform", "classcond"):
                runs: dict[str, list[tuple[float, float, float]]] = {}
                for d in draws:
                    c = le.cell(args, name, model, rate, kind, d)
                    truth, base = c["flipped"], le.scores(c)
                    loss, margin = held_out(c)
                    for k in BASELINES:
                        runs.setdefault(k, []).append(le.metrics(np.asarray(base[k]), truth))
                    for w in WEIGHTS:
                        score = w * percentile_rank(c["loss"]) + (1 - w) * 0.5 * (
                            percentile_rank(loss) + percentile_rank(margin))
                        runs.setdefault(f"w={w:.2f}", []).append(le.metrics(score, truth))
                mean = {k: np.mean(v, axis=0) for k, v in runs.items()}
                best = np.max([mean[k] for k in BASELINES], axis=0)
                for k in mean:
                    gaps.setdefault(k, []).append(float(np.min(mean[k] - best)))
    lines = [f"| {model} draws {','.join(map(str, draws))} | within 0.01 | mean gap | worst |", "|---|---|---|---|"]
    for k, g in gaps.items():
        a = np.array(g)
        lines.append(f"| {k} | {(a >= -0.01).sum()}/{len(a)} | {a.mean():+.4f} | {a.min():+.3f} |")
    return lines


def flag_rules(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    y = c["labels"]
    o = c.get("oof_outputs")
    probs = class_probs(c["loo_outputs"]) if o is None else class_probs(o / fit_temperature(o, y))
    flags = flag_errors(y, probs, bootstrap=0)
    default = le.default_audit(c)[0]
    n = len(y)
    rows = np.arange(n)
    estimated = top_mask(default, round(flags.error_rate * n))
    return {"confident learning's rows": flags.flagged,
            "its count, top of suspicion (selfcheck)": top_mask(default, int(flags.flagged.sum())),
            "estimated count, top of suspicion": estimated,
            "estimated count, top, and CL's rows": estimated & flags.flagged,
            "CL's rows, suggestion beats the label by 0.2": flags.flagged & (
                probs[rows, flags.suggested] > probs[rows, y] + 0.2)}


def flags(args: argparse.Namespace, models: list[str], draws: list[int]) -> list[str]:
    calibrated: dict[str, list[str]] = {}
    for model in models:
        for name in le.DATASETS:
            for kind in ("uniform", "classcond"):
                totals: dict[str, list[int]] = {}
                for d in draws:
                    c = le.cell(args, name, model, 0.1, kind, d)
                    truth = c["flipped"]
                    for k, f in flag_rules(c).items():
                        t = totals.setdefault(k, [0, 0, 0])
                        t[0], t[1], t[2] = t[0] + int(f.sum()), t[1] + int(truth.sum()), t[2] + int((f & truth).sum())
                for k, (flagged, flips, hits) in totals.items():
                    ok = 0.7 <= flagged / flips <= 1.3 and hits / max(flagged, 1) >= 0.7
                    calibrated.setdefault(k, []).append("" if ok else f"{name} {model} {kind}")
    lines = [f"| flags at 10%, draws {','.join(map(str, draws))} | calibrated cells | misses |", "|---|---|---|"]
    for k, cells in calibrated.items():
        miss = [m for m in cells if m]
        lines.append(f"| {k} | {len(cells) - len(miss)}/{len(cells)} | {'; '.join(miss)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="label_errors.py's --cache folder")
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--draws", default="0,1,2")
    args = parser.parse_args()
    draws = [int(d) for d in args.draws.split(",")]
    models = args.models.split(",")
    for model in models:
        print("\n".join(weights(args, model, draws)) + "\n")
    print("\n".join(flags(args, models, draws)))


if __name__ == "__main__":
    main()
