"""The commands as library calls, for scripts, notebooks and benchmarks: `api.selfcheck(cfg)` opens
the run and returns the Report the CLI would write (tables, summary, manifest, warnings).

Options are the command's options dataclass fields (commands/*.py), passed as keywords.
"""

from __future__ import annotations

from typing import Any

from .commands.check import check as _check
from .commands.rank import RankOptions
from .commands.rank import rank as _rank
from .commands.selfcheck import SelfcheckOptions
from .commands.selfcheck import selfcheck as _selfcheck
from .commands.train import train as _train
from .commands.verify import VerifyOptions
from .commands.verify import verify as _verify
from .config import Config
from .run import ProgressFn, Report, Run


def open_run(cfg: Config, command: str = "selfcheck", *, need_test: bool = False) -> Run:
    """Load the inputs of `cfg` (data, checkpoint, Problem) without computing anything."""
    return Run.open(cfg, command, need_test=need_test)


def selfcheck(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return _selfcheck(Run.open(cfg, "selfcheck", progress), SelfcheckOptions(**options))


def rank(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return _rank(Run.open(cfg, "rank", progress, need_test=True), RankOptions(**options))


def verify(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return _verify(Run.open(cfg, "verify", progress, need_test=True), VerifyOptions(**options))


def train(cfg: Config, progress: ProgressFn | None = None) -> Report:
    return _train(Run.open(cfg, "train", progress, fresh_model=True))


def check(cfg: Config) -> Report:
    return _check(Run.open(cfg, "check", need_test=cfg.data.test is not None))
