"""FastIF narrowing (`rank --knn K`) vs the full ranking: seconds per phase and top-10 recall, per metric.

Data: 64 features in [0, 1), 10 classes from a random linear teacher with Gumbel noise, 5% of the training
labels flipped (so there are harmful rows), 20 held-out test rows. Checkpoints are trained here (seconds).
  mlp     64-512-256-10 MLP (167,178 parameters; --hidden), trained 3 Adam epochs; solver ekfac with
          output_factor sample and refine 0, so that the Hessian fit (the same in both runs) stays small next to
          the scoring. Per-example gradients dominate, as for real models: a few ms per row here, against
          ~0.1 ms for a forward and backward pass of the same row in a large batch.
  logreg  64-10 (650 parameters), trained to the optimum; solver direct. A per-example gradient costs about
          what a forward pass does, so --knn has little to save.
Each workload runs the full ranking, then --knn K with each metric (after one untimed warm-up run), and prints
wall seconds of `api.rank` (= the command minus writing files), the phases (summary['phases_seconds']), the
speed-ups of the whole run, of the run without the Hessian fit (identical in both), and of the scoring work
(full: phase score; knn: phases knn + score), and the mean per-test-row overlap of the top-10 helpful and
harmful rows with the full ranking's (the recall of the narrowing: candidates are scored exactly).
One torch thread by default: on a shared 2-core box, 2 threads contend (10x slower runs were measured).
Run: .venv/bin/python benchmarks/knn_speed.py [--n 50000] [--hidden 512,256] [--k 100] [--tests 20] [--only mlp] [--metrics grad,kfac]
     [--kfac-damping 0.001,0.01,0.1,0.3,1] [--ekfac-refine 2 --ekfac-output auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from influence_cli import api  # noqa: E402
from influence_cli import knn as knn_module  # noqa: E402
from influence_cli.config import Config, ModelConfig, load_config  # noqa: E402
from influence_cli.models import build_model, save_checkpoint  # noqa: E402

METRICS = ("cosine", "l2", "grad", "kfac")
WEIGHT_DECAY = 1e-3


def make_data(folder: Path, n: int, tests: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((n + tests, 64)).astype(np.float32)
    y = (x @ rng.normal(size=(64, 10)) * 3 + rng.gumbel(size=(n + tests, 10))).argmax(1)
    flip = rng.random(n) < 0.05
    y_train = y[:n].copy()
    y_train[flip] = (y_train[flip] + rng.integers(1, 10, flip.sum())) % 10
    np.savez(folder / "train.npz", x=x[:n], y=y_train)
    np.savez(folder / "test.npz", x=x[n:], y=y[n:])


def train_model(folder: Path, spec: dict, epochs: int) -> None:
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=spec["arch"], kwargs=spec["kwargs"]))
    with np.load(folder / "train.npz") as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"]).long()
    if spec["arch"] == "logreg":  # convex: to the optimum, full batch
        opt = torch.optim.LBFGS(net.parameters(), max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            reg = 0.5 * WEIGHT_DECAY * sum(p.square().sum() for p in net.parameters())
            loss = torch.nn.functional.cross_entropy(net(x), y) + reg
            loss.backward()
            return loss

        opt.step(closure)
        epochs = 0
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)  # grad term = the L2 term's
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    save_checkpoint(net.eval(), folder / f"{spec['arch']}.pt")


def config(folder: Path, spec: dict, solver: dict) -> Config:
    doc = {"model": {**spec, "checkpoint": f"{spec['arch']}.pt"}, "device": "cpu", "batch_size": 512,
           "weight_decay": WEIGHT_DECAY, "solver": solver,
           "data": {"train": {"format": "tensors", "path": "train.npz"},
                    "test": {"format": "tensors", "path": "test.npz"}}}
    if "cache" in {f.name for f in dataclasses.fields(Config)}:
        doc["cache"] = {"enabled": False}  # a reused Hessian fit would favor whichever run comes second
    path = folder / f"{spec['arch']}.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return load_config(path)


def tops(result, table: str) -> dict[str, set]:
    return {t: set(g.train_id) for t, g in result.tables[table].groupby("test_id")}


def overlap(full, knn, table: str) -> float:
    a, b = tops(full, table), tops(knn, table)
    return float(np.mean([len(a[t] & b[t]) / len(a[t]) for t in a]))


def timed(cfg: Config, **kw):
    start = time.perf_counter()
    result = api.rank(cfg, top=10, **kw)
    return result, time.perf_counter() - start


def bench(name: str, cfg: Config, k: int, metrics: tuple[str, ...] = METRICS,
          dampings: tuple[float | None, ...] = (None,)) -> None:
    timed(cfg, knn=k)  # warm-up: imports, vmap tracing, allocator
    full, t_full = timed(cfg)
    ph = full.summary["phases_seconds"]
    print(f"\n{name}: n={full.summary['n']}, {full.summary['parameters']} parameters, "
          f"{full.summary['test_examples']} test rows, solver {full.summary['solver']}")
    print(f"  full        total {t_full:7.1f}s  " + " ".join(f"{p}={s:.1f}" for p, s in ph.items()))
    runs = [(m, d) for m in metrics for d in (dampings if m == "kfac" else [None])]
    for metric, damping in runs:
        if damping is not None:
            knn_module.KFAC_DAMPING = damping
            print(f"  (kfac damping {damping:g} of each factor's mean eigenvalue)")
        knn, t_knn = timed(cfg, knn=k, knn_metric=metric)
        kp, info = knn.summary["phases_seconds"], knn.summary["knn"]
        no_fit = (t_full - ph["fit"]) / (t_knn - kp["fit"])
        scoring = ph["score"] / (kp["knn"] + kp["score"])
        print(f"  knn {metric:<7} total {t_knn:7.1f}s  " + " ".join(f"{p}={s:.1f}" for p, s in kp.items()))
        print(f"      speed-up: whole run {t_full / t_knn:.1f}x, without the fit {no_fit:.1f}x, scoring {scoring:.1f}x "
              f"(score phase alone {ph['score'] / kp['score']:.1f}x); scored {info['scored_rows']} rows "
              f"({info['scored_fraction']:.3f}); top-10 overlap helpful {overlap(full, knn, 'helpful.csv'):.2f}, "
              f"harmful {overlap(full, knn, 'harmful.csv'):.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--hidden", default="512,256", help="MLP hidden widths, comma separated")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--tests", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3, help="Adam epochs for the MLP")
    ap.add_argument("--only", choices=["mlp", "logreg"])
    ap.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of " + ", ".join(METRICS))
    ap.add_argument("--kfac-damping", help="comma-separated KFAC_DAMPING values to sweep for the kfac metric"
                    " (default: the package's)")
    ap.add_argument("--ekfac-refine", type=int, default=0, help="solver.ekfac.refine of the MLP's full ranking")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a shared box, 2 threads contend badly)")
    ap.add_argument("--ekfac-output", default="sample", choices=["auto", "sample"],
                    help="EK-FAC output factor: sample (1 draw per row) keeps the fit cheap; auto: exact, 10 backwards")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, folder: Path) -> None:
    make_data(folder, args.n, args.tests)
    print(f"{args} (threads={torch.get_num_threads()})")
    print(f"K={args.k}; grad and kfac take 2K candidates per test row (K most positive, K most negative)")
    hidden = [int(h) for h in args.hidden.split(",")]
    workloads = {
        "mlp": ({"arch": "mlp", "kwargs": {"in_features": 64, "hidden": hidden, "num_classes": 10}},
                {"name": "ekfac", "ekfac": {"refine": args.ekfac_refine, "output_factor": args.ekfac_output}}, args.epochs),
        "logreg": ({"arch": "logreg", "kwargs": {"in_features": 64, "num_classes": 10}}, {"name": "direct"}, 0),
    }
    for name, (spec, solver, epochs) in workloads.items():
        if args.only in (None, name):
            start = time.perf_counter()
            train_model(folder, spec, epochs)
            print(f"\n(trained {name} in {time.perf_counter() - start:.0f}s)")
            dampings = tuple(float(d) for d in args.kfac_damping.split(",")) if args.kfac_damping else (None,)
            bench(name, config(folder, spec, solver), args.k, tuple(args.metrics.split(",")), dampings)


if __name__ == "__main__":
    main()
