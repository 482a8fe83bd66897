"""Benchmark: `selfcheck --cross-fit K` on models that memorize their labels, against cleanlab.

The MLP cells of benchmarks/label_errors.py (a tanh MLP, 32 hidden units, weight decay 1e-4, float64 L-BFGS
to convergence: it fits most flipped labels), at 10% uniform and 20% class-conditional noise. Scores
(higher = more suspect), recall of flips in the top 10% / 20% and average precision:
  loss, cleanlab (5-fold out-of-fold sklearn MLP, as in label_errors.py), suspicion (one fit, Newton LOO:
  today's default), oof_* (the out-of-fold outputs of 5 fresh `infl` MLPs trained with the same recipe on
  4 folds each: what `--cross-fit 5` computes; folds here are sklearn's StratifiedKFold), and the rank means
  rank(loss,oof_loss,oof_margin) (what `--cross-fit` ships) and rank(loo,oof_loss,oof_margin).
Development only (scikit-learn, cleanlab, statsmodels, palmerpenguins). From the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crossfit_label_errors.py wine,iris,breast_cancer,penguins,digits,anes96
    ... crossfit_label_errors.py wine,iris 0.1:uniform      # only the 10% uniform cell of each
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import time

import label_errors as le
import numpy as np
import torch

from influence_cli.suspicion import class_probs, fit_temperature, flag_errors, label_margin, suspicion

torch.set_num_threads(1)


oof = le.oof_outputs  # the same folds and trainings as label_errors.py


CELLS = [(0.1, "uniform"), (0.2, "classcond")]
if len(sys.argv) > 2:  # e.g. 0.1:uniform (only that cell per dataset)
    CELLS = [(float(c.split(":")[0]), c.split(":")[1]) for c in sys.argv[2].split(",")]

for name in sys.argv[1].split(","):
    for rate, kind in CELLS:
        x, clean = le.load_dataset(name)
        classes = int(clean.max()) + 1
        seed = int(1000 * rate) + (7 if kind == "classcond" else 0)
        y, flipped = le.add_noise(clean, classes, rate, kind, seed)
        t = time.time()
        inf = le.influence_cell(x, y, classes, "mlp")
        cl = le.cleanlab_cell(x, y, "mlp")
        o = oof(x, y, classes, "mlp")
        probs = class_probs(o)
        oofl = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-300, None))
        marg = label_margin(probs, y)
        lprobs = class_probs(inf["loo_outputs"])
        cands = {
            "loss": inf["loss"],
            "cleanlab": cl["cl_score"],
            "suspicion": suspicion(inf["loss"], inf["loo_loss"], label_margin(lprobs, y)),
            "oof_margin": marg,
            "oof_loss": oofl,
            "rank(oof_loss,oof_margin)": suspicion(oofl, oofl, marg),
            "rank(loss,oof_loss,oof_margin)": suspicion(inf["loss"], oofl, marg),
            "rank(loo,oofl,oofm)": suspicion(inf["loo_loss"], oofl, marg),
        }
        res = {k: le.metrics(np.asarray(v), flipped) for k, v in cands.items()}
        fl = flag_errors(y, probs)
        scaled = flag_errors(y, class_probs(o / fit_temperature(o, y)))  # what --cross-fit flags with
        print(
            name,
            rate,
            kind,
            f"{time.time() - t:.0f}s",
            " | ".join(f"{k} {r[0]:.3f}/{r[1]:.3f}/{r[2]:.3f}" for k, r in res.items()),
            f"| flags {fl.flagged.sum()}/{flipped.sum()} prec {flipped[fl.flagged].mean():.2f}"
            f" | scaled flags {scaled.flagged.sum()} prec {flipped[scaled.flagged].mean():.2f} CL {cl['cl_flagged'].sum()}",
            flush=True,
        )
