"""1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo) on a 50k-row MLP: wall time and peak RSS per rank.

    .venv/bin/python benchmarks/scaling.py [--n 50000] [--out /tmp/infl-scaling]

For selfcheck (ekfac) and rank (ekfac, 20 test rows): the whole command's wall time, rank 0's phases from
its manifest (fit and score are split over the ranks; the Newton leave-one-out audit, the merge and the
reports run on rank 0 alone), and each process's peak RSS (getrusage of a wrapper around each rank).
Synthetic data: x ~ N(0, I) in 32 dimensions, 10 classes from a random linear teacher, 10% labels flipped;
an MLP [1536] (p = 66,058: above the exact check's 5,000, so no direct fit, and above selfcheck's
NEWTON_LOO_MAX_P = 50,000, so the leave-one-out audit is the first-order one: a single-rank Newton pass would
otherwise dominate, see the README) at a seeded random initialization (timings do not depend on training).
`--hidden 128` gives p = 5,514 and the Newton audit, which runs on rank 0 alone after the merge.
Every run starts with an empty cache folder. On a shared machine the
figures move with the other load: compare the ratio within one invocation.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
INFL = str(Path(sys.executable).parent / "infl")
WRAP = ("import os, resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]);"
        " open(sys.argv[1] + '.' + os.environ.get('RANK', '0'), 'w').write(str("
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)); sys.exit(rc)")


def make_data(folder: Path, n: int, hidden: int) -> Path:
    from influence_cli.models import ARCHS

    rng = np.random.default_rng(0)
    d, c = 32, 10
    w = rng.normal(size=(d, c))
    for split, rows in (("train", n), ("test", 200)):
        x = rng.normal(size=(rows, d)).astype(np.float32)
        y = (x @ w + 0.5 * rng.normal(size=(rows, c))).argmax(1)
        if split == "train":
            flip = rng.random(rows) < 0.1
            y[flip] = rng.integers(0, c, flip.sum())
        np.savez(folder / f"{split}.npz", x=x, y=y.astype(np.int64),
                 ids=np.array([f"{split[0]}{i:06d}" for i in range(rows)]))
    torch.manual_seed(0)
    torch.save(ARCHS["mlp"](in_features=d, hidden=[hidden], num_classes=c).state_dict(), folder / "mlp.pt")
    cfg = folder / "scaling.yaml"
    cfg.write_text(
        f"seed: 0\nbatch_size: 512\nweight_decay: 0.001\n"
        f"model: {{arch: mlp, kwargs: {{in_features: {d}, hidden: [{hidden}], num_classes: {c}}},"
        f" checkpoint: {folder}/mlp.pt}}\n"
        f"data:\n  train: {{format: tensors, path: {folder}/train.npz, x_key: x, label: y, id: ids}}\n"
        f"  test: {{format: tensors, path: {folder}/test.npz, x_key: x, label: y, id: ids}}\n"
        f"solver: {{name: ekfac}}\ncache: {{shard_rows: 4096}}\n")
    return cfg


def launch(argv: list[str], ranks: int, threads: int, tag: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    wrapped = [sys.executable, "-c", WRAP, str(tag), INFL, *argv]
    cmd = wrapped if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc-per-node", str(ranks), "--no-python", *wrapped]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = [int(Path(f"{tag}.{r}").read_text()) for r in range(ranks)]
    return {"wall_s": round(wall, 2), "peak_rss_mib_per_rank": [round(b / 2**20, 1) for b in rss]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--out", type=Path, default=Path("/tmp/infl-scaling"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = make_data(args.out, args.n, args.hidden)
    results = {"n": args.n, "hidden": args.hidden, "parameters": 32 * args.hidden + args.hidden + 10 * args.hidden + 10,
               "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "runs": {}}
    commands = {"selfcheck": ["selfcheck", "--gallery", "none"],
                "rank": ["rank", "--test-ids", ",".join(f"t{i:06d}" for i in range(20))]}
    for name, argv in commands.items():
        for ranks, threads in ((1, 2), (2, 1)):
            key = f"{name}_{ranks}x{threads}"
            folder = args.out / key
            run = launch([*argv, "-c", str(cfg), "-o", str(folder), "--quiet",
                          "--set", f"cache.dir={folder}/cache"], ranks, threads, args.out / f"rss-{key}")
            manifest = json.loads((folder / "manifest.json").read_text())
            run["phases_rank0_s"] = manifest["phases_seconds"]
            run["distributed"] = manifest.get("distributed")
            results["runs"][key] = run
            print(key, json.dumps(run), flush=True)
        one, two = results["runs"][f"{name}_1x2"], results["runs"][f"{name}_2x1"]
        results[f"{name}_speedup_2x1_over_1x2"] = round(one["wall_s"] / two["wall_s"], 3)
    results["load_average_at_end"] = os.getloadavg()
    (args.out / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
