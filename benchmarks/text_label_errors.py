"""Label errors in a text classifier, through the CLI: recall of flips in the top 10%, selfcheck time and peak memory.

A templated corpus (tests/textgen.py: three topics, two class keywords per sentence, filler words, some a
distractor keyword of another class) with 10% of labels flipped; a tiny BERT (hidden 32, 2 blocks, 2 heads,
WordPiece trained on the corpus) fine-tuned on the noisy labels outside infl (AdamW, every weight); then
`infl train` polishes the head (L-BFGS) and `infl selfcheck` runs with ekfac and arnoldi, on the head
(`params: last_layer`) and on the head and the last block (`params: {last_blocks: 1}`; ekfac over its Linear
layers, `linear_only: true`, as ekfac factors only those). Each command runs as its own process: wall
seconds and peak RSS (ru_maxrss of that child) are its own. Beside: ranking by the training loss, and cleanlab
(`find_label_issues`, ranked by self-confidence) on out-of-sample probabilities from 4-fold cross-fitting
with the same fine-tuning recipe (in-sample probabilities above --cv-max rows).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_label_errors.py --rows 2000 --out /tmp/textbench
Needs the [hf] extra; cleanlab and scikit-learn for the cleanlab column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import textgen  # noqa: E402

CELLS = [("ekfac", "last_layer"), ("arnoldi", "last_layer"), ("ekfac", "{last_blocks: 1, linear_only: true}"),
         ("arnoldi", "{last_blocks: 1}")]


def infl(*argv: str) -> tuple[dict, float, float]:
    """(--json summary, wall seconds, peak RSS GiB) of one CLI process (os.wait4: that child's own rusage)."""
    exe = Path(sys.executable).with_name("infl")
    start = time.perf_counter()
    with subprocess.Popen([str(exe), *argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as proc:
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"infl {' '.join(argv)} exited {proc.returncode}: {err[-2000:]}")
    return json.loads(out), wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def recall(order: np.ndarray, flipped: np.ndarray, n: int) -> float:
    top = set(order[: n // 10].tolist())
    return len(top & set(flipped.tolist())) / len(flipped)


def probabilities(folder: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), 256):
            enc = tok(texts[s : s + 256], padding=True, return_tensors="pt")
            out.append(model(**enc).logits.softmax(1))
    return torch.cat(out).numpy()


def cleanlab_recall(root: Path, frame: pd.DataFrame, y: np.ndarray, flipped: np.ndarray, epochs: int,
                    cv_max: int) -> tuple[float | None, str]:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None, "cleanlab not installed"
    n, texts = len(frame), frame.text.tolist()
    if n <= cv_max:
        probs = np.zeros((n, y.max() + 1))
        folds = np.random.default_rng(0).permutation(n) % 4
        for k in range(4):
            fit, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            folder = textgen.tiny_bert(root / f"cv{k}", [texts[i] for i in fit])
            textgen.fine_tune(folder, [texts[i] for i in fit], y[fit].tolist(), epochs=epochs)
            probs[held] = probabilities(folder, [texts[i] for i in held])
        how = "4-fold out-of-sample"
    else:
        probs, how = probabilities(root / "model", texts), "in-sample"
    order = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    found = set(order[: n // 10].tolist())  # cleanlab flags a set; its ranked top 10% for the same budget
    return len(found & set(flipped.tolist())) / len(flipped), f"{how}, {len(order)} flagged"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/textbench"))
    ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (AdamW, lr 1e-3, batch 16)")
    ap.add_argument("--cv-max", type=int, default=5000)
    ap.add_argument("--cells", default="0,1,2,3", help="which of CELLS to run")
    args = ap.parse_args()
    root = args.out / f"n{args.rows}"
    root.mkdir(parents=True, exist_ok=True)
    frame, flipped = textgen.corpus(args.rows, seed=0)
    frame.to_csv(root / "train.csv", index=False)
    classes = sorted(set(frame.label))
    y = np.array([classes.index(c) for c in frame.label])
    start = time.perf_counter()
    folder = textgen.tiny_bert(root / "model", frame.text.tolist())
    textgen.fine_tune(folder, frame.text.tolist(), y.tolist(), epochs=args.epochs)
    print(f"rows {args.rows}, flips {len(flipped)}; fine-tuned outside infl in {time.perf_counter() - start:.0f} s",
          flush=True)
    config = textgen.write_config(root / "config.yaml", folder, root / "train.csv")
    trained, wall, _ = infl("train", "-c", str(config), "--set", "train.optimizer=lbfgs")
    print(f"infl train (head L-BFGS): {wall:.0f} s, train accuracy {trained['train_accuracy']:.3f}, gradient norm "
          f"{trained['grad_norm']:.2g}", flush=True)
    rows = []
    for i in map(int, args.cells.split(",")):
        solver, params = CELLS[i]
        out = root / f"r{i}"
        summary, wall, rss = infl("selfcheck", "-c", str(config), "--set", f"solver.name={solver}", "--set",
                                  f"params={params}", "--out", str(out), "--no-cache")
        table = pd.read_csv(out / "selfcheck.csv", keep_default_na=False)
        where = {rid: i for i, rid in enumerate(frame.id)}
        order = np.array([where[r] for r in table.id])
        by_loss = np.array([where[r] for r in table.sort_values("loss", ascending=False, kind="stable").id])
        rows.append({"solver": solver, "params": params, "parameters": summary.get("parameters"),
                     "seconds": round(wall, 1), "peak_rss_gib": round(rss, 2),
                     "recall_top10_suspicion": recall(order, flipped, args.rows),
                     "recall_top10_loss": recall(by_loss, flipped, args.rows)})
        print(rows[-1], flush=True)
    clean, how = cleanlab_recall(root, frame, y, flipped, args.epochs, args.cv_max)
    print(f"cleanlab ({how}): recall of flips in its top 10% {clean}")
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
