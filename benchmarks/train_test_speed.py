"""Train->test influence (`infl rank`) before and after layer-factored scoring, and against kronfluence.

Builds the workload in --work (default /tmp/infl-train-test; nothing here is committed): --n training rows and
--test test rows of --features Gaussian features, --classes classes from a random teacher network with label noise,
as Parquet; an MLP features-256-256-classes (ReLU) trained briefly with Adam (not at a minimum); a config with
EK-FAC and `refine: 0`. Then, each in its own process (peak RSS is that process's):
  before       `infl rank` with INFL_RANK_SCORING=legacy: vmap per-example gradients against float64 solves in blocks
               of BLOCK_BYTES / (8 p) test rows (one full gradient pass per block)
  float32      `infl rank --set rank.screen=false`: gradients from layer factors, the test solves held in float32,
               one pass, every pair scored by the float32 matmul (the default before the bfloat16 screen)
  after        `infl rank` (defaults: `rank.screen: auto`, the bfloat16 screen where the device makes it faster:
               influence_cli/screen.py)
  kronfluence  (if importable) EK-FAC factors and pairwise scores on the same model, data, damping and batch size
and prints one JSON line: the phase times and peak RSS of each, the Spearman of overall.csv before vs after (and
float32 vs after: the same top-K ids is the screen's claim), the
per-test-row overlap of the helpful / harmful top K (mean and min) and the Spearman of each test row's top-K values
on the rows both lists hold, and kronfluence's agreement with `after` (Spearman of the mean-over-test-rows scores
with overall.csv; per-test-row top-K overlap).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_test_speed.py --n 5000 --test 100     # quick
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_test_speed.py                          # 50k x 1k

--large N instead measures item 4 of issue 15: logistic regression (p = (features + 1) x classes) on N rows from
Parquet, `infl selfcheck` and `infl rank --test-ids` (100 test rows), at N and N / 5 (memory flat in n).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_cli.config import ModelConfig  # noqa: E402
from influence_cli.models import build_model, save_checkpoint  # noqa: E402
from influence_cli.stats import spearman  # noqa: E402

DAMPING, WEIGHT_DECAY, BATCH = 1e-3, 1e-3, 256


# ---- the workload ------------------------------------------------------------------------------------------------
def build(work: Path, n: int, test: int, features: int, classes: int, hidden: list[int], epochs: int,
          arch: str) -> Path:
    """Parquet train/test splits, a trained checkpoint and config.yaml in `work`; returns the config path."""
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + test, features, generator=g)
    teacher = torch.tanh(x @ torch.randn(features, 64, generator=g) / features**0.5) @ torch.randn(64, classes,
                                                                                                     generator=g)
    y = (teacher + 0.5 * torch.randn(n + test, classes, generator=g)).argmax(1)
    for name, rows in (("train", slice(0, n)), ("test", slice(n, n + test))):
        frame = pd.DataFrame(x[rows].numpy(), columns=[f"f{i}" for i in range(features)])
        frame.insert(0, "label", y[rows].numpy())
        frame.insert(0, "id", [f"{name[:2]}{i}" for i in range(len(frame))])
        frame.to_parquet(work / f"{name}.parquet", index=False)
    kwargs = ({"in_features": features, "hidden": hidden, "num_classes": classes} if arch == "mlp"
              else {"in_features": features, "num_classes": classes})
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, kwargs=kwargs))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, BATCH):
            rows = order[s : s + BATCH]
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(model, work / "model.pt", ModelConfig(arch=arch, kwargs=kwargs))
    config = {"model": {"arch": arch, "kwargs": kwargs, "checkpoint": "model.pt"}, "weight_decay": WEIGHT_DECAY,
              "batch_size": BATCH, "device": "cpu", "cache": {"enabled": False},
              "solver": {"name": "ekfac" if arch == "mlp" else "auto", "damping": DAMPING, "ekfac": {"refine": 0}},
              "data": {"train": {"format": "parquet", "path": "train.parquet", "label": "label", "id": "id"},
                       "test": {"format": "parquet", "path": "test.parquet", "label": "label", "id": "id"}},
              "output": {"dir": "reports"}}
    (work / "config.yaml").write_text(json.dumps(config, indent=1))
    return work / "config.yaml"


def infl(config: Path, command: str, out: Path, threads: int, legacy: bool, *extra: str) -> dict:
    """One `infl` run in its own process: wall seconds, the manifest's phases and its peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("INFL_RANK_SCORING", None)
    if legacy:
        env["INFL_RANK_SCORING"] = "legacy"
    exe = Path(sys.executable).with_name("infl")
    start = time.perf_counter()
    done = subprocess.run([str(exe), command, "-c", str(config), "-o", str(out), "--quiet", "--no-cache", *extra],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"infl {command} failed ({done.returncode}): {done.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(wall, 1), "phases_s": manifest["phases_seconds"],
            "peak_rss_mib": round(manifest["memory"]["peak_rss_bytes"] / 2**20),
            "scoring": manifest["summary"].get("scoring")}


# ---- kronfluence (its own process) -------------------------------------------------------------------------------
def kronfluence_analyzer(work: Path, threads: int):  # noqa: ANN201
    """(kronfluence Analyzer on the workload's model with a cross-entropy Task, tensors(split name) -> its
    TensorDataset): the setup both kronfluence workers (here and self_influence_speed.py) share."""
    torch.set_num_threads(threads)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task

    from influence_cli.models import load_model

    config = json.loads((work / "config.yaml").read_text())
    cfg = ModelConfig(arch=config["model"]["arch"], kwargs=config["model"]["kwargs"], checkpoint=work / "model.pt")
    model = load_model(cfg, torch.device("cpu"))

    def tensors(name: str) -> torch.utils.data.TensorDataset:
        frame = pd.read_parquet(work / f"{name}.parquet")
        x = torch.tensor(frame.drop(columns=["id", "label"]).to_numpy(np.float32))
        return torch.utils.data.TensorDataset(x, torch.tensor(frame.label.to_numpy()))

    class Classify(Task):
        def compute_train_loss(self, batch, model, sample=False):  # noqa: ANN001, ANN201
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):  # noqa: ANN001, ANN201
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    task = Classify()
    model = prepare_model(model, task)
    return Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=str(work / "kronfluence")), tensors


def kronfluence_run(script: str, work: Path, threads: int) -> dict:
    """Run `script --kronfluence-worker` in its own process (its peak RSS is its own): the worker's JSON line, or
    {"error": its last stderr line}."""
    done = subprocess.run([sys.executable, script, "--kronfluence-worker", "--work", str(work), "--threads",
                           str(threads)], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def kronfluence_worker(work: Path, threads: int) -> None:
    """EK-FAC factors and pairwise scores with kronfluence on the workload; prints a JSON line, saves the (T, n)
    scores to work/kronfluence_scores.npy."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    analyzer, tensors = kronfluence_analyzer(work, threads)
    train, test = tensors("train"), tensors("test")
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=BATCH, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac"))
    fit = time.perf_counter() - start
    args = ScoreArguments(damping_factor=DAMPING + WEIGHT_DECAY)
    start = time.perf_counter()
    analyzer.compute_pairwise_scores("pairs", "ekfac", test, train, per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=BATCH, score_args=args, overwrite_output_dir=True)
    pairwise = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("pairs")["all_modules"].double().numpy()
    np.save(work / "kronfluence_scores.npy", scores)
    print(json.dumps({"fit_s": round(fit, 1), "pairwise_s": round(pairwise, 1), "total_s": round(fit + pairwise, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


# ---- agreement ---------------------------------------------------------------------------------------------------
def overall_spearman(a: Path, b: Path) -> float:
    left, right = pd.read_csv(a / "overall.csv"), pd.read_csv(b / "overall.csv")
    m = left.merge(right, on="id")
    return float(spearman(m.loss_change_if_removed_x.to_numpy(), m.loss_change_if_removed_y.to_numpy()))


def top_agreement(a: Path, b: Path, name: str) -> dict:
    """Per test row: overlap of the two top-K id sets, and Spearman of the values on the ids both hold."""
    left, right = pd.read_csv(a / name), pd.read_csv(b / name)
    overlaps, rhos = [], []
    for test_id, mine in left.groupby("test_id"):
        theirs = right[right.test_id == test_id]
        both = mine.merge(theirs, on="train_id")
        overlaps.append(len(both) / len(mine))
        if len(both) > 2:
            rhos.append(spearman(both.loss_change_if_removed_x.to_numpy(), both.loss_change_if_removed_y.to_numpy()))
    return {"overlap_mean": round(float(np.mean(overlaps)), 4), "overlap_min": round(float(np.min(overlaps)), 4),
            "spearman_mean": round(float(np.nanmean(rhos)), 5) if rhos else None}


def max_value_error(a: Path, b: Path, name: str) -> float:
    """max |after - before| over the pairs both hold, relative to each test row's largest |before|."""
    left, right = pd.read_csv(a / name), pd.read_csv(b / name)
    m = left.merge(right, on=["test_id", "train_id"])
    scale = m.groupby("test_id").loss_change_if_removed_y.transform(lambda v: v.abs().max())
    return float(((m.loss_change_if_removed_x - m.loss_change_if_removed_y).abs() / scale).max())


def kronfluence_agreement(work: Path, after: Path, top: int) -> dict:
    scores = np.load(work / "kronfluence_scores.npy")  # (T, n), row order of the splits
    train_ids = pd.read_parquet(work / "train.parquet", columns=["id"]).id.to_numpy()
    test_ids = pd.read_parquet(work / "test.parquet", columns=["id"]).id.to_numpy()
    overall = pd.read_csv(after / "overall.csv").set_index("id").loss_change_if_removed.reindex(train_ids)
    helpful = pd.read_csv(after / "helpful.csv")
    overlaps = []
    for t, test_id in enumerate(test_ids):
        mine = set(helpful[helpful.test_id == test_id].train_id)
        theirs = set(train_ids[np.argsort(-scores[t])[:top]])
        overlaps.append(len(mine & theirs) / top)
    return {"overall_spearman": round(float(spearman(overall.to_numpy(), scores.mean(0))), 5),
            "helpful_top_overlap_mean": round(float(np.mean(overlaps)), 4)}


# ---- main --------------------------------------------------------------------------------------------------------
def train_test(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    config = build(work, args.n, args.test, args.features, args.classes, args.hidden, args.epochs, "mlp")
    res: dict = {"n": args.n, "test": args.test, "features": args.features, "classes": args.classes,
                 "hidden": args.hidden, "threads": args.threads, "top": args.top}
    top = ["--top", str(args.top)]
    if not args.skip_legacy:
        res["before"] = infl(config, "rank", work / "before", args.threads, True, *top)
    if not args.skip_float32:
        res["float32"] = infl(config, "rank", work / "float32", args.threads, False, *top, "--set", "rank.screen=false")
    res["after"] = infl(config, "rank", work / "after", args.threads, False, *top)
    if not args.skip_float32:
        res["overall_spearman_float32_after"] = round(overall_spearman(work / "float32", work / "after"), 7)
        for name in ("helpful.csv", "harmful.csv"):
            res[f"{name[:-4]}_top_float32_after"] = top_agreement(work / "after", work / "float32", name)
            res[f"{name[:-4]}_max_value_error_float32_after"] = max_value_error(work / "after", work / "float32", name)
        res["speedup_total_float32_after"] = round(res["float32"]["wall_s"] / res["after"]["wall_s"], 2)
        res["speedup_score_float32_after"] = round(res["float32"]["phases_s"]["score"]
                                                   / res["after"]["phases_s"]["score"], 2)
    if not args.skip_legacy:
        res["overall_spearman_before_after"] = round(overall_spearman(work / "before", work / "after"), 7)
        for name in ("helpful.csv", "harmful.csv"):
            res[f"{name[:-4]}_top_before_after"] = top_agreement(work / "after", work / "before", name)
            res[f"{name[:-4]}_max_value_error"] = max_value_error(work / "after", work / "before", name)
        res["speedup_total"] = round(res["before"]["wall_s"] / res["after"]["wall_s"], 2)
        res["speedup_score"] = round(res["before"]["phases_s"]["score"] / res["after"]["phases_s"]["score"], 2)
    if not args.skip_kronfluence:
        res["kronfluence"] = kronfluence_run(__file__, work, args.threads)
        if "error" not in res["kronfluence"]:
            res["kronfluence"]["agreement_with_after"] = kronfluence_agreement(work, work / "after", args.top)
            res["ratio_kronfluence_total_over_after_wall"] = round(res["kronfluence"]["total_s"]
                                                                    / res["after"]["wall_s"], 2)
            res["ratio_kronfluence_pairwise_over_after_score"] = round(res["kronfluence"]["pairwise_s"]
                                                                        / res["after"]["phases_s"]["score"], 2)
    return res


def large(args: argparse.Namespace) -> list[dict]:
    """Item 4: logistic regression on N and N / 5 rows from Parquet: selfcheck and rank on 100 test rows."""
    out = []
    for n in (args.large // 5, args.large):
        work = Path(args.work) / f"large-{n}"
        config = build(work, n, args.test, args.features, args.classes, [], 1, "logreg")
        ids = ",".join(f"te{i}" for i in range(min(100, args.test)))
        row = {"n": n, "parameters": (args.features + 1) * args.classes, "threads": args.threads,
               "parquet_mib": round((work / "train.parquet").stat().st_size / 2**20)}
        row["selfcheck"] = infl(config, "selfcheck", work / "selfcheck", args.threads, False, "--gallery", "none")
        row["rank_100_test_rows"] = infl(config, "rank", work / "rank", args.threads, False, "--test-ids", ids)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--test", type=int, default=1_000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/infl-train-test")
    parser.add_argument("--skip-legacy", action="store_true")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--skip-float32", action="store_true", help="skip the run with rank.screen: false")
    parser.add_argument("--large", type=int, default=None, help="item 4: logistic regression on this many rows")
    parser.add_argument("--kronfluence-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kronfluence_worker:
        kronfluence_worker(Path(args.work), args.threads)
    elif args.large:
        large(args)
    else:
        print(json.dumps(train_test(args)), flush=True)


if __name__ == "__main__":
    main()
