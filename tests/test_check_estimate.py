"""`infl check`'s gradient-pass estimate against the pass itself, measured in the same process (a ratio,
not a wall-clock limit): within 3x on the sample configs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from influence_cli.commands.check import gradient_seconds
from influence_cli.config import load_config
from influence_cli.gradients import GradientSource
from influence_cli.run import Run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits", "digits_mlp", "digits_images"])
def test_gradient_estimate_is_within_3x_of_the_measured_pass(name):
    run = Run.open(load_config(ROOT / "configs" / f"{name}.yaml"), "check")
    estimate = gradient_seconds(run)
    source = GradientSource(run.problem)
    measured = []
    for _ in range(3):  # the median of three passes: the machine is shared
        start = time.perf_counter()
        for _block in source.per_example(run.problem.train_loader, run.train.ids):
            pass
        measured.append(time.perf_counter() - start)
    actual = sorted(measured)[1]
    assert actual / 3 <= estimate <= actual * 3, (estimate, measured)
