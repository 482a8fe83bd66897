"""Contact sheets of image rows: the suspects of `selfcheck`, the helpful/harmful strips of `rank` and `explain`.

Layout is torchvision's `make_grid`; captions are PIL `ImageDraw` text in PIL's own scalable font (no font
file, nothing downloaded). Small images (8x8 or 16x16 digits) are upscaled by a whole factor with
nearest-neighbour, so each source pixel stays a crisp square; large ones are shrunk with antialiasing.
A tile is the image in a coloured frame with its caption (up to three lines) underneath.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .errors import DataError
from .files import write_file

Color = tuple[int, int, int]
BACKGROUND: Color = (246, 246, 246)  # a grey, so make_grid's scalar pad_value paints it
TEXT: Color = (25, 25, 25)
MUTED: Color = (85, 85, 85)
NEUTRAL: Color = (150, 150, 150)
TEST: Color = (31, 119, 180)
HELPFUL: Color = (40, 150, 60)
HARMFUL: Color = (210, 45, 40)
FRAME = 3  # px of coloured frame around each image
GAP = 6  # px between tiles
MAX_LINES = 3


def contact_sheet(images: Tensor, captions: Sequence[str], columns: int = 8, tile: int = 96,
                  colors: Sequence[Color] | None = None, title: str | None = None) -> Image.Image:
    """A grid of `images` (N, C, H, W), floats in [0, 1] or uint8, C in {1, 3, 4}, each scaled to fit a
    `tile` x `tile` square, framed in `colors[i]` (default grey) and captioned with `captions[i]` ("\\n"
    separates lines). Width: columns * (tile + 2 * FRAME + GAP) + GAP pixels (fewer columns when N is smaller)."""
    sheet, _ = _sheet(list(images), captions, columns, tile, colors)
    return _with_header(sheet, [(GAP, title, TEXT)] if title else [], tile)


def suspects_sheet(images: Tensor, ids: Sequence[str], given: Sequence[Any], suggested: Sequence[Any],
                   ranks: Sequence[int], columns: int = 8) -> Image.Image:
    """Top suspects of a selfcheck report, in the order given: "#rank  given -> suggested" over the row's id.
    Rows with a suggested label (flagged) get a red frame; an empty suggestion shows the given label alone."""
    n = len(images)
    if not len(ids) == len(given) == len(suggested) == len(ranks) == n:
        raise ValueError(f"suspects_sheet: {n} images but {len(ids)} ids, {len(given)} labels, "
                         f"{len(suggested)} suggestions and {len(ranks)} ranks")
    captions, colors = [], []
    for i in range(n):
        hint = "" if suggested[i] in ("", None) or str(suggested[i]) == "nan" else str(suggested[i])
        head = f"#{ranks[i]}  {given[i]} -> {hint}" if hint else f"#{ranks[i]}  label {given[i]}"
        captions.append(f"{head}\n{ids[i]}")
        colors.append(HARMFUL if hint else NEUTRAL)
    title = f"top {n} suspects  ·  #rank  given label -> suggested label (red frame: flagged)"
    sheet, _ = _sheet(list(images), captions, columns, 96, colors)
    return _with_header(sheet, [(GAP, title, TEXT)], 96)


def explain_strip(test_image: Tensor, test_caption: str, helpful: Sequence[tuple[Tensor, str]],
                  harmful: Sequence[tuple[Tensor, str]]) -> Image.Image:
    """One row: the test image (blue frame), its most helpful training images (green), then the most harmful
    (red), each group named above its first tile. Images are (C, H, W); suggested captions:
    "#1  label 3\\n+1.2e-03\\n<train id>"."""
    images = [test_image, *(im for im, _ in helpful), *(im for im, _ in harmful)]
    captions = [test_caption, *(c for _, c in helpful), *(c for _, c in harmful)]
    colors = [TEST] + [HELPFUL] * len(helpful) + [HARMFUL] * len(harmful)
    sheet, step = _sheet(images, captions, len(images), 96, colors)
    labels = [(GAP, "test", TEST)]
    if helpful:
        labels.append((GAP + step, "most helpful", HELPFUL))
    if harmful:
        labels.append((GAP + step * (1 + len(helpful)), "most harmful", HARMFUL))
    return _with_header(sheet, labels, 96)


def stacked(rows: Sequence[Image.Image], title: str | None = None) -> Image.Image:
    """`rows` (PIL images, e.g. explain strips) one under the other, left-aligned, under an optional title."""
    if not rows:
        raise ValueError("stacked: no rows")
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows) + GAP * (len(rows) - 1)), BACKGROUND)
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + GAP
    return _with_header(out, [(GAP, title, TEXT)] if title else [], 96)


def images_of(dataset: Any, rows: Sequence[int], mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> Tensor:
    """Rows of a torch Dataset whose items are (x, y), x an image (C, H, W) or (H, W) tensor (or a PIL image),
    as (N, C, H, W) floats in [0, 1] for display. With `mean`/`std` (the config's Normalize) the normalization
    is undone; without, an image already within [0, 1] is kept and any other is min-max scaled on its own.
    Images of different sizes are centred on a black canvas of the largest."""
    from torchvision.transforms.functional import pil_to_tensor

    out = []
    for r in rows:
        x = dataset[int(r)][0]
        if isinstance(x, Image.Image):
            x = pil_to_tensor(x.convert("RGB") if x.mode not in ("L", "RGB") else x).float() / 255
        x = torch.as_tensor(x).detach().cpu().float()
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3:
            raise DataError(f"row {r}: its input has shape {tuple(x.shape)}, not an image (C, H, W)",
                            hint="galleries need image data: imagefolder, torchvision, or tensors shaped (n, C, H, W)")
        if mean is not None and std is not None:
            x = x * torch.tensor(std, dtype=x.dtype).view(-1, 1, 1) + torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        else:
            x = torch.nan_to_num(x)
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:
                x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
        out.append(x.clamp(0, 1))
    if not out:
        return torch.zeros(0, 1, 1, 1)
    h, w = max(x.shape[1] for x in out), max(x.shape[2] for x in out)
    return torch.stack([_pad_to(x, h, w, 0.0) for x in out])


def thumbnails(images: Tensor, ids: Sequence[str], size: int = 64) -> dict[str, bytes]:
    """id -> PNG bytes of each image scaled to fit `size` px (nearest-neighbour up), for the HTML report."""
    return {str(i): png_bytes(_to_pil(_fit(_rgb(im), size, pad=False))) for im, i in zip(images, ids, strict=True)}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    """Write `image` as a PNG at `path` (temp file + os.replace): a killed run leaves the old one."""
    return write_file(Path(path), png_bytes(image))


# ---- layout


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # PIL >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _rgb(image: Tensor) -> Tensor:
    """(C, H, W) uint8 or float -> (3, H, W) float in [0, 1]."""
    x = torch.as_tensor(image).detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else torch.nan_to_num(x.float())
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise DataError(f"cannot show an image of shape {tuple(x.shape)}: expected (C, H, W) with 1, 3 or 4 channels")
    x = x[:3] if x.shape[0] == 4 else x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return x.clamp(0, 1)


def _fit(x: Tensor, tile: int, pad: bool = True) -> Tensor:
    """Scale (3, H, W) to fit tile x tile: whole-factor nearest up, antialiased down; centred on the page
    colour when `pad`."""
    from torchvision.transforms.functional import resize

    h, w = x.shape[1:]
    scale = tile / max(h, w)
    if scale >= 1:
        k = int(scale)
        x = F.interpolate(x[None], scale_factor=k, mode="nearest")[0] if k > 1 else x
    else:
        x = resize(x, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return _pad_to(x, tile, tile, BACKGROUND[0] / 255) if pad else x


def _pad_to(x: Tensor, h: int, w: int, value: float) -> Tensor:
    dh, dw = h - x.shape[1], w - x.shape[2]
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=value)


def _framed(x: Tensor, color: Color) -> Tensor:
    out = torch.empty(3, x.shape[1] + 2 * FRAME, x.shape[2] + 2 * FRAME)
    out[:] = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255
    out[:, FRAME:-FRAME, FRAME:-FRAME] = x
    return out


def _font_size(tile: int) -> int:
    return max(11, min(20, round(tile * 0.145)))


def _sheet(images: list[Tensor], captions: Sequence[str], columns: int, tile: int,
           colors: Sequence[Color] | None) -> tuple[Image.Image, int]:
    """(the captioned grid, the x step from one tile to the next)."""
    from torchvision.utils import make_grid

    n = len(images)
    if n == 0:
        raise DataError("contact sheet: no images to show", hint="the report has no rows for this sheet")
    if len(captions) != n or (colors is not None and len(colors) != n):
        raise ValueError(f"contact sheet: {n} images, {len(captions)} captions, {len(colors or [])} colors")
    if columns < 1 or tile < 8:
        raise ValueError(f"contact sheet: columns {columns} must be >= 1 and tile {tile} >= 8")
    lines = [str(c).split("\n")[:MAX_LINES] for c in captions]
    size = _font_size(tile)
    fonts = [_font(size + 2), _font(size)]  # the first line (rank, labels) a little larger than the rest (ids)
    heights = [size + 6, size + 4]
    caption_h = 4 + max(heights[0] + heights[1] * (len(ls) - 1) for ls in lines)
    page = BACKGROUND[0] / 255
    tiles = []
    for i, image in enumerate(images):
        framed = _framed(_fit(_rgb(image), tile), colors[i] if colors is not None else NEUTRAL)
        tiles.append(F.pad(framed, (0, 0, 0, caption_h), value=page))
    columns = min(columns, n)
    grid = make_grid(torch.stack(tiles), nrow=columns, padding=GAP, pad_value=page)
    if n == 1:  # make_grid returns a single image as it is, without the padding
        grid = F.pad(tiles[0], (GAP, GAP, GAP, GAP), value=page)
    sheet = _to_pil(grid)
    draw = ImageDraw.Draw(sheet)
    tile_w, tile_h = tiles[0].shape[2], tiles[0].shape[1]
    for i, caption_lines in enumerate(lines):
        x0 = GAP + (i % columns) * (tile_w + GAP)
        y = GAP + (i // columns) * (tile_h + GAP) + tile + 2 * FRAME + 3
        for j, line in enumerate(caption_lines):
            font = fonts[min(j, 1)]
            text = _fit_text(draw, line, font, tile_w)
            width = draw.textlength(text, font=font)
            draw.text((x0 + (tile_w - width) / 2, y), text, fill=TEXT if j == 0 else MUTED, font=font)
            y += heights[min(j, 1)]
    return sheet, tile_w + GAP


def _with_header(sheet: Image.Image, labels: list[tuple[int, str, Color]], tile: int) -> Image.Image:
    """The sheet under a band holding each (x, text, colour) label; the band widens the sheet if a label needs it."""
    if not labels:
        return sheet
    font = _font(_font_size(tile) + 1)
    probe = ImageDraw.Draw(sheet)
    height = _font_size(tile) + 12
    width = max(sheet.width, *(int(x + probe.textlength(text, font=font)) + GAP for x, text, _ in labels))
    out = Image.new("RGB", (width, sheet.height + height), BACKGROUND)
    out.paste(sheet, (0, height))
    draw = ImageDraw.Draw(out)
    for i, (x, text, color) in enumerate(labels):
        room = (labels[i + 1][0] if i + 1 < len(labels) else width) - x - GAP
        draw.text((x, 6), _fit_text(draw, text, font, room), fill=color, font=font)
    return out


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, shortened in the middle with "..." until it fits `width` px (ids keep both ends)."""
    if draw.textlength(text, font=font) <= width - 4:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        short = text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2:]
        if draw.textlength(short, font=font) <= width - 4:
            return short
    return "..."


def _to_pil(x: Tensor) -> Image.Image:
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)
