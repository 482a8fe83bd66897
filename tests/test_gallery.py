"""Contact sheets: sizes, nearest-neighbour upscaling, frame colours, display of normalized images, atomic PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from influence_cli import gallery
from influence_cli.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
STEP = 96 + 2 * gallery.FRAME + gallery.GAP  # x distance between tiles of 96 px


def checkerboard(n: int, side: int = 8) -> torch.Tensor:
    """(n, 1, side, side) floats: pixel (r, c) is 1 where r + c is even."""
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return ((r + c) % 2 == 0).float().expand(n, 1, side, side).clone()


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.convert("RGB").getpixel((x, y))


def test_contact_sheet_has_one_tile_per_image_in_columns():
    sheet = gallery.contact_sheet(checkerboard(10), [f"#{i}  7 -> 1" for i in range(10)], columns=4, tile=96)
    assert sheet.width == 4 * STEP + gallery.GAP
    rows = 3
    tile_h = (sheet.height - gallery.GAP) / rows - gallery.GAP
    assert tile_h == int(tile_h) and tile_h > 96 + 2 * gallery.FRAME + 10  # room for a caption under each image
    fewer = gallery.contact_sheet(checkerboard(2), ["a", "b"], columns=8, tile=96)
    assert fewer.width == 2 * STEP + gallery.GAP  # no empty columns


def test_small_images_are_upscaled_nearest_neighbour_to_the_tile():
    sheet = gallery.contact_sheet(checkerboard(1), ["x"], columns=1, tile=96)
    x0 = y0 = gallery.GAP + gallery.FRAME  # top-left pixel of the image inside its frame
    for r in range(8):
        for c in range(8):
            block = {pixel(sheet, x0 + 12 * c + dx, y0 + 12 * r + dy) for dx in (0, 11) for dy in (0, 11)}
            assert block == {(255, 255, 255) if (r + c) % 2 == 0 else (0, 0, 0)}, (r, c)


def test_uint8_rgb_and_rgba_inputs_and_bad_shapes():
    rgb = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    rgb[:, 0] = 255  # red
    sheet = gallery.contact_sheet(rgb, ["r", "g", "b"], columns=3, tile=32)
    assert pixel(sheet, gallery.GAP + gallery.FRAME + 5, gallery.GAP + gallery.FRAME + 5) == (255, 0, 0)
    assert gallery.contact_sheet(torch.rand(2, 4, 10, 10), ["a", "b"], 2, 48).mode == "RGB"
    with pytest.raises(DataError, match="shape"):
        gallery.contact_sheet(torch.rand(2, 5, 10, 10), ["a", "b"], 2, 48)
    with pytest.raises(DataError, match="no images"):
        gallery.contact_sheet(torch.rand(0, 1, 8, 8), [], 2, 48)


def test_suspects_sheet_frames_flagged_rows_red(tmp_path):
    n = 24
    sheet = gallery.suspects_sheet(checkerboard(n), [f"{i % 10}/d{i:04d}.png" for i in range(n)],
                                   [str(i % 10) for i in range(n)], ["1" if i % 2 else "" for i in range(n)],
                                   list(range(1, n + 1)))
    assert sheet.width == 8 * STEP + gallery.GAP
    assert [frame_color(sheet, i) for i in range(3)] == [gallery.NEUTRAL, gallery.HARMFUL, gallery.NEUTRAL]
    path = gallery.save_png_atomic(sheet, tmp_path / "suspects.png")
    with Image.open(path) as back:
        assert back.size == sheet.size and back.format == "PNG"


def frame_color(sheet: Image.Image, i: int) -> tuple[int, int, int]:
    """The colour of tile i's (first row) left frame edge: the colour that fills most of that pixel column."""
    x = gallery.GAP + i * STEP + 1
    column = [pixel(sheet, x, y) for y in range(sheet.height)]
    color = max(set(column) - {gallery.BACKGROUND}, key=column.count)
    assert column.count(color) >= 96  # a whole frame side, not a stray caption pixel
    return color


def test_explain_strip_is_one_row_test_helpful_harmful():
    img = checkerboard(1)[0]
    strip = gallery.explain_strip(img, "test t1\nlabel 3", [(img, f"#{i}\n+0.1") for i in range(3)],
                                  [(img, f"#{i}\n-0.1") for i in range(2)])
    assert strip.width == 6 * STEP + gallery.GAP
    colors = [frame_color(strip, i) for i in range(6)]
    assert colors == [gallery.TEST] + [gallery.HELPFUL] * 3 + [gallery.HARMFUL] * 2
    only_test = gallery.explain_strip(img, "t", [], [])
    assert only_test.width >= STEP + gallery.GAP


class Rows(torch.utils.data.Dataset):
    def __init__(self, xs):
        self.xs = xs

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], 0


def test_images_of_undoes_normalization_and_scales_unknown_ranges():
    raw = torch.rand(3, 1, 8, 8)
    normalized = (raw - 0.3) / 0.35
    back = gallery.images_of(Rows(normalized), [2, 0], mean=[0.3], std=[0.35])
    torch.testing.assert_close(back, raw[[2, 0]].clamp(0, 1), atol=1e-6, rtol=0)
    scaled = gallery.images_of(Rows(normalized), [1])
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == pytest.approx(1.0)
    torch.testing.assert_close(gallery.images_of(Rows(raw), [1]), raw[[1]])  # already displayable: kept
    mixed = gallery.images_of(Rows([torch.rand(3, 8, 8), torch.rand(3, 12, 10)]), [0, 1])
    assert mixed.shape == (2, 3, 12, 10)
    with pytest.raises(DataError, match="not an image"):
        gallery.images_of(Rows([torch.rand(64)]), [0])


def test_thumbnails_are_pngs_keyed_by_id():
    thumbs = gallery.thumbnails(checkerboard(3), ["a", "b", "c"], size=64)
    assert list(thumbs) == ["a", "b", "c"]
    import io

    with Image.open(io.BytesIO(thumbs["b"])) as im:
        assert im.format == "PNG" and im.size == (64, 64)


def test_save_png_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "sheet.png"
    gallery.save_png_atomic(Image.new("RGB", (4, 4)), path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(Exception, match="sheet.png"):
        gallery.save_png_atomic(Image.new("RGB", (9, 9)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]


def test_sheet_of_the_sample_image_folder():
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose, Grayscale, ToTensor

    ds = ImageFolder(str(ROOT / "sample_data/digits_images/train"), transform=Compose([Grayscale(1), ToTensor()]))
    images = gallery.images_of(ds, range(16))
    assert images.shape == (16, 1, 8, 8)
    ids = [Path(p).relative_to(ds.root).as_posix() for p, _ in ds.samples[:16]]
    sheet = gallery.suspects_sheet(images, ids, [ds.classes[t] for t in ds.targets[:16]], [""] * 16,
                                   list(range(1, 17)), columns=8)
    assert sheet.width == 8 * STEP + gallery.GAP
