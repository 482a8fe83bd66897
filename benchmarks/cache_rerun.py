"""A cached rerun of `infl selfcheck` against a cold run, and a rerun after a kill (issue 5).

For each workload (benchmarks/selfcheck_scaling.py's synthetic 64-feature data; default: the MLP
64-40-10 with its exact Hessian at n=5k, and the logistic regression at n=50k) it runs the real CLI
in fresh processes:
  cold     a fresh cache folder (fit + every shard computed and stored)
  cached   the same command again (everything read back from the cache)
  nocache  --no-cache (what the run costs without the cache: the write overhead is cold - nocache)
  resumed  a run SIGKILLed once half of its shards were committed, then rerun: the rerun's time
and prints wall times (medians over --repeats), cached/cold, resumed/cold, and whether every CSV is
byte-identical to the cold run's.
Process start (python + torch import, ~1-3 s here) is inside every figure: the cached run cannot go
below it, so the ratio only means something on workloads that take longer than that.

Run:  .venv/bin/python benchmarks/cache_rerun.py [--workloads mlp:5000,logreg:50000] [--repeats 3]
      [--shard-rows 1024]  (small shards, so a kill at half the shards lands mid-run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selfcheck_scaling import make_workload  # noqa: E402

INFL = [sys.executable, "-c", "from influence_cli.cli import main; main()"]


def timed(args: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([*INFL, *args, "--json"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"infl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return elapsed, json.loads(done.stdout)


def killed_then_resumed(config: str, out: Path, shards: int) -> tuple[float, dict]:
    """SIGKILL a run once half of its `shards` are committed; return the rerun's time and summary."""
    proc = subprocess.Popen([*INFL, "selfcheck", "-c", config, "-o", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list((out / ".infl-cache").glob("selfcheck-*/shard-*.pt"))) < max(1, shards // 2):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    return timed(["selfcheck", "-c", config, "-o", str(out)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp:5000,logreg:50000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=1024, help="cache.shard_rows for every run")
    args = parser.parse_args()
    print(f"{'workload':<14}{'cold s':>9}{'cached s':>10}{'nocache s':>11}{'resumed s':>11}{'cached/cold':>13}"
          f"{'resumed/cold':>14}  identical  phases (cached)")
    for item in args.workloads.split(","):
        model, n = item.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            config = str(make_workload(folder, int(n), model))
            text = Path(config).read_text()  # JSON is YAML: add the shard size
            Path(config).write_text(text.rstrip()[:-1] + f', "cache": {{"shard_rows": {args.shard_rows}}}}}')
            cold, cached, nocache, resumed, same = [], [], [], [], True
            for r in range(args.repeats):
                out = folder / f"out{r}"
                t_cold, _ = timed(["selfcheck", "-c", config, "-o", str(out)])
                first = (out / "selfcheck.csv").read_bytes()
                t_cached, summary = timed(["selfcheck", "-c", config, "-o", str(out)])
                same &= (out / "selfcheck.csv").read_bytes() == first
                same &= summary["cache"]["fit_reused"] and summary["cache"]["shards_reused"] == summary["cache"]["shards"]
                t_none, _ = timed(["selfcheck", "-c", config, "-o", str(folder / "plain"), "--no-cache"])
                same &= (folder / "plain" / "selfcheck.csv").read_bytes() == first
                t_resumed, after = killed_then_resumed(config, folder / f"killed{r}", summary["cache"]["shards"])
                same &= (folder / f"killed{r}" / "selfcheck.csv").read_bytes() == first
                resumed.append(t_resumed)
                cold.append(t_cold)
                cached.append(t_cached)
                nocache.append(t_none)
                shutil.rmtree(out)
            c, w, p = statistics.median(cold), statistics.median(cached), statistics.median(nocache)
            k = statistics.median(resumed)
            phases = {k: round(v, 2) for k, v in summary["phases_seconds"].items() if v >= 0.01}
            print(f"{item:<14}{c:>9.2f}{w:>10.2f}{p:>11.2f}{k:>11.2f}{w / c:>13.3f}{k / c:>14.3f}  {str(same):<9}  "
                  f"{phases}  (resumed run reused {after['cache']['shards_reused']}/{after['cache']['shards']} shards)",
                  flush=True)


if __name__ == "__main__":
    main()
