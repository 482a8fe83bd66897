"""A CLI that answers at once: the first status line comes before torch is imported, progress bars name
their unit and show an ETA (and training its loss), `infl train` reports its training accuracy, and the
warnings come after a command's own lines."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import run_cli
from rich.console import Console

from influence_cli import render

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_first_status_line_comes_before_torch_is_imported():
    """`-X importtime` logs each import as it completes, on the same stderr: the status line is there first."""
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "from influence_cli.cli import main; main()",
                           "check", "-c", "configs/digits.yaml"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    err = ANSI.sub("", done.stderr)
    torch_loaded = re.search(r"\|\s+torch\n", err)
    assert torch_loaded is not None
    assert "infl check: reading configs/digits.yaml" in err[: torch_loaded.start()]
    assert "infl check: loading csv" in err  # then what it loads, once the config is read
    assert "train rows: 1437" in done.stdout


def test_no_status_line_off_a_terminal_so_errors_stay_one_or_two_lines(capsys, tmp_path):
    code, out, err = run_cli(capsys, "check", "-c", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) <= 2


def _terminal_ui() -> tuple[render.UI, io.StringIO]:
    ui = render.UI(quiet=False, as_json=False)
    buf = io.StringIO()
    ui.err = Console(file=buf, force_terminal=True, width=200, highlight=False, markup=False, emoji=False)
    return ui, buf


def test_bars_name_their_unit_show_an_eta_and_the_training_loss():
    ui, buf = _terminal_ui()
    ui.begin("infl train: loading csv train.csv")
    with ui.progress() as progress:
        assert progress is not None
        progress("train", 3, 10, unit="epochs", loss=0.12345)
        progress("score", 5, 20)
        progress("polish", 7, 250, unit="evaluations", loss=0.5)
        bar = ui._bar
        shown = io.StringIO()
        Console(file=shown, width=200, markup=False).print(bar.make_tasks_table(bar.tasks))  # type: ignore[union-attr]
    assert "infl train: loading csv train.csv" in ANSI.sub("", buf.getvalue()).splitlines()[0]
    text = shown.getvalue()
    for needle in (r"train .* 3/10\s+epochs\s+loss 0\.1235 .*eta", r"score .* 5/20\s+rows .*eta",
                   r"polish .* 7/250\s+evaluations\s+loss 0\.5 .*eta"):
        assert re.search(needle, text), (needle, text)
    assert ui._bar is None and ui._status is None  # stopped when the phase ends


def test_every_phase_has_a_unit():
    assert {"fit", "score", "loo", "features", "train", "polish", "retrain", "groups"} <= set(render.UNITS)
    assert render.UNITS["train"] == "epochs" and render.UNITS["polish"] == "evaluations"
    assert render.UNITS["score"] == "rows"


def test_train_reports_its_accuracy_and_warns_under_half_after_its_summary(capsys, tmp_path):
    ckpt = tmp_path / "m.pt"
    args = ["train", "-c", "configs/digits.yaml", "--set", f"model.checkpoint={ckpt}", "--set", "train.optimizer=sgd",
            "--set", "train.lr=1e-9", "--set", "train.epochs=1", "--set", "train.polish=false"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0
    accuracy = float(re.search(r"training accuracy ([0-9.]+)%", out).group(1)) / 100
    assert 0 < accuracy < 0.5
    assert "warning: training accuracy" in err and "under 50%" in err
    code, out, _ = run_cli(capsys, *args, "--json")
    doc = json.loads(out)
    assert doc["train_accuracy"] == accuracy or abs(doc["train_accuracy"] - accuracy) < 1e-3
    assert any("training accuracy" in w for w in doc["warnings"])


def test_a_model_that_fits_gets_no_accuracy_warning(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "-c", "configs/digits.yaml", "--set", f"model.checkpoint={tmp_path / 'm.pt'}",
                             "--set", "train.epochs=30")
    assert code == 0 and "training accuracy" in out and "warning: training accuracy" not in err


def test_shell_completion_is_on():
    done = subprocess.run([sys.executable, "-c", "from influence_cli.cli import main; main()", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--install-completion" in done.stdout and "--show-completion" in done.stdout
    # typer detects the shell from the parent processes (shellingham) and then takes no shell name; under some
    # launchers it detects none ("Shell  not supported"). Its test switch makes --show-completion take the name.
    no_detect = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    done = subprocess.run([sys.executable, "-c", "from influence_cli.cli import main; main()", "--show-completion",
                           "bash"], cwd=ROOT, env=no_detect, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "complete" in done.stdout and "infl" in done.stdout.lower()
    env = {**os.environ, "_INFL_COMPLETE": "complete_bash", "COMP_WORDS": "infl selfcheck --rank", "COMP_CWORD": "2"}
    done = subprocess.run([sys.executable, "-c", "from influence_cli.cli import main; main()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["--rank-by"]


def test_selfcheck_of_a_model_that_fits_nothing_warns_in_the_terminal_after_its_summary(capsys, tmp_path):
    ckpt = tmp_path / "bad.pt"
    code, _, _ = run_cli(capsys, "train", "-c", "configs/digits.yaml", "--set", f"model.checkpoint={ckpt}", "--set",
                         "train.optimizer=sgd", "--set", "train.lr=1e-9", "--set", "train.epochs=1", "--set",
                         "train.polish=false", "--quiet")
    assert code == 0
    code, out, err = run_cli(capsys, "selfcheck", "-c", "configs/digits.yaml", "--set", f"model.checkpoint={ckpt}",
                             "-o", str(tmp_path / "r"), "--no-cache")
    assert code == 0 and "flagged" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert any("training labels" in w and "fits almost nothing" in w for w in warnings), err
    assert any("not at a minimum" in w for w in warnings), err  # the gradient norm at the checkpoint
    code, out, err = run_cli(capsys, "selfcheck", "-c", "configs/digits.yaml", "--set", f"model.checkpoint={ckpt}",
                             "-o", str(tmp_path / "r"), "--no-cache", "--quiet")
    assert code == 0 and out == "" and err == ""
