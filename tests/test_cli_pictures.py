"""What users look at, through the CLI: suspects.png, explain.png, report.html, and `infl init` then `infl check`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli as run
from PIL import Image

from influence_cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("pictures")
    cfg = str(ROOT / "configs" / "digits_images.yaml")
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", cfg, "-o", str(out), "--quiet"])
    assert exc.value.code == 0
    return cfg, out


def test_selfcheck_writes_a_readable_suspects_sheet(images):
    _, out = images
    sheet = Image.open(out / "suspects.png")
    assert sheet.width >= 8 * 96 and sheet.height >= 6 * 96  # 48 tiles, 8 columns, upscaled from 16x16


def test_per_class_sheets(capsys, images, tmp_path):
    cfg, _ = images
    code, _, err = run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--gallery", "per-class", "--quiet")
    assert code == 0, err
    labels = pd.read_csv(tmp_path / "classes.csv", dtype=str).label
    assert sorted(p.name for p in tmp_path.glob("suspects_*.png")) == sorted(f"suspects_{v}.png" for v in labels)
    assert not (tmp_path / "suspects.png").exists()
    assert run(capsys, "selfcheck", "-c", cfg, "-o", str(tmp_path), "--gallery", "nope")[0] == 2


def test_explain_writes_the_strip(capsys, images):
    cfg, out = images
    test_id = sorted(p.relative_to(ROOT / "sample_data" / "digits_images" / "test").as_posix()
                     for p in (ROOT / "sample_data" / "digits_images" / "test").rglob("*.png"))[0]
    code, _, err = run(capsys, "explain", test_id, "-c", cfg, "-o", str(out), "--top", "3", "--quiet")
    assert code == 0, err
    strip = Image.open(out / "explain.png")
    assert strip.width > strip.height * 3  # one row: the test image, 3 helpful, 3 harmful


def test_report_is_one_self_contained_page(capsys, images):
    cfg, out = images
    code, _, err = run(capsys, "report", "-c", cfg, "-o", str(out), "--quiet")
    assert code == 0, err
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= 10  # thumbnails, the sheet, the plot
    top = pd.read_csv(out / "selfcheck.csv", dtype=str).id.head(5)
    positions = [page.index(i) for i in top]
    assert positions == sorted(positions)


def test_rerunning_selfcheck_retires_the_stale_report_page(capsys, images):
    cfg, out = images
    assert (out / "report.html").exists() or run(capsys, "report", "-c", cfg, "-o", str(out), "--quiet")[0] == 0
    assert run(capsys, "selfcheck", "-c", cfg, "-o", str(out), "--quiet")[0] == 0
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("sample", ["digits/train.csv", "breast_cancer/train.csv", "digits_tensors/train.npz"])
def test_init_then_check_passes(capsys, tmp_path, sample):
    name = sample.split("/")[0]
    shutil.copytree(ROOT / "sample_data" / name, tmp_path / name)
    config = tmp_path / "infl.yaml"
    code, _, err = run(capsys, "init", str(tmp_path / sample), "-c", str(config))
    assert code == 0, err
    assert run(capsys, "init", str(tmp_path / sample), "-c", str(config))[0] == 2  # never overwrites
    code, out, err = run(capsys, "check", "-c", str(config))
    assert code == 0, err
