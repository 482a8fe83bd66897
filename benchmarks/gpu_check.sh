#!/usr/bin/env bash
# The GPU path, proven on a machine with CUDA (run from the repository root, in the project's venv):
#   1. the `gpu`-marked tests (tests/test_distributed_gpu.py: CUDA == CPU in float32; NCCL torchrun when 2+ GPUs);
#   2. selfcheck and rank on CUDA vs CPU on the sample configs and on a larger synthetic set: the same ranking
#      (identical top 5% and Spearman >= 0.9999) and values within 1e-4 relative, float32;
#   3. wall times on the GPU at n = 50,000 (a 2-layer MLP): selfcheck and rank for ekfac and direct
#      (direct on params: last_layer), and the per-example-gradient floor (one streamed pass of vmapped
#      per-example gradients, nothing else), each after a warm-up, timed with torch.cuda.synchronize.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]      (default /tmp/infl-gpu-check; writes OUT_DIR/results.json)
# A dry run of the script itself on a CPU-only machine: DEVICE=cpu N=2000 bash benchmarks/gpu_check.sh
# (compares CPU with CPU and times on the CPU; the gpu tests skip).
# Exit status: 0 when every check passed, 1 otherwise. Takes a few minutes on one H100-class GPU.
set -euo pipefail
OUT=${1:-/tmp/infl-gpu-check}
PY=${PYTHON:-python}
INFL=${INFL:-infl}
DEVICE=${DEVICE:-cuda}
N=${N:-50000}
export DEVICE N
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
failed=0

echo "== 1. gpu-marked tests"
"$PY" -m pytest -q -m gpu tests/ || failed=1

echo "== 2. CUDA vs CPU (float32)"
compare() {  # compare NAME CONFIG COMMAND FILE COLUMN [extra args...]
  local name=$1 cfg=$2 cmd=$3 file=$4 column=$5; shift 5
  for dev in cpu cuda; do
    "$INFL" "$cmd" -c "$cfg" -o "$OUT/$name/$dev" --no-cache --quiet --set device=$([ $dev = cuda ] && echo "$DEVICE" || echo cpu) \
      --set dtype=float32 "$@"
  done
  "$PY" - "$OUT/$name/cpu/$file" "$OUT/$name/cuda/$file" "$column" "$name" <<'EOF' || failed=1
import sys
import numpy as np, pandas as pd
cpu, cuda, column, name = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2]), sys.argv[3], sys.argv[4]
a = cpu[column].to_numpy(float)
b = cuda.set_index("id").loc[cpu["id"], column].to_numpy(float)
scale = max(np.abs(a).max(), 1e-300)
rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-6 * scale)
top = max(1, len(cpu) // 20)
same_top = set(cpu["id"][:top]) == set(cuda["id"][:top])
ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
spearman = float(np.corrcoef(ra, rb)[0, 1])
ok = rel.max() <= 1e-4 and same_top and spearman >= 0.9999
print(f"{name}: max relative difference {rel.max():.2e}, same top {top}: {same_top}, spearman {spearman:.6f}"
      f" -> {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
EOF
}
compare digits_direct configs/digits.yaml selfcheck selfcheck.csv self_influence
compare digits_ekfac configs/digits.yaml selfcheck selfcheck.csv self_influence --set solver.name=ekfac
compare digits_mlp_ekfac configs/digits_mlp.yaml selfcheck selfcheck.csv self_influence --set solver.name=ekfac
compare digits_rank_direct configs/digits.yaml rank overall.csv loss_change_if_removed
compare digits_mlp_rank_ekfac configs/digits_mlp.yaml rank overall.csv loss_change_if_removed --set solver.name=ekfac

echo "== synthetic set: n = $N, 32 features, 10 classes, 10% labels flipped; MLP [64] trained on the GPU"
SYN="$OUT/synthetic"
mkdir -p "$SYN"
"$PY" - "$SYN" <<'EOF'
import os, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1])
rng = np.random.default_rng(0)
n, d, c = int(os.environ["N"]), 32, 10
w = rng.normal(size=(d, c))
for split, rows in (("train", n), ("test", 500)):
    x = rng.normal(size=(rows, d)).astype(np.float32)
    y = (x @ w + 0.5 * rng.normal(size=(rows, c))).argmax(1)
    if split == "train":
        flip = rng.random(rows) < 0.1
        y[flip] = rng.integers(0, c, flip.sum())
    np.savez(folder / f"{split}.npz", x=x, y=y.astype(np.int64), ids=np.array([f"{split[0]}{i:06d}" for i in range(rows)]))
(folder / "synthetic.yaml").write_text(f"""seed: 0
batch_size: 1024
model: {{arch: mlp, kwargs: {{in_features: {d}, hidden: [64], num_classes: {c}}}, checkpoint: {folder}/mlp.pt}}
weight_decay: 0.001
data:
  train: {{format: tensors, path: {folder}/train.npz, x_key: x, label: y, id: ids}}
  test: {{format: tensors, path: {folder}/test.npz, x_key: x, label: y, id: ids}}
solver: {{name: ekfac}}
train: {{optimizer: adam, epochs: 30, lr: 0.003}}
""")
EOF
"$INFL" train -c "$SYN/synthetic.yaml" --quiet --set device="$DEVICE"
compare synthetic_ekfac "$SYN/synthetic.yaml" selfcheck selfcheck.csv self_influence
compare synthetic_rank_ekfac "$SYN/synthetic.yaml" rank overall.csv loss_change_if_removed --test-ids t000000,t000001,t000002,t000003
compare synthetic_direct_last "$SYN/synthetic.yaml" selfcheck selfcheck.csv self_influence --set solver.name=direct --set params=last_layer

echo "== 3. timings on $DEVICE (n = $N)"
"$PY" - "$SYN/synthetic.yaml" "$OUT/results.json" <<'EOF' || failed=1
import json, os, sys, time
import torch
from dataclasses import replace
from influence_cli import api
from influence_cli.config import load_config
from influence_cli.gradients import GradientSource

path, out, device = sys.argv[1], sys.argv[2], os.environ["DEVICE"]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

def timed(fn):
    fn()  # warm-up: CUDA context, kernels, allocator
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return round(time.perf_counter() - start, 3)

results = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "n": int(os.environ["N"]), "seconds": {}}
for solver, params in (("ekfac", "all"), ("direct", "last_layer")):
    cfg = load_config(path, [f"solver.name={solver}", f"params={params}", f"device={device}", "cache.enabled=false"])
    results["seconds"][f"selfcheck_{solver}"] = timed(lambda: api.selfcheck(cfg, gallery="none"))
    results["seconds"][f"rank_{solver}_100_test"] = timed(
        lambda: api.rank(cfg, test_ids=[f"t{i:06d}" for i in range(100)]))
    run = api.open_run(cfg)
    def floor():
        for _block in GradientSource(run.problem).per_example(run.problem.train_loader):
            pass
    results["seconds"][f"per_example_gradients_{params}"] = timed(floor)
    results["parameters_" + params] = run.problem.params.size
if device.startswith("cuda"):
    results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
print(json.dumps(results, indent=2))
open(out, "w").write(json.dumps(results, indent=2) + "\n")
EOF
echo "results: $OUT/results.json"
exit $failed
