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


def test_rank_writes_its_strips_for_image_data(capsys, images, tmp_path):
    cfg, _ = images
    tests = sorted(p.relative_to(ROOT / "sample_data" / "digits_images" / "test").as_posix()
                   for p in (ROOT / "sample_data" / "digits_images" / "test").rglob("*.png"))[:3]
    code, _, err = run(capsys, "rank", "-c", cfg, "-o", str(tmp_path), "--test-ids", ",".join(tests), "--top", "3",
                       "--quiet")
    assert code == 0, err
    strips = Image.open(tmp_path / "rank_strips.png")
    assert strips.width > strips.height  # three rows of 1 + 3 + 3 tiles


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


def _pairs(train_ids, test_ids, top, sign):
    """helpful.csv / harmful.csv rows (rank's columns) pairing each test id with `top` training ids."""
    records = [(t, "0", r + 1, train_ids[(k * top + r) % len(train_ids)], "1", sign * (top - r) * 1e-3)
               for k, t in enumerate(test_ids) for r in range(top)]
    return pd.DataFrame.from_records(records, columns=["test_id", "test_label", "rank", "train_id", "train_label",
                                                       "loss_change_if_removed"])


def test_rank_strips_one_row_per_test_example_helpful_green_harmful_red(tmp_path):
    from influence_cli.commands.images import rank_strips
    from influence_cli.config import load_config
    from influence_cli.data import load_split
    from influence_cli.gallery import HARMFUL, HELPFUL, TEST

    cfg = load_config(ROOT / "configs" / "digits_images.yaml", [])
    train = load_split(cfg.data.train, "train", cfg.task)
    test = load_split(cfg.data.test, "test", cfg.task, classes=train.classes)
    norms = ((cfg.data.test.mean, cfg.data.test.std), (cfg.data.train.mean, cfg.data.train.std))

    def sheet(count, limit=12):
        helpful = _pairs(train.ids, test.ids[:count], 3, +1)
        harmful = _pairs(train.ids[::-1], test.ids[:count], 3, -1)
        files = rank_strips(test, train, helpful, harmful, 3, *norms, limit=limit)
        assert list(files) == ["rank_strips.png"]
        path = tmp_path / f"strips{count}.png"
        path.write_bytes(files["rank_strips.png"])
        return Image.open(path).convert("RGB")

    one, two, many = sheet(1), sheet(2), sheet(5, limit=2)
    assert one.width == two.width and one.width > 6 * 96  # the test image, 3 helpful, 3 harmful
    assert two.height > 1.8 * (one.height - 30) and many.height == two.height  # a row per test example, capped
    colours = {c for _, c in one.getcolors(maxcolors=1 << 20)}
    assert {TEST, HELPFUL, HARMFUL} <= colours  # the frames
    csv = load_split(load_config(ROOT / "configs" / "digits.yaml", []).data.train, "train", "classification")
    assert rank_strips(csv, csv, _pairs(csv.ids, csv.ids[:1], 2, 1), _pairs(csv.ids, csv.ids[:1], 2, -1), 2,
                       (None, None), (None, None)) == {}
