"""How `infl selfcheck` (direct solver) scales with n, against the floors it cannot beat.

For n in {1k, 10k, 50k} training rows of 64 features and two models (logreg: 650 parameters, MLP
64-40-10: 3,010 parameters) it prints, each measured in a fresh subprocess:
  grads    time of the per-example gradients alone (GradientSource.per_example over all rows)
  algebra  time torch needs for the unavoidable dense algebra of the same shapes, in float64:
           forming a p x p matrix from n x p rows (G^T G) plus whitening n x p rows with a p x p
           triangular factor, streamed in the same blocks of rows
  selfcheck  wall time of api.selfcheck (load, checkpoint gradient, Hessian, factor, scores)
  ratio    selfcheck / max(grads, algebra)
  peak_rss   peak resident memory of the subprocess (MiB), which must stay flat in n

Run:  .venv/bin/python benchmarks/selfcheck_scaling.py [--sizes 1000,10000,50000] [--repeats 3]
Medians over --repeats runs; each run in its own process so peak memory is per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "logreg": {"arch": "logreg", "kwargs": {"in_features": 64, "num_classes": 10}},
    "mlp": {"arch": "mlp", "kwargs": {"in_features": 64, "hidden": [40], "num_classes": 10}},
}


def make_workload(folder: Path, n: int, model: str) -> Path:
    """Synthetic 10-class data from a random teacher, a random-init checkpoint, and a config."""
    import numpy as np
    import pandas as pd
    import torch

    from influence_cli.config import ModelConfig
    from influence_cli.models import build_model, save_checkpoint

    rng = np.random.default_rng(0)
    x = rng.random((n, 64)).astype(np.float32)
    teacher = rng.normal(size=(64, 10))
    y = (x @ teacher + rng.gumbel(size=(n, 10))).argmax(1)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(64)])
    frame.insert(0, "label", y)
    frame.to_csv(folder / "train.csv", index=False)
    torch.manual_seed(0)
    spec = MODELS[model]
    net = build_model(ModelConfig(arch=spec["arch"], kwargs=spec["kwargs"]))
    save_checkpoint(net, folder / "model.pt")
    config = {"model": {**spec, "checkpoint": "model.pt"}, "data": {"train": {"format": "csv", "path": "train.csv"}},
              "device": "cpu", "batch_size": 512}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return folder / "config.yaml"


def measure(config: str) -> dict:
    """One run, in this (fresh) process."""
    import resource

    import torch

    from influence_cli import api
    from influence_cli.config import load_config
    from influence_cli.gradients import GradientSource

    torch.set_num_threads(2)
    cfg = load_config(config)
    api.selfcheck(cfg)  # first, so the peak memory below is selfcheck's own (and warm-up, like grads')
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = api.selfcheck(cfg)  # timed warm, as the gradients below are
    selfcheck = time.perf_counter() - start
    inp = api.open_run(cfg)
    source = GradientSource(inp.problem)
    for _ in source.per_example(inp.problem.train_loader):  # warm-up (functorch tracing, allocator)
        break
    start = time.perf_counter()
    for _ in source.per_example(inp.problem.train_loader):
        pass
    grads = time.perf_counter() - start

    n, p, rows = inp.train.n, inp.problem.params.size, min(source.rows_per_block(), 4096)
    block = torch.randn(min(rows, n), p, dtype=torch.float64)
    chol = torch.linalg.cholesky(block.T @ block / len(block) + torch.eye(p, dtype=torch.float64))
    start = time.perf_counter()
    acc = torch.zeros(p, p, dtype=torch.float64)
    for s in range(0, n, len(block)):
        g = block[: min(len(block), n - s)]
        acc.addmm_(g.T, g)
    for s in range(0, n, len(block)):
        g = block[: min(len(block), n - s)]
        torch.linalg.solve_triangular(chol, g.T, upper=False)
    algebra = time.perf_counter() - start
    del block, acc

    return {"n": n, "p": p, "grads": grads, "algebra": algebra, "selfcheck": selfcheck,
            "phases": result.manifest["phases_seconds"], "factorization": result.manifest["solver"]["factorization"],
            "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    print("| model | n | p | grads s | algebra s | selfcheck s | ratio | phases (fit / score) s | factor | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for n in (int(s) for s in args.sizes.split(",")):
                folder = Path(tmp) / f"{model}-{n}"
                folder.mkdir()
                config = make_workload(folder, n, model)
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable, __file__, "--worker", str(config)], check=True,
                                         capture_output=True, text=True).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                med = {k: statistics.median(r[k] for r in runs) for k in ("grads", "algebra", "selfcheck",
                                                                          "peak_rss_mib")}
                fit = statistics.median(r["phases"]["fit"] for r in runs)
                score = statistics.median(r["phases"]["score"] for r in runs)
                ratio = med["selfcheck"] / max(med["grads"], med["algebra"])
                print(f"| {model} | {n} | {runs[0]['p']} | {med['grads']:.2f} | {med['algebra']:.2f} | "
                      f"{med['selfcheck']:.2f} | {ratio:.2f} | {fit:.2f} / {score:.2f} | {runs[0]['factorization']} | "
                      f"{med['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
