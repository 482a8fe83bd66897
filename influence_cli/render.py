"""What the CLI shows: tables and summary lines on stdout (or one JSON document with --json),
progress bars, warnings and errors on stderr. Nothing here computes; cli.py calls it."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from .run import ProgressFn, Report


class Stdout:
    """sys.stdout that goes quiet when the reader closes the pipe (`infl selfcheck | head -1`): the
    rest of the output is dropped and the command keeps its own exit code (0, or 1 for a breached
    threshold), as Unix filters do, instead of a traceback or a misleading exit code."""

    closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                sys.stdout.write(text)
            except OSError as e:
                self._closed(e)
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                sys.stdout.flush()
            except OSError as e:
                self._closed(e)

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def _closed(self, e: OSError) -> None:
        if e.errno not in (errno.EPIPE, errno.EINVAL) and not isinstance(e, BrokenPipeError):
            raise e
        self.closed_by_reader = True
        try:  # what Python would flush at exit goes nowhere (else: "Exception ignored", exit 120)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


STDOUT = Stdout()
NUMERIC_COLUMNS = {"rank", "self_influence", "suspicion", "loss", "prob_label", "loss_change_if_removed", "rows", "size",
                   "flagged", "estimated_error_rate", "mean_suspicion"}


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


# What each phase's progress counts (a phase's callback may name its own with unit=...).
UNITS = {"fit": "steps", "score": "rows", "loo": "rows", "features": "rows", "train": "epochs",
         "polish": "evaluations", "retrain": "retrains", "groups": "passes", "knn": "rows", "exact_check": "rows"}


class UI:
    """Rendering for one command: a first status line and progress bars on stderr (TTY only, transient),
    tables or JSON on stdout, warnings on stderr after the command's own lines."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.out = Console(file=STDOUT, highlight=False, soft_wrap=True, markup=False, emoji=False)
        self.err = stderr_console()
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._warnings: list[str] = []
        self._status: Any = None  # rich Status: the spinner of the first status line

    def begin(self, text: str) -> None:
        """The first status line (what is loading), at once: a spinner on stderr until the first phase
        reports progress (a second call updates its text). Only on a terminal and without --quiet / --json (errors stay SPEC's one or two
        lines on stderr elsewhere)."""
        if not (self.show and self.err.is_terminal):
            return
        if self._status is None:
            self._status = self.err.status(text, spinner="dots")
            self._status.start()
        else:
            self._status.update(text)

    def update(self, phase: str, done: int, total: int | None, **info: Any) -> None:
        """progress(phase, done, total, unit=..., loss=..., detail=...): the bar of `phase` (rows,
        epochs, evaluations...), with its ETA and, for training, its loss."""
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._bar is None:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                       MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[detail]}"),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self._bar = Progress(*columns, console=self.err, transient=True)
            self._bar.start()
        unit = str(info.get("unit", UNITS.get(phase, "steps")))
        detail = info.get("detail") or (f"loss {info['loss']:.4g}" if "loss" in info else "")
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total, unit=unit, detail=detail)
        self._bar.update(self._tasks[phase], completed=done, total=total, unit=unit, detail=detail)

    @contextmanager
    def progress(self) -> Iterator[ProgressFn | None]:
        if self.quiet or not self.err.is_terminal:
            yield None
            return
        try:
            yield self.update
        finally:
            self.stop()

    def stop(self) -> None:
        """End the status line and bars (they vanish)."""
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._tasks = None, {}

    def close(self) -> None:
        """At the end of a command, however it ends: the bars go, then the warnings (after the tables)."""
        self.stop()
        if not self.quiet:
            for w in self._warnings:
                self.err.print(f"warning: {w}")
        self._warnings = []

    def finish(self, result: Report, files: list[Path], extra: dict[str, Any] | None = None) -> None:
        """The JSON document (--json); the warnings print at `close`, after the tables and summary lines."""
        self.stop()
        self._warnings = list(result.warnings)
        if self.as_json:
            doc = {**result.summary, **(extra or {}), "files": [str(f) for f in files], "warnings": result.warnings}
            from . import report

            STDOUT.write(json.dumps(report.jsonable(doc), indent=2, sort_keys=True) + "\n")
            STDOUT.flush()

    @property
    def show(self) -> bool:
        return not (self.quiet or self.as_json)

    def table(self, title: str, frame: Any, columns: list[str], rows: int) -> None:
        table = Table(title=title, title_justify="left")
        for c in columns:
            table.add_column(c, justify="right" if c in NUMERIC_COLUMNS else "left")
        for _, row in frame.head(rows).iterrows():
            table.add_row(*[fmt(row[c]) for c in columns])
        self.out.print(table)


def cache_line(ui: UI, summary: dict[str, Any]) -> None:
    c = summary.get("cache", {})
    if not c.get("enabled"):
        return
    fit = "reused the fitted curvature" if c.get("fit_reused") else "fitted the curvature"
    ui.out.print(f"cache: {fit}, reused {c.get('shards_reused', 0)} of {c.get('shards', 0)} shards ({c['dir']})")


TEXT_WIDTH = 60  # longer strings (text data) are cut in the terminal; the CSV has them whole


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = " ".join(str(value).split())  # one line per row
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + "…"


def fix_lines(ui: UI, s: dict[str, Any], files: list[Path]) -> None:
    ci = s["accuracy_gain_ci95"]
    interval = f"95% CI {ci[0]:+.4f}..{ci[1]:+.4f}" if ci else "no 95% CI: too few test rows"
    ui.out.print(f"{s['mode']} {s['fixes']} rows, retrained: test accuracy {s['accuracy_before']:.4f} ->"
                 f" {s['accuracy_after']:.4f} ({s['accuracy_gain']:+.4f}, {interval}); test loss"
                 f" {s['test_loss_before']:.4f} -> {s['test_loss_after']:.4f}")
    ui.out.print(f"wrote {', '.join(str(f) for f in files)}")


def health_tables(ui: UI, tables: dict[str, Any], rows: int = 12) -> None:
    """classes.csv and selfcheck_groups.csv as short tables, the worst first."""
    for name, title in (("classes.csv", "classes"), ("selfcheck_groups.csv", "groups")):
        frame = tables.get(name)
        if frame is None:
            continue
        worst = frame.sort_values("estimated_error_rate", ascending=False, kind="stable")
        more = f" (worst {rows} of {len(frame)})" if len(frame) > rows else ""
        ui.table(f"{title}: estimated error rate{more}", worst, list(frame.columns), rows)


def verify_lines(ui: UI, s: dict[str, Any], files: list[Path]) -> None:
    lo, hi = s.get("pearson_ci95", [float("nan")] * 2)
    interval = f"95% CI {lo:.3f}..{hi:.3f}" if all(map(finite, (lo, hi))) else "no 95% CI: too few rows"
    ui.out.print(f"retrained without {s['samples']} rows: Pearson {s['pearson']:.3f} ({interval}),"
                 f" Spearman {s['spearman']:.3f}, predicted/actual magnitude {s['magnitude_ratio']:.2f}")
    damp = ", ".join(f"{v['damping']:g}: {v['pearson']:.3f}" for v in s["pearson_by_damping"].values())
    ui.out.print(f"Pearson by damping: {damp}")
    for order, fit in s.get("groups", {}).items():
        ui.out.print(f"groups, {order}: Pearson {fit['pearson']:.3f}, mean abs error {fit['mean_abs_error']:.3g}")
    ui.out.print(f"wrote {', '.join(str(f) for f in files)}")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def cross_fit_line(ui: UI, s: dict[str, Any]) -> None:
    """Where selfcheck's suspicion and flags came from when they came from out-of-fold fits."""
    plan = s.get("cross_fit") or {}
    if not plan.get("folds"):
        return
    why = (" because the model memorized its labels (selfcheck.cross_fit: auto)" if plan.get("setting") == "auto"
           else "")
    temperature = f"; flags on temperature-scaled outputs (T = {s['oof_temperature']:.2f})" if "oof_temperature" in s \
        else ""
    ui.out.print(f"suspicion and flags from {plan['folds']} out-of-fold fits{why}{temperature}")


def sweep_lines(ui: UI, s: dict[str, Any]) -> None:
    sweep = s.get("damping_sweep")
    if not sweep:
        return
    parts = [f"{v['damping']:g}: Spearman {v['spearman']:.3f}, top-10% overlap {v['top10pct_overlap']:.2f}"
             for k, v in sweep.items() if k.startswith("x")]
    ui.out.print(f"damping sweep of {sweep['column']} (at {sweep['damping']:g}) vs " + "; ".join(parts))


def check_lines(ui: UI, s: dict[str, Any], show_config: bool) -> None:
    """The answer first (sizes, solver, estimates); the resolved config only when asked."""
    ui.out.print(f"train rows: {s['n']}   test rows: {s['n_test']}   device: {s['device']}")
    ui.out.print(f"parameters: {s['parameters']} selected of {s['parameters_total']}")
    modules = s.get("selected_by_module") or {}
    if len(modules) > 1:  # which modules the selection covers (last_blocks, prefixes), largest first
        shown = sorted(modules.items(), key=lambda kv: -kv[1])
        more = f", and {len(shown) - 12} more modules" if len(shown) > 12 else ""
        ui.out.print("selected by module: " + ", ".join(f"{m} {c:,}" for m, c in shown[:12]) + more)
    ui.out.print(f"solver: {s['solver']} ({s['solver_reason']})   per-example gradients of all rows:"
                 f" ~{s['gradient_seconds']} s")
    plan = s.get("cross_fit")
    if plan:
        when = ("if the model memorized its labels (selfcheck.cross_fit: auto; over"
                f" selfcheck.cross_fit_budget, {plan['budget_s']:g} s, they do not run)" if plan["setting"] == "auto"
                else "(selfcheck.cross_fit)")
        ui.out.print(f"selfcheck: {plan['folds']} out-of-fold trainings, ~{plan['estimated_s']} s at most, {when}")
    if retrain := s.get("group_retrain"):
        which = ("the groups whose estimate is untrusted, within rank.group_retrain_budget"
                 f" ({retrain['budget_s']:g} s)" if retrain["setting"] == "auto" else "every group")
        ui.out.print(f"rank --group-by: retrains {which}: ~{retrain['each_s']} s each,"
                     f" {retrain['groups']} groups in data.train.group")
    if s["cache"]["dir"]:
        state = "cached: a rerun skips the fit" if s["cache"]["fit_cached"] else "not cached yet"
        ui.out.print(f"fitted curvature for these inputs: {state} ({s['cache']['dir']})")
    table = Table(title="solver estimates", title_justify="left")
    for c in ("solver", "memory", "fit time", "note"):
        table.add_column(c)
    for name, e in s["solver_estimates"].items():
        table.add_row(name, report_gib(e["memory_bytes"]), f"~{e['fit_seconds']} s", e["note"])
    ui.out.print(table)
    if show_config:
        ui.out.print(yaml.safe_dump({"config": s["config"]}, sort_keys=False).rstrip())


def report_gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"




def explain_panel(ui: UI, s: dict[str, Any], table: Any, files: list[Path]) -> None:
    """The test row in a panel, then its helpful and harmful training rows."""
    from rich.panel import Panel

    prob = f", p(label) {s['prob_label']:.3g}" if s.get("prob_label") is not None else ""
    ui.out.print(Panel(f"label {s['test_label']}   predicted {s['predicted']}{prob}   loss {s['loss']:.4g}",
                       title=f"test example {s['test_id']}", expand=False))
    cols = ["rank", "train_id", "train_label", "loss_change_if_removed"]
    for direction, title in (("helpful", "most helpful (removing it would raise the loss)"),
                             ("harmful", "most harmful (removing it would lower the loss)")):
        ui.table(title, table[table.direction == direction], cols, s["top"])
    ui.out.print(f"wrote {', '.join(str(f) for f in files)}")


def plain_report(summary: dict[str, Any]) -> Any:
    """A Report with only a summary (commands that compute nothing: report, init)."""
    from .run import Report

    return Report({}, summary, {})


def loading_line(cfg: Any, command: str) -> str:
    """The status line of a command that has read its config: what it loads now."""
    train = cfg.data.train
    source = getattr(train, "path", None) or getattr(train, "function", None) or train.format
    data = f"{train.format} {_short(source)}"
    if command in ("fix", "report"):
        return f"infl {command}: loading {data}"
    model = cfg.model
    weights = "a fresh seeded model" if command == "train" else _short(model.checkpoint or model.path)
    return f"infl {command}: loading {data}, model {model.arch} ({weights})"


def _short(path: Any) -> str:
    """A path relative to the current folder when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except (ValueError, TypeError, OSError):
        return str(path)


def train_lines(ui: UI, s: dict[str, Any]) -> None:
    """`infl train`'s summary: what was trained, how far, and how well it fits its training labels."""
    accuracy = s.get("train_accuracy")
    fit = f", training accuracy {accuracy:.1%}" if isinstance(accuracy, float) else ""
    polish = " (head polished on its frozen features)" if s.get("head_only") else ""
    ui.out.print(f"trained {s['parameters']} parameters on {s['n']} rows with {s['optimizer']}{polish}: "
                 f"objective {s['objective']:.6g}, gradient norm {s['grad_norm']:.3g} "
                 f"({'converged' if s['converged'] else 'NOT converged'}){fit} -> {s['checkpoint']}")
