"""The commands as library calls, for scripts, notebooks and benchmarks: `api.selfcheck(cfg)` opens
the run and returns the Report the CLI would write (tables, summary, manifest, warnings).

Options are the command's options dataclass fields (commands/*.py), passed as keywords.
"""

from __future__ import annotations

from typing import Any

from .commands import check as check_cmd
from .commands import rank as rank_cmd
from .commands import selfcheck as selfcheck_cmd
from .commands import train as train_cmd
from .commands import verify as verify_cmd
from .config import Config
from .run import ProgressFn, Report, Run


def open_run(cfg: Config, command: str = "selfcheck", *, need_test: bool = False) -> Run:
    """Load the inputs of `cfg` (data, checkpoint, Problem) without computing anything."""
    return Run.open(cfg, command, need_test=need_test)


def selfcheck(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return selfcheck_cmd.selfcheck(Run.open(cfg, "selfcheck", progress), selfcheck_cmd.SelfcheckOptions(**options))


def rank(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return rank_cmd.rank(Run.open(cfg, "rank", progress, need_test=True), rank_cmd.RankOptions(**options))


def verify(cfg: Config, progress: ProgressFn | None = None, **options: Any) -> Report:
    return verify_cmd.verify(Run.open(cfg, "verify", progress, need_test=True), verify_cmd.VerifyOptions(**options))


def train(cfg: Config, progress: ProgressFn | None = None) -> Report:
    return train_cmd.train(Run.open(cfg, "train", progress, fresh_model=True))


def check(cfg: Config) -> Report:
    return check_cmd.check(Run.open(cfg, "check", need_test=cfg.data.test is not None))
