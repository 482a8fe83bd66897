"""`infl`: thin Typer commands over `commands/`. Errors map to exit codes in `cli_runtime.run_command` only.

stdout carries tables (or, with --json, one JSON document and nothing else); progress bars,
warnings and errors go to stderr. Exit codes (SPEC): 0 done, 1 threshold breached, 2 bad usage or
config, 3 unusable data or model, 4 internal error, 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import render
from .cli_runtime import (
    end_torchrun_process,
    load_cli_config,
    out_dir,
    parse_shard,
    run_command,
    split_ids,
)
from .errors import ConfigError

if TYPE_CHECKING:  # the library imports torch (seconds): commands import it when they run, so --help is instant
    from .run import Report  # noqa: F401

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
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


def _shard_done(ui: render.UI, result: Report) -> None:
    s = result.summary
    ui.finish(result, [])
    if ui.show:
        ui.out.print(f"shard {s['shard']}: {s['shards']} of {s['shards_total']} cache shards (rows {s['rows']}),"
                     f" {s['shards_computed']} computed, {s['shards_reused']} already there; no report written:"
                     " run the same command with --merge when every job is done")


def _threshold(ui: render.UI, breached: bool, message: str) -> None:
    if breached:
        ui.err.print(f"threshold: {message}")


TopOpt = Annotated[int, typer.Option(min=1, help="Rows shown in the terminal table (the CSV has all).")]
TestIdsOpt = Annotated[str | None, typer.Option(help="Only these test ids, comma separated (default: all).")]
ShardOpt = Annotated[str | None, typer.Option(
    metavar="i/N", help="Compute only shard i of N of the training rows into the cache (cache.dir), write no report"
                        " (SLURM arrays, Kubernetes Indexed Jobs); then --merge.")]
MergeOpt = Annotated[bool, typer.Option(help="Write the reports from the --shard jobs' shards in the cache, computing"
                                             " none (exit 3 naming the missing ones).")]
SweepOpt = Annotated[bool, typer.Option(help="Also rank at 0.1x and 10x solver.damping (curvature refitted only)"
                                             " and report how much the ranking moves.")]


def _text_columns(cfg: Any) -> list[str]:
    """The train split's text column(s), shown (cut to render.TEXT_WIDTH) beside the suspects."""
    text = getattr(cfg.data.train, "text", None)
    return [] if not text else [text] if isinstance(text, str) else list(text)


@app.command(short_help='Rank every training example by how likely its label is wrong.')
def selfcheck(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
              as_json: JsonOpt = False, debug: DebugOpt = False, top: TopOpt = 10,
              fail_above: Annotated[float | None, typer.Option(
                  min=0.0, max=1.0, help="Exit 1 when the flagged fraction of the training set exceeds this.")] = None,
              rank_by: Annotated[str, typer.Option(metavar="[suspicion|self_influence|loo_loss|loss]", help="Sort order: suspicion (default) | self_influence | loo_loss | loss.")]
              = "suspicion",
              damping_sweep: SweepOpt = False, no_cache: NoCacheOpt = False,
              group_by: Annotated[str | None, typer.Option(
                  help="Training column naming each row's group (default data.train.group);"
                       " writes selfcheck_groups.csv.")] = None,
              shard: ShardOpt = None, merge: MergeOpt = False,
              gallery: Annotated[str, typer.Option(
                  metavar="[sheet|per-class|none]", help="Image data: sheet (suspects.png, the top suspects) | per-class (suspects_<label>.png)"
                       " | none.")] = "sheet",
              cross_fit: Annotated[int | None, typer.Option(
                  "--cross-fit", metavar="K", min=0,
                  help="Suspicion and flags from the out-of-fold outputs of K fresh models trained with the"
                       " train: recipe (K trainings; for models that memorize their labels); 0: never. Default:"
                       " selfcheck.cross_fit (auto: 5 when the model memorized and it fits the budget).")] = None
              ) -> None:
    """Self-influence of every training example; flags likely label errors (selfcheck.csv, classes.csv).

    Example: infl selfcheck -c configs/digits.yaml --top 20 --fail-above 0.15
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl selfcheck: reading {config}")
        from . import report
        from .commands.selfcheck import SelfcheckOptions
        from .commands.selfcheck import selfcheck as selfcheck_command
        from .run import Run

        options = SelfcheckOptions(rank_by=rank_by, damping_sweep=damping_sweep, group_by=group_by, gallery=gallery,
                                   cross_fit=cross_fit)
        job = parse_shard(shard, merge)
        cfg = load_cli_config(config, set_, out, no_cache=no_cache)
        ui.begin(render.loading_line(cfg, "selfcheck"))
        with ui.progress() as progress:
            run = Run.open(cfg, "selfcheck", progress)
            run.distribute(job, merge)
            result = selfcheck_command(run, options)
        if job is not None:
            _shard_done(ui, result)
            raise typer.Exit(0)
        files = report.write_atomic(out_dir(cfg, out), result.tables, result.manifest)
        s = result.summary
        # a memorizing model's one-fit flags undercount: a threshold they pass is not passed (SPEC: exit 0 = done)
        undecided = fail_above is not None and not s.get("flags_trusted", True)
        breached = fail_above is not None and (s["flagged_fraction"] > fail_above or undecided)
        ui.finish(result, files, {"threshold_breached": breached})
        if ui.show:
            ui.table(f"most suspect training examples (by {s['rank_by']})", result.tables["selfcheck.csv"],
                     ["rank", "id", "label", "predicted", "suspicion", "self_influence", "flagged",
                      "suggested_label", *_text_columns(cfg)], top)
            render.health_tables(ui, result.tables)
            lo, hi = s["estimated_error_rate_ci90"]
            ui.out.print(f"flagged {s['flagged']} of {s['n']} ({s['flagged_fraction']:.1%}); estimated label error rate"
                         f" {s['estimated_error_rate']:.1%} (90% interval {lo:.1%}..{hi:.1%}); wrote {files[0]}")
            render.cross_fit_line(ui, s)
            render.sweep_lines(ui, s)
            render.cache_line(ui, s)
        _threshold(ui, breached, f"flagged fraction {s['flagged_fraction']:.4f} > --fail-above {fail_above}"
                   if not undecided or s["flagged_fraction"] > fail_above else
                   f"flagged fraction {s['flagged_fraction']:.4f} cannot be held to --fail-above {fail_above}: the"
                   " model memorized its labels and the flags come from one fit (see the warning); rerun with"
                   " --cross-fit 5")
    raise typer.Exit(1 if breached else 0)


@app.command(short_help='Influence of every training example on test examples.')
def rank(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
         as_json: JsonOpt = False, debug: DebugOpt = False,
         top: Annotated[int, typer.Option(min=1, help="Rows per test example in helpful/harmful.csv.")] = 10,
         test_ids: TestIdsOpt = None,
         group_by: Annotated[str | None, typer.Option(
             help="Training column naming each row's group (default data.train.group); writes groups.csv.")] = None,
         damping_sweep: SweepOpt = False,
         knn: Annotated[int | None, typer.Option(
             min=1, help="FastIF: score only each test row's K nearest training rows (by --knn-metric).")] = None,
         knn_metric: Annotated[str, typer.Option(metavar="[kfac|grad|cosine|l2]", help="kfac | grad | cosine | l2: kfac (default) keeps the K most"
                                                      " helpful + K most harmful by a K-FAC influence estimate; grad"
                                                      " by gradient dot products; cosine / l2 are FastIF's, in the"
                                                      " last Linear layer's input features.")] = "kfac",
         no_cache: NoCacheOpt = False, shard: ShardOpt = None, merge: MergeOpt = False) -> None:
    """Influence of every training example on test examples (helpful/harmful/overall.csv).

    Example: infl rank -c configs/digits.yaml --test-ids d0022,d0105 --top 5
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl rank: reading {config}")
        from . import report
        from .commands.rank import RankOptions
        from .commands.rank import rank as rank_command
        from .run import Run

        options = RankOptions(top=top, test_ids=split_ids(test_ids), group_by=group_by, knn=knn,
                              knn_metric=knn_metric, damping_sweep=damping_sweep)
        job = parse_shard(shard, merge)
        cfg = load_cli_config(config, set_, out, no_cache=no_cache)
        ui.begin(render.loading_line(cfg, "rank"))
        with ui.progress() as progress:
            run = Run.open(cfg, "rank", progress, need_test=True)
            run.distribute(job, merge)
            result = rank_command(run, options)
        if job is not None:
            _shard_done(ui, result)
            raise typer.Exit(0)
        files = report.write_atomic(out_dir(cfg, out), result.tables, result.manifest)
        ui.finish(result, files)
        if ui.show:
            overall = result.tables["overall.csv"]
            cols = ["rank", "id", "label", "loss_change_if_removed"]
            ui.table("most harmful to the mean test loss", overall, cols, top)
            ui.table("most helpful to the mean test loss", overall.iloc[::-1].reset_index(drop=True), cols, top)
            if "groups.csv" in result.tables:
                ui.table("groups, most harmful first (method: newton estimate or retrained)",
                         result.tables["groups.csv"], ["group", "size", "loss_change_if_removed", "method"], top)
            ui.out.print(f"{result.summary['test_examples']} test examples; wrote {', '.join(str(f) for f in files)}")
            render.sweep_lines(ui, result.summary)
            render.cache_line(ui, result.summary)
    raise typer.Exit(0)


@app.command(short_help='Retrain without a sample of examples: can the scores be trusted?')
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
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl verify: reading {config}")
        from . import report
        from .commands.fixcheck import FixCheckOptions, fix_check
        from .commands.verify import VerifyOptions, retrain_threads
        from .commands.verify import verify as verify_command
        from .retrain import torch_threads
        from .run import Run

        if fix is None and (remove or min_gain is not None):
            raise ConfigError("--remove and --min-gain go with --fix FILE", hint="infl fix writes fixes.csv")
        cfg = load_cli_config(config, set_, cache=False)
        ui.begin(render.loading_line(cfg, "verify"))
        with ui.progress() as progress:
            run = Run.open(cfg, "verify", progress, need_test=True)
            with torch_threads(retrain_threads(run)):
                result = (fix_check(run, FixCheckOptions(fix, remove, tuple(split_ids(test_ids) or ()) or None))
                          if fix is not None else
                          verify_command(run, VerifyOptions(samples=samples, test_ids=split_ids(test_ids),
                                                            groups=groups, group_by=group_by, workers=workers)))
        files = report.write_atomic(out_dir(cfg, out), result.tables, result.manifest)
        s = result.summary
        breached = (fix is None and min_pearson is not None and not (s["pearson"] >= min_pearson)) or (
            fix is not None and min_gain is not None and not (s["accuracy_gain"] >= min_gain))
        ui.finish(result, files, {"threshold_breached": breached})
        if ui.show:
            (render.fix_lines if fix is not None else render.verify_lines)(ui, s, files)
        if fix is None:
            _threshold(ui, breached, f"Pearson {s['pearson']:.4f} < --min-pearson {min_pearson}")
        else:
            _threshold(ui, breached, f"accuracy gain {s['accuracy_gain']:.4f} < --min-gain {min_gain}")
    raise typer.Exit(1 if breached else 0)


@app.command("fix", short_help='Write a corrected copy of the data with the suggested labels.')
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
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl fix: reading {config}")
        from . import report
        from .commands.fix import FixOptions
        from .commands.fix import fix as fix_command

        options = FixOptions(top=top, flagged=flagged, accept=accept, copy_images=copy_images)
        cfg = load_cli_config(config, set_, cache=False)
        ui.begin(render.loading_line(cfg, "fix"))
        folder = out_dir(cfg, out)
        result, extra = fix_command(cfg, folder, options)
        files = report.write_atomic(folder, {**result.tables, **extra}, result.manifest)
        ui.finish(result, files)
        if ui.show:
            ui.table("label fixes", result.tables["fixes.csv"], ["id", "label", "new_label", "suspicion"], 20)
            ui.out.print(f"fixed {result.summary['fixed']} labels; wrote {', '.join(str(f) for f in files)}")
    raise typer.Exit(0)


@app.command(short_help='One test example and its most helpful and harmful training rows.')
def explain(test_id: Annotated[str, typer.Argument(help="The id of one test example (data.test's id column).")],
            config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
            as_json: JsonOpt = False, debug: DebugOpt = False,
            top: Annotated[int, typer.Option(min=1, help="Most helpful and most harmful rows to show.")] = 10,
            no_cache: NoCacheOpt = False) -> None:
    """One test example: its prediction and its most helpful and most harmful training examples (explain.csv).

    Example: infl explain d0022 -c configs/digits.yaml --top 5
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl explain: reading {config}")
        from . import report
        from .commands.explain import ExplainOptions
        from .commands.explain import explain as explain_command
        from .run import Run

        cfg = load_cli_config(config, set_, out, no_cache=no_cache)
        ui.begin(render.loading_line(cfg, "explain"))
        with ui.progress() as progress:
            result = explain_command(Run.open(cfg, "explain", progress, need_test=True), ExplainOptions(test_id, top))
        files = report.write_atomic(out_dir(cfg, out), result.tables, result.manifest)
        ui.finish(result, files)
        if ui.show:
            render.explain_panel(ui, result.summary, result.tables["explain.csv"], files)
    raise typer.Exit(0)


@app.command("report", short_help='A self-contained HTML audit page (report.html).')
def report_(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
            as_json: JsonOpt = False, debug: DebugOpt = False,
            history: Annotated[Path | None, typer.Option(
                help="An older report folder: the page also shows new, persistent and resolved suspects.")] = None
            ) -> None:
    """A self-contained HTML page of the audit in the report folder (report.html), for a browser.

    Needs the [report] extra (matplotlib) for its plot. Example: infl report -c configs/digits_images.yaml
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl report: reading {config}")
        import pandas as pd

        from . import report
        from .commands.images import thumbnails
        from .data import load_split
        from .html_report import render_report

        cfg = load_cli_config(config, set_, cache=False)
        ui.begin(render.loading_line(cfg, "report"))
        folder = out_dir(cfg, out)
        table = (pd.read_csv(folder / "selfcheck.csv", dtype=str, keep_default_na=False, usecols=["id"])
                 if (folder / "selfcheck.csv").is_file() else None)  # render_report names a missing one
        thumbs = {}
        if table is not None and cfg.data.train.format in ("imagefolder", "torchvision", "tensors", "python"):
            train = load_split(cfg.data.train, "train", cfg.task)
            thumbs = thumbnails(train, table, cfg.data.train.mean, cfg.data.train.std)
        page = render_report(folder, thumbs, history)
        files = report.write_atomic(folder, {"report.html": page}, None, command="report")
        summary = {"command": "report", "file": str(files[0]), "thumbnails": len(thumbs)}
        ui.finish(render.plain_report(summary), files)
        if ui.show:
            ui.out.print(f"wrote {files[0]} (open it in a browser)")
    raise typer.Exit(0)


@app.command(short_help='Write a commented config inferred from the data.')
def init(data: Annotated[Path, typer.Argument(help="The training data: a CSV/Parquet file, an image folder, or"
                                                   " a .pt/.npz tensors file.")],
         test: Annotated[Path | None, typer.Option(help="The test data (default: a sibling named test...).")] = None,
         config: Annotated[Path, typer.Option("--config", "-c", help="Where to write the config.")]
         = Path("infl.yaml"),
         model: Annotated[str | None, typer.Option(help="logreg | mlp | cnn | resnet18 (default: logreg, cnn for"
                                                       " images), or for text data PATH, a local Hugging Face folder"
                                                       " (save_pretrained: config.json, model.safetensors,"
                                                       " tokenizer).")] = None,
         force: Annotated[bool, typer.Option(help="Overwrite an existing config.")] = False,
         quiet: QuietOpt = False, as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Write a commented config inferred from the data (columns, classes, image size); never overwrites without --force.

    Example: infl init data/train.csv --test data/test.csv -c infl.yaml && infl check -c infl.yaml
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl init: reading {data}")
        from .init_config import infer_config, write_config

        path = write_config(config, infer_config(data, test, model, config_path=config), force)
        ui.finish(render.plain_report({"command": "init", "config": str(path)}), [path])
        if ui.show:
            ui.out.print(f"wrote {path}; next: infl check -c {path}, then infl train -c {path} if it has no checkpoint")
    raise typer.Exit(0)


@app.command(short_help='New, persistent and resolved suspects between two selfchecks.')
def diff(old_dir: Annotated[Path, typer.Argument(help="Folder of the earlier selfcheck report.")],
         new_dir: Annotated[Path, typer.Argument(help="Folder of the later selfcheck report.")],
         out: Annotated[Path | None, typer.Option("--out", "-o", help="Where diff.csv goes (default NEW_DIR).")]
         = None, quiet: QuietOpt = False, as_json: JsonOpt = False, debug: DebugOpt = False,
         fail_on_new: Annotated[int | None, typer.Option(
             min=0, help="Exit 1 when more than this many rows are newly flagged.")] = None) -> None:
    """Compare two selfcheck reports: new, persistent and resolved suspects (diff.csv).

    Example: infl diff reports/yesterday reports/today --fail-on-new 10
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl diff: reading {old_dir} and {new_dir}")
        from . import report
        from .diff import diff_reports
        from .run import Report

        frame, counts = diff_reports(old_dir, new_dir)
        target = (out or (new_dir if new_dir.is_dir() else new_dir.parent)).resolve()
        files = report.write_atomic(target, {"diff.csv": frame}, None, command="diff")  # never touch its manifest
        breached = fail_on_new is not None and counts["new"] > fail_on_new
        ui.finish(Report({"diff.csv": frame}, {"command": "diff", **counts}, {}), files,
                  {"threshold_breached": breached})
        if ui.show:
            ui.table("changes in flagged rows", frame, ["id", "status", "old_rank", "new_rank"], 20)
            ui.out.print(f"new {counts['new']}, persistent {counts['persistent']}, resolved {counts['resolved']};"
                         f" wrote {files[0]}")
        _threshold(ui, breached, f"{counts['new']} newly flagged rows > --fail-on-new {fail_on_new}")
    raise typer.Exit(1 if breached else 0)


@app.command(short_help='Train the configured model and write model.checkpoint.')
def train(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
          as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Train the configured model on the training set and write model.checkpoint.

    --out is accepted as on every command; the checkpoint goes to model.checkpoint.
    Example: infl train -c configs/digits.yaml
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl train: reading {config}")
        from .commands.train import train as train_command
        from .run import Run

        cfg = load_cli_config(config, set_, cache=False)
        ui.begin(render.loading_line(cfg, "train"))
        with ui.progress() as progress:
            result = train_command(Run.open(cfg, "train", progress, fresh_model=True))
        ui.finish(result, [Path(result.summary["checkpoint"])])
        if ui.show:
            render.train_lines(ui, result.summary)
    raise typer.Exit(0)


@app.command(short_help='Validate config, data and model; estimate time and memory.')
def check(config: ConfigOpt, out: OutOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
          as_json: JsonOpt = False, debug: DebugOpt = False,
          show_config: Annotated[bool, typer.Option(help="Also print the resolved config.")] = False) -> None:
    """Validate the config, load data and model, estimate time and memory; computes nothing heavy.

    Writes nothing (--out is accepted as on every command, and locates the cache).
    Example: infl check -c configs/digits.yaml
    """
    ui = render.UI(quiet, as_json)
    with run_command(debug, ui):
        ui.begin(f"infl check: reading {config}")
        from .commands.check import check as check_command
        from .run import Run

        cfg = load_cli_config(config, set_, out)
        ui.begin(render.loading_line(cfg, "check"))
        result = check_command(Run.open(cfg, "check", need_test=cfg.data.test is not None))
        ui.finish(result, [])
        if ui.show:
            render.check_lines(ui, result.summary, show_config)
    raise typer.Exit(0)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become SPEC's `error:` lines with exit 2; Ctrl-C is 130."""
    try:
        _main(argv)
    except SystemExit as e:
        end_torchrun_process(e.code)
        raise


def _main(argv: list[str] | None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="infl")
    except KeyboardInterrupt:
        render.stderr_console().print("error: interrupted")
        sys.exit(130)
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # click's UsageError family
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `infl`: the help, on stderr, exit 2
            render.stderr_console().print(e.format_message())
            sys.exit(2)
        render.stderr_console().print(f"error: {e.format_message()}")
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            render.stderr_console().print(f"  hint: see `{ctx.command_path} --help`")
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)
