"""FastIF narrowing (`rank --knn 100`) vs the full ranking on 50k synthetic rows (logistic regression).

Prints total and scoring-phase speed-up and the mean top-10 overlap of helpful/harmful rows with the full run.
Run: .venv/bin/python benchmarks/knn_speed.py  (test rows are copies of 20 training rows)
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np, pandas as pd, torch
from selfcheck_scaling import make_workload
from influence_cli import ranking
from influence_cli.config import load_config
torch.set_num_threads(2)
folder = Path(tempfile.mkdtemp()) / "w"; shutil.rmtree(folder, ignore_errors=True); folder.mkdir()
make_workload(folder, 50000, "logreg")
train = pd.read_csv(folder / "train.csv")
train.iloc[:20].to_csv(folder / "test.csv", index=False)
cfg_d = json.loads((folder / "config.json").read_text())
cfg_d["data"]["test"] = {"format": "csv", "path": "test.csv"}
(folder / "config.yaml").write_text(json.dumps(cfg_d))
cfg = load_config(folder / "config.yaml")
ranking.rank(cfg, top=10)  # warm-up
t = time.perf_counter(); full = ranking.rank(cfg, top=10); t_full = time.perf_counter() - t
t = time.perf_counter(); knn = ranking.rank(cfg, top=10, knn=100); t_knn = time.perf_counter() - t
def tops(r, f): return {k: set(g.train_id) for k, g in r.tables[f].groupby("test_id")}
ov = {f: np.mean([len(tops(full, f)[k] & tops(knn, f)[k]) / 10 for k in tops(full, f)]) for f in ["helpful.csv", "harmful.csv"]}
print(f"n=50000, 20 test rows: full rank {t_full:.2f}s (score {full.summary['phases_seconds']['score']:.2f}s), knn=100 {t_knn:.2f}s (score {knn.summary['phases_seconds']['score']:.2f}s, knn {knn.summary['phases_seconds']['knn']:.2f}s); speed-up total {t_full/t_knn:.1f}x, scoring {full.summary['phases_seconds']['score']/knn.summary['phases_seconds']['score']:.1f}x; top-10 overlap {ov}; scored {knn.summary['knn']['scored_rows']}")
