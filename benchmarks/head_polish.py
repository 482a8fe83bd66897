"""`infl train`'s L-BFGS polish of a ResNet-18 head (`params: last_layer`) on 60,000 28x28 images: before
(every evaluation a float64 forward and backward pass of the whole network, as `infl train` did until head.py)
and after (one float32 pass of the frozen body for its 512 features, then L-BFGS in float64 on them).

The images and labels are random (nothing is downloaded); the network is torchvision's ResNet-18 with
in_channels 1 and 10 classes at its seeded initialization (the polish's cost does not depend on the
weights). Two label sets, the head from its initialization both times: random labels (the hardest case: L-BFGS
may use all 200 iterations) and labels that a random linear function of the body's features predicts, 10%
flipped (closer to real data). "Before" is extrapolated: one full-network evaluation timed on --sample rows, times
n / sample, times the number of evaluations the polish took. Run:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/head_polish.py [--n 60000] [--sample 512]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from influence_cli.config import TrainConfig  # noqa: E402
from influence_cli.head import head_features  # noqa: E402
from influence_cli.models import resnet18  # noqa: E402
from influence_cli.objective import Objective, ParamSpace  # noqa: E402
from influence_cli.train import POLISH_ITERATIONS, polish  # noqa: E402


class Rows:
    """(row_idx, x, y) batches in row order, like `make_loader` on in-memory tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        for s in range(0, len(self.x), self.batch_size):
            idx = torch.arange(s, min(s + self.batch_size, len(self.x)))
            yield idx, self.x[s : s + len(idx)], self.y[s : s + len(idx)]


def full_network_evaluation(model: torch.nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one evaluation of the old polish on these rows: float64, all parameters requiring grad."""
    model = copy.deepcopy(model).double().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    for s in range(0, len(x), 256):
        loss = objective.per_example_loss(model(x[s : s + 256].double()), y[s : s + 256]).sum() / len(x)
        loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--sample", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1).eval()
    x = torch.randn(args.n, 1, 28, 28)
    y = torch.randint(0, 10, (args.n,))
    objective = Objective("classification", 1e-3)
    names = ParamSpace.select(model, "last_layer").names
    print(f"ResNet-18 (in_channels 1, 10 classes), {sum(p.numel() for p in model.parameters()):,} parameters;"
          f" head {names}; n = {args.n:,} images 28x28; torch threads {torch.get_num_threads()}")

    one = full_network_evaluation(model, objective, x[: args.sample], y[: args.sample])
    per_eval = one * args.n / args.sample
    print(f"before: one full-network float64 evaluation on {args.sample} rows {one:.2f} s -> {per_eval:.0f} s"
          f" per evaluation of {args.n:,} rows")

    config = TrainConfig(optimizer="lbfgs", lr=1.0, epochs=POLISH_ITERATIONS)
    cold = copy.deepcopy(model.fc.state_dict())
    feats = head_features(model, "fc", Rows(x, y, args.batch_size), args.n, args.batch_size)  # not timed
    teacher = torch.randn(feats.inputs.shape[1], 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = (feats.inputs - feats.inputs.mean(0)) @ teacher
    learnable = scores.argmax(1)
    flip = torch.rand(args.n, generator=torch.Generator().manual_seed(2)) < 0.1
    learnable[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=torch.Generator().manual_seed(3))
    del feats, scores
    evals = {}
    for start, labels in (("random labels (the hardest case)", y),
                          ("labels a linear function of the features predicts, 10% flipped", learnable)):
        model.fc.load_state_dict(cold)
        model.float()
        phases: dict[str, list[float]] = {}

        def progress(phase: str, done: int, total: int, **info: object) -> None:
            phases.setdefault(phase, [time.perf_counter(), 0])[1] = done

        wall, cpu = time.perf_counter(), time.process_time()
        result = polish(model, names, objective, Rows(x, labels, args.batch_size), args.n, config,
                        args.batch_size, progress)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        evals[start] = int(phases["polish"][1])
        features = phases["polish"][0] - (phases["features"][0] if "features" in phases else 0)
        print(f"after, {start}: {wall:.1f} s wall, {cpu:.1f} s CPU (features {features:.1f} s, then"
              f" {evals[start]} L-BFGS evaluations on them); head only: {result.head_only}; gradient norm"
              f" {result.grad_norm:.2g} after {result.iterations} iterations (converged: {result.converged});"
              f" training accuracy {result.accuracy:.3f}")
        before = per_eval * evals[start]
        print(f"  before, extrapolated to the same {evals[start]} evaluations: {before:.0f} s = {before / 3600:.1f} h;"
              f" speed-up {before / wall:.0f}x")
    print(f"load average while it ran: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

if __name__ == "__main__":
    main()
