"""`infl`: thin Typer commands over `commands/`. Errors map to exit codes in `_run_command` only.

stdout carries tables (or, with --json, one JSON document and nothing else); progress bars,
warnings and errors go to stderr. Exit codes (SPEC): 0 done, 1 threshold breached, 2 bad usage or
config, 3 unusable data or model, 4 internal error, 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import Config, load_config
from .errors import ConfigError, InflError

if TYPE_CHECKING:  # the library imports torch (seconds): commands import it when they run, so --help is instant
    from .run import ProgressFn, Report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Influence functions for dataset debugging: find mislabeled "
                  "training rows and the rows that help or hurt test predictions.")

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"infl {version('influence-cli')}")
        except PackageNotFoundError:
            print("infl (not installed)")
        raise typer.Exit(0)


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Influence functions for dataset debugging: find mislabeled training rows and the rows that help or hurt
    test predictions. Run a command with --help for its options and an example."""


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default: output.dir).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                help="Override a config key: dotted.key=value (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress, no tables: only errors on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout and nothing else.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache (cache.dir) this run.")]


class _Stdout:
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


_STDOUT = _Stdout()
NUMERIC_COLUMNS = {"rank", "self_influence", "suspicion", "loss", "prob_label", "loss_change_if_removed", "rows",
                   "flagged", "estimated_error_rate", "mean_suspicion"}


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


_interrupted = threading.Event()


def _terminate(_signum: int, _frame: Any) -> None:
    _interrupted.set()  # an error raised while unwinding from here is still an interruption
    raise KeyboardInterrupt  # SIGTERM (cron timeouts, kill) stops like Ctrl-C: exit 130, finished shards kept


def _interrupted_message() -> str:
    return ("error: interrupted; reports from earlier runs are untouched, finished shards are kept in"
            " the cache: rerun the same command to resume")


@contextmanager
def _run_command(debug: bool) -> Iterator[None]:
    """The one place errors become exit codes."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        _interrupted.clear()
        previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except InflError as e:
        if debug:
            raise
        _stderr().print(f"error: {e.message}")
        if e.hint:
            _stderr().print(f"  hint: {e.hint}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _stderr().print(_interrupted_message())
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is a bug
        if debug:
            raise
        if _interrupted.is_set():  # e.g. a KeyboardInterrupt that C++ code turned into a RuntimeError
            _stderr().print(_interrupted_message())
            raise typer.Exit(130) from None
        _stderr().print(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug and report it")
        raise typer.Exit(4) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _UI:
    """Rendering for one command: progress on stderr (TTY only), tables or JSON on stdout."""

    def __init__(self, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.out = Console(file=_STDOUT, highlight=False, soft_wrap=True, markup=False, emoji=False)
        self.err = _stderr()
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    @contextmanager
    def progress(self) -> Iterator[ProgressFn | None]:
        if self.quiet or not self.err.is_terminal:
            yield None
            return
        columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            def update(phase: str, done: int, total: int) -> None:
                if phase not in self._tasks:
                    self._tasks[phase] = bar.add_task(phase, total=total)
                bar.update(self._tasks[phase], completed=done, total=total)

            yield update

    def finish(self, result: Report, files: list[Path], extra: dict[str, Any] | None = None) -> None:
        if not self.quiet:
            for w in result.warnings:
                self.err.print(f"warning: {w}")
        if self.as_json:
            doc = {**result.summary, **(extra or {}), "files": [str(f) for f in files], "warnings": result.warnings}
            from . import report

            _STDOUT.write(json.dumps(report.jsonable(doc), indent=2, sort_keys=True) + "\n")
            _STDOUT.flush()

    @property
    def show(self) -> bool:
        return not (self.quiet or self.as_json)

    def table(self, title: str, frame: Any, columns: list[str], rows: int) -> None:
        table = Table(title=title, title_justify="left")
        for c in columns:
            table.add_column(c, justify="right" if c in NUMERIC_COLUMNS else "left")
        for _, row in frame.head(rows).iterrows():
            table.add_row(*[_fmt(row[c]) for c in columns])
        self.out.print(table)


def _cache_line(ui: _UI, summary: dict[str, Any]) -> None:
    c = summary.get("cache", {})
    if not c.get("enabled"):
        return
    fit = "reused the fitted curvature" if c.get("fit_reused") else "fitted the curvature"
    ui.out.print(f"cache: {fit}, reused {c.get('shards_reused', 0)} of {c.get('shards', 0)} shards ({c['dir']})")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _split_ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _out_dir(cfg: Config, out: Path | None) -> Path:
    return out.resolve() if out is not None else cfg.output.dir


def _load(config: Path, overrides: list[str] | None, out: Path | None = None, *, no_cache: bool = False,
          cache: bool = True) -> Config:
    """The validated config; cache.dir defaults to <report folder>/.infl-cache (off with --no-cache);
    the config's folder and the current directory go on sys.path, where `module:function` hooks live."""
    cfg = load_config(config, overrides or [])
    for folder in (str(Path.cwd()), str(cfg.source.parent) if cfg.source else None):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    if not cache:
        return cfg
    folder = cfg.cache.dir if cfg.cache.dir is not None else _out_dir(cfg, out) / ".infl-cache"
    return replace(cfg, cache=replace(cfg.cache, dir=folder, enabled=cfg.cache.enabled and not no_cache))


def _threshold(ui: _UI, breached: bool, message: str) -> None:
    if breached:
        ui.err.print(f"threshold: {message}")


TopOpt = Annotated[int, typer.Option(min=1, help="Rows shown in the terminal table (the CSV has all).")]
TestIdsOpt = Annotated[str | None, typer.Option(help="Only these test ids, comma separated (default: all).")]
SweepOpt = Annotated[bool, typer.Option(help="Also rank at 0.1x and 10x solver.damping (curvature refitted only)"
                                             " and report how much the ranking moves.")]


@app.command()
def selfcheck(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
              as_json: JsonOpt = False, debug: DebugOpt = False, top: TopOpt = 10,
              fail_above: Annotated[float | None, typer.Option(
                  min=0.0, max=1.0, help="Exit 1 when the flagged fraction of the training set exceeds this.")] = None,
              rank_by: Annotated[str, typer.Option(help="Sort order: self_influence | loo_loss | loss.")]
              = "self_influence",
              damping_sweep: SweepOpt = False, no_cache: NoCacheOpt = False,
              group_by: Annotated[str | None, typer.Option(
                  help="Training column naming each row's group (default data.train.group);"
                       " writes selfcheck_groups.csv.")] = None) -> None:
    """Self-influence of every training example; flags likely label errors (selfcheck.csv, classes.csv).

    Example: infl selfcheck -c configs/digits.yaml --top 20 --fail-above 0.15
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from . import report
        from .commands.selfcheck import SelfcheckOptions
        from .commands.selfcheck import selfcheck as selfcheck_command
        from .run import Run

        options = SelfcheckOptions(rank_by=rank_by, damping_sweep=damping_sweep, group_by=group_by)
        cfg = _load(config, set_, out, no_cache=no_cache)
        with ui.progress() as progress:
            result = selfcheck_command(Run.open(cfg, "selfcheck", progress), options)
        files = report.write_atomic(_out_dir(cfg, out), result.tables, result.manifest)
        s = result.summary
        breached = fail_above is not None and s["flagged_fraction"] > fail_above
        ui.finish(result, files, {"threshold_breached": breached})
        if ui.show:
            ui.table("most self-influential training examples", result.tables["selfcheck.csv"],
                     ["rank", "id", "label", "predicted", "prob_label", "self_influence", "flagged"], top)
            _health_tables(ui, result.tables)
            ui.out.print(f"flagged {s['flagged']} of {s['n']} ({s['flagged_fraction']:.1%}); wrote {files[0]}")
            _sweep_lines(ui, s)
            _cache_line(ui, s)
        _threshold(ui, breached, f"flagged fraction {s['flagged_fraction']:.4f} > --fail-above {fail_above}")
    raise typer.Exit(1 if breached else 0)


@app.command()
def rank(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
         as_json: JsonOpt = False, debug: DebugOpt = False,
         top: Annotated[int, typer.Option(min=1, help="Rows per test example in helpful/harmful.csv.")] = 10,
         test_ids: TestIdsOpt = None,
         group_by: Annotated[str | None, typer.Option(
             help="Training column naming each row's group (default data.train.group); writes groups.csv.")] = None,
         damping_sweep: SweepOpt = False,
         knn: Annotated[int | None, typer.Option(
             min=1, help="FastIF: score only each test row's K nearest training rows (by --knn-metric).")] = None,
         knn_metric: Annotated[str, typer.Option(help="kfac | grad | cosine | l2: kfac (default) keeps the K most"
                                                      " helpful + K most harmful by a K-FAC influence estimate; grad"
                                                      " by gradient dot products; cosine / l2 are FastIF's, in the"
                                                      " last Linear layer's input features.")] = "kfac",
         no_cache: NoCacheOpt = False) -> None:
    """Influence of every training example on test examples (helpful/harmful/overall.csv).

    Example: infl rank -c configs/digits.yaml --test-ids d0022,d0105 --top 5
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from . import report
        from .commands.rank import RankOptions
        from .commands.rank import rank as rank_command
        from .run import Run

        options = RankOptions(top=top, test_ids=_split_ids(test_ids), group_by=group_by, knn=knn,
                              knn_metric=knn_metric, damping_sweep=damping_sweep)
        cfg = _load(config, set_, out, no_cache=no_cache)
        with ui.progress() as progress:
            result = rank_command(Run.open(cfg, "rank", progress, need_test=True), options)
        files = report.write_atomic(_out_dir(cfg, out), result.tables, result.manifest)
        ui.finish(result, files)
        if ui.show:
            overall = result.tables["overall.csv"]
            cols = ["rank", "id", "label", "loss_change_if_removed"]
            ui.table("most harmful to the mean test loss", overall, cols, top)
            ui.table("most helpful to the mean test loss", overall.iloc[::-1].reset_index(drop=True), cols, top)
            ui.out.print(f"{result.summary['test_examples']} test examples; wrote {', '.join(str(f) for f in files)}")
            _sweep_lines(ui, result.summary)
            _cache_line(ui, result.summary)
    raise typer.Exit(0)


@app.command()
def verify(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
           as_json: JsonOpt = False, debug: DebugOpt = False,
           samples: Annotated[int, typer.Option(
               min=2, help="Training rows to retrain without (half largest, half random).")] = 20,
           min_pearson: Annotated[float | None, typer.Option(
               min=-1.0, max=1.0, help="Exit 1 when Pearson(predicted, actual) is below this.")] = None,
           test_ids: TestIdsOpt = None,
           groups: Annotated[bool, typer.Option(help="Also retrain without each group (data.train.group).")] = False,
           group_by: Annotated[str | None, typer.Option(help="Group column for --groups.")] = None,
           workers: Annotated[int, typer.Option(min=1, help="Retrain in this many processes (CPU, Linux).")] = 1,
           fix: Annotated[Path | None, typer.Option(
               "--fix", help="fixes.csv from `infl fix`: retrain with those labels fixed; test loss and accuracy"
                             " before and after (instead of the leave-one-out check).")] = None,
           remove: Annotated[bool, typer.Option(help="With --fix: retrain without the fixed rows instead.")] = False,
           min_gain: Annotated[float | None, typer.Option(
               min=-1.0, max=1.0, help="With --fix: exit 1 when test accuracy gains less than this.")] = None,
           ) -> None:
    """Leave-one-out retraining on a sample: how well predicted loss changes match actual ones (verify.csv).

    With --fix: does applying the fixes help (fix_verify.csv)?
    Example: infl verify -c configs/digits.yaml --samples 20 --min-pearson 0.9
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from . import report
        from .commands.fixcheck import FixCheckOptions, fix_check
        from .commands.verify import VerifyOptions
        from .commands.verify import verify as verify_command
        from .run import Run

        if fix is None and (remove or min_gain is not None):
            raise ConfigError("--remove and --min-gain go with --fix FILE", hint="infl fix writes fixes.csv")
        cfg = _load(config, set_, cache=False)
        with ui.progress() as progress:
            run = Run.open(cfg, "verify", progress, need_test=True)
            result = (fix_check(run, FixCheckOptions(fix, remove, tuple(_split_ids(test_ids) or ()) or None))
                      if fix is not None else
                      verify_command(run, VerifyOptions(samples=samples, test_ids=_split_ids(test_ids), groups=groups,
                                                        group_by=group_by, workers=workers)))
        files = report.write_atomic(_out_dir(cfg, out), result.tables, result.manifest)
        s = result.summary
        breached = (fix is None and min_pearson is not None and not (s["pearson"] >= min_pearson)) or (
            fix is not None and min_gain is not None and not (s["accuracy_gain"] >= min_gain))
        ui.finish(result, files, {"threshold_breached": breached})
        if ui.show:
            (_fix_lines if fix is not None else _verify_lines)(ui, s, files)
        if fix is None:
            _threshold(ui, breached, f"Pearson {s['pearson']:.4f} < --min-pearson {min_pearson}")
        else:
            _threshold(ui, breached, f"accuracy gain {s['accuracy_gain']:.4f} < --min-gain {min_gain}")
    raise typer.Exit(1 if breached else 0)


def _fix_lines(ui: _UI, s: dict[str, Any], files: list[Path]) -> None:
    ci = s["accuracy_gain_ci95"]
    interval = f"95% CI {ci[0]:+.4f}..{ci[1]:+.4f}" if ci else "no 95% CI: too few test rows"
    ui.out.print(f"{s['mode']} {s['fixes']} rows, retrained: test accuracy {s['accuracy_before']:.4f} ->"
                 f" {s['accuracy_after']:.4f} ({s['accuracy_gain']:+.4f}, {interval}); test loss"
                 f" {s['test_loss_before']:.4f} -> {s['test_loss_after']:.4f}")
    ui.out.print(f"wrote {', '.join(str(f) for f in files)}")


@app.command("fix")
def fix_(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
         as_json: JsonOpt = False, debug: DebugOpt = False,
         top: Annotated[int | None, typer.Option(min=1, help="Fix the first K rows of selfcheck.csv.")] = None,
         flagged: Annotated[bool, typer.Option(help="Fix the flagged rows.")] = False,
         accept: Annotated[Path | None, typer.Option(
             help="An edited selfcheck.csv: fix the rows whose accept column is 1/true/yes (a new_label column"
                  " overrides the suggestion).")] = None,
         copy_images: Annotated[bool, typer.Option(help="imagefolder: also write a corrected copy of the tree.")]
         = False) -> None:
    """Apply the suggested labels to chosen suspects, in a corrected copy of the training data (fixes.csv).

    Reads selfcheck.csv in the report folder; the original data is never touched.
    Example: infl fix -c configs/digits.yaml --flagged && infl verify -c configs/digits.yaml --fix reports/digits/fixes.csv
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from . import report
        from .commands.fix import FixOptions
        from .commands.fix import fix as fix_command

        options = FixOptions(top=top, flagged=flagged, accept=accept, copy_images=copy_images)
        cfg = _load(config, set_, cache=False)
        folder = _out_dir(cfg, out)
        result, extra = fix_command(cfg, folder, options)
        files = report.write_atomic(folder, {**result.tables, **extra}, result.manifest)
        ui.finish(result, files)
        if ui.show:
            ui.table("label fixes", result.tables["fixes.csv"], ["id", "label", "new_label", "suspicion"], 20)
            ui.out.print(f"fixed {result.summary['fixed']} labels; wrote {', '.join(str(f) for f in files)}")
    raise typer.Exit(0)


def _health_tables(ui: _UI, tables: dict[str, Any], rows: int = 12) -> None:
    """classes.csv and selfcheck_groups.csv as short tables, the worst first."""
    for name, title in (("classes.csv", "classes"), ("selfcheck_groups.csv", "groups")):
        frame = tables.get(name)
        if frame is None:
            continue
        worst = frame.sort_values("estimated_error_rate", ascending=False, kind="stable")
        more = f" (worst {rows} of {len(frame)})" if len(frame) > rows else ""
        ui.table(f"{title}: estimated error rate{more}", worst, list(frame.columns), rows)


def _verify_lines(ui: _UI, s: dict[str, Any], files: list[Path]) -> None:
    lo, hi = s.get("pearson_ci95", [float("nan")] * 2)
    interval = f"95% CI {lo:.3f}..{hi:.3f}" if all(map(_finite, (lo, hi))) else "no 95% CI: too few rows"
    ui.out.print(f"retrained without {s['samples']} rows: Pearson {s['pearson']:.3f} ({interval}),"
                 f" Spearman {s['spearman']:.3f}, predicted/actual magnitude {s['magnitude_ratio']:.2f}")
    damp = ", ".join(f"{v['damping']:g}: {v['pearson']:.3f}" for v in s["pearson_by_damping"].values())
    ui.out.print(f"Pearson by damping: {damp}")
    for order, fit in s.get("groups", {}).items():
        ui.out.print(f"groups, {order}: Pearson {fit['pearson']:.3f}, mean abs error {fit['mean_abs_error']:.3g}")
    ui.out.print(f"wrote {', '.join(str(f) for f in files)}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def _sweep_lines(ui: _UI, s: dict[str, Any]) -> None:
    sweep = s.get("damping_sweep")
    if not sweep:
        return
    parts = [f"{v['damping']:g}: Spearman {v['spearman']:.3f}, top-10% overlap {v['top10pct_overlap']:.2f}"
             for k, v in sweep.items() if k.startswith("x")]
    ui.out.print(f"damping sweep of {sweep['column']} (at {sweep['damping']:g}) vs " + "; ".join(parts))


@app.command()
def diff(old_dir: Annotated[Path, typer.Argument(help="Folder of the earlier selfcheck report.")],
         new_dir: Annotated[Path, typer.Argument(help="Folder of the later selfcheck report.")],
         out: Annotated[Path | None, typer.Option("--out", "-o", help="Where diff.csv goes (default NEW_DIR).")]
         = None, quiet: QuietOpt = False, as_json: JsonOpt = False, debug: DebugOpt = False,
         fail_on_new: Annotated[int | None, typer.Option(
             min=0, help="Exit 1 when more than this many rows are newly flagged.")] = None) -> None:
    """Compare two selfcheck reports: new, persistent and resolved suspects (diff.csv).

    Example: infl diff reports/yesterday reports/today --fail-on-new 10
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from . import report
        from .diff import diff_reports
        from .run import Report

        frame, counts = diff_reports(old_dir, new_dir)
        target = (out or (new_dir if new_dir.is_dir() else new_dir.parent)).resolve()
        files = report.write_atomic(target, {"diff.csv": frame}, None)  # never touch NEW_DIR's manifest
        breached = fail_on_new is not None and counts["new"] > fail_on_new
        ui.finish(Report({"diff.csv": frame}, {"command": "diff", **counts}, {}), files,
                  {"threshold_breached": breached})
        if ui.show:
            ui.table("changes in flagged rows", frame, ["id", "status", "old_rank", "new_rank"], 20)
            ui.out.print(f"new {counts['new']}, persistent {counts['persistent']}, resolved {counts['resolved']};"
                         f" wrote {files[0]}")
        _threshold(ui, breached, f"{counts['new']} newly flagged rows > --fail-on-new {fail_on_new}")
    raise typer.Exit(1 if breached else 0)


@app.command()
def train(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
          as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Train the configured model on the training set and write model.checkpoint.

    --out is accepted as on every command; the checkpoint goes to model.checkpoint.
    Example: infl train -c configs/digits.yaml
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from .commands.train import train as train_command
        from .run import Run

        cfg = _load(config, set_, cache=False)
        with ui.progress() as progress:
            result = train_command(Run.open(cfg, "train", progress, fresh_model=True))
        ui.finish(result, [Path(result.summary["checkpoint"])])
        if ui.show:
            s = result.summary
            ui.out.print(f"trained {s['parameters']} parameters on {s['n']} rows with {s['optimizer']}: "
                         f"objective {s['objective']:.6g}, gradient norm {s['grad_norm']:.3g} "
                         f"({'converged' if s['converged'] else 'NOT converged'}) -> {s['checkpoint']}")
    raise typer.Exit(0)


@app.command()
def check(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
          as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Validate the config, load data and model, estimate time and memory; computes nothing heavy.

    Writes nothing (--out is accepted as on every command, and locates the cache).
    Example: infl check -c configs/digits.yaml
    """
    ui = _UI(quiet, as_json)
    with _run_command(debug):
        from .commands.check import check as check_command
        from .run import Run

        cfg = _load(config, set_, out)
        result = check_command(Run.open(cfg, "check", need_test=cfg.data.test is not None))
        ui.finish(result, [])
        if ui.show:
            _check_lines(ui, result.summary)
    raise typer.Exit(0)


def _check_lines(ui: _UI, s: dict[str, Any]) -> None:
    ui.out.print(yaml.safe_dump({"config": s["config"]}, sort_keys=False).rstrip())
    ui.out.print(f"train rows: {s['n']}   test rows: {s['n_test']}   device: {s['device']}")
    ui.out.print(f"parameters: {s['parameters']} selected of {s['parameters_total']}")
    ui.out.print(f"solver: {s['solver']} ({s['solver_reason']})   per-example gradients of all rows:"
                 f" ~{s['gradient_seconds']} s")
    if s["cache"]["dir"]:
        state = "cached: a rerun skips the fit" if s["cache"]["fit_cached"] else "not cached yet"
        ui.out.print(f"fitted curvature for these inputs: {state} ({s['cache']['dir']})")
    table = Table(title="solver estimates", title_justify="left")
    for c in ("solver", "memory", "fit time", "note"):
        table.add_column(c)
    for name, e in s["solver_estimates"].items():
        table.add_row(name, report_gib(e["memory_bytes"]), f"~{e['fit_seconds']} s", e["note"])
    ui.out.print(table)


def report_gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become SPEC's `error:` lines with exit 2; Ctrl-C is 130."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        _stderr().print("error: interrupted")
        sys.exit(130)
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # click's UsageError family
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `infl`: the help, on stderr, exit 2
            _stderr().print(e.format_message())
            sys.exit(2)
        _stderr().print(f"error: {e.format_message()}")
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            _stderr().print(f"  hint: see `{ctx.command_path} --help`")
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)
