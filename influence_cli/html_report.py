"""`infl report`: one self-contained HTML page of an audit, built from the files of a report folder.

Self-contained means a reader can mail it or open it offline: CSS inline, every image a `data:` URI (the
distribution plot, PNG thumbnails, `suspects*.png` sheets found in the folder), no script, no external URL,
no web font. All text from the reports is escaped. The plot needs matplotlib (the `report` extra), imported
only when a page is rendered.

Read here: `selfcheck.csv` (required), `selfcheck.manifest.json` or else `manifest.json` (summary figures and
warnings, when it is selfcheck's),
`classes.csv`, `selfcheck_groups.csv`, `overall.csv`, `groups.csv` and `suspects*.png` when present; and, with `history`,
an older report folder's `selfcheck.csv` for what changed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .diff import read_selfcheck
from .errors import ConfigError, DataError
from .files import write_file

REPORT_NAME = "report.html"
SHOWN_IDS = 40  # ids listed per status in "what changed"
STANDARD = ["rank", "id", "label", "predicted", "prob_label", "loss", "self_influence", "suspicion", "flagged",
            "suggested_label"]
SIGNALS = {"loss_rank", "loo_loss"}  # extra numeric columns of selfcheck.csv, not worth a column here

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 background:#f5f6f8;color:#1d1f23;font-size:15px;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d6d9de;
 padding-bottom:4px}
.sub{color:#5b616b;margin:0 0 18px}.note{color:#5b616b;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde0e5;border-radius:8px;padding:12px 16px;min-width:150px}
.card .v{font-size:24px;font-weight:600}.card .k{color:#5b616b;font-size:13px}
.card.alert .v{color:#b42318}
.warn{background:#fff7e0;border:1px solid #f0c36d;border-radius:8px;padding:10px 14px;margin:14px 0}
.warn li{margin:2px 0}
table{border-collapse:collapse;background:#fff;border:1px solid #dde0e5;font-size:14px;margin:6px 0}
th,td{padding:5px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:middle}
th{background:#eef0f3;font-weight:600;position:sticky;top:0}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.flagged td{background:#fff1f0}tr.flagged td.lab{color:#b42318;font-weight:600}
td.img{padding:2px 8px}td.img img{display:block;image-rendering:pixelated;width:40px;height:auto;border:1px solid #ccc}
.track{display:inline-block;width:120px;height:9px;background:#eceef1;border-radius:2px;margin-left:8px;
 vertical-align:middle;text-align:left}.bar{display:block;height:9px;background:#d9534f;border-radius:2px}
img.plot,img.sheet{max-width:100%;height:auto;background:#fff;border:1px solid #dde0e5;border-radius:6px}
img.sheet{image-rendering:pixelated}
.ids{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;overflow-wrap:anywhere}
.tag{display:inline-block;border-radius:4px;padding:0 6px;font-size:13px;font-weight:600}
.new{background:#fde2e1;color:#9f1c14}.persistent{background:#fff0c2;color:#7a5600}
.resolved{background:#dcf3e3;color:#17663a}
"""


def render_report(folder: Path, thumbnails: Mapping[str, bytes] | None = None, history: Path | None = None,
                  top: int = 50) -> str:
    """The HTML text of the audit of report `folder`. `thumbnails`: row id -> PNG bytes (image data), shown
    beside the top `top` suspects. `history`: an older report folder of the same training set; the page then
    lists the flagged ids that are new, persistent and resolved since. ConfigError when there is no
    selfcheck.csv or matplotlib is missing; DataError when a report file cannot be read."""
    folder = Path(folder)
    table = read_selfcheck(folder, "report folder").reset_index()
    manifest = _manifest(folder / "selfcheck.manifest.json") or _manifest(folder / "manifest.json")
    summary = manifest.get("summary", {}) if manifest.get("command", "selfcheck") == "selfcheck" else {}
    key = "suspicion" if "suspicion" in table.columns else "self_influence"
    values = pd.to_numeric(table[key], errors="coerce").to_numpy(dtype=float)
    flagged = table["flagged"].to_numpy(dtype=bool)
    parts = [f"<h1>infl audit report</h1><p class='sub'>{_e(folder.resolve().name)}/ · {len(table)} training rows"
             f"{_run_line(manifest)}</p>",
             _warnings(manifest.get("warnings") or []),
             _summary(len(table), int(flagged.sum()), summary),
             "<h2>Suspicion distribution</h2>",
             f"<img class='plot' alt='histogram of {key}' src='{_png_uri(_distribution_png(values, flagged, key))}'>",
             f"<p class='note'>{_e(_threshold_note(values, flagged, key))}</p>"]
    classes = _optional_csv(folder / "classes.csv", "label", "top_suggested_label")
    if classes is not None:
        parts += ["<h2>Per class</h2>", _rate_table(classes, "label")]
    groups = _optional_csv(folder / "selfcheck_groups.csv", "group")
    if groups is not None:
        parts += ["<h2>Per group</h2>", _rate_table(groups, "group")]
    sheets = sorted(folder.glob("suspects*.png"))
    if sheets:
        parts.append("<h2>Suspects gallery</h2>")
        parts += [f"<p><img class='sheet' alt='{_e(p.name)}' src='{_png_uri(p.read_bytes())}'></p>" for p in sheets]
    parts += [f"<h2>Top {min(top, len(table))} suspects</h2>",
              f"<p class='note'>sorted by {_e(summary.get('rank_by', key))}, most suspect first; flagged rows are red;"
              f" every row is in selfcheck.csv.</p>", _suspects_table(table.head(top), key, thumbnails or {})]
    if history is not None:
        parts += ["<h2>What changed</h2>", _changes(Path(history), table)]
    overall = _optional_csv(folder / "overall.csv", "id", "label")
    if overall is not None:
        parts += ["<h2>Most harmful training rows for the test set</h2>",
                  "<p class='note'>from overall.csv: removing a row with a negative value would lower the mean test"
                  " loss.</p>", _plain_table(overall.head(10))]
    effects = _optional_csv(folder / "groups.csv", "group", "method")
    if effects is not None:
        shown = [c for c in ("group", "size", "loss_change_if_removed", "method", "loss_change_if_removed_newton",
                             "trusted") if c in effects.columns]
        parts += ["<h2>Group effects on the test loss</h2>",
                  "<p class='note'>from groups.csv (rank --group-by): removing a group with a negative value would"
                  " lower the mean test loss; method says whether it was estimated (newton) or measured by"
                  " retraining.</p>", _plain_table(effects[shown])]
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>infl audit: {_e(folder.resolve().name)}</title><style>{CSS}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")


def write_report(folder: Path, text: str) -> Path:
    """Write `text` to folder/report.html atomically (temp file + os.replace). Returns the path."""
    return write_file(Path(folder) / REPORT_NAME, text.encode("utf-8"))


# ---- sections


def _summary(n: int, flagged: int, summary: Mapping[str, Any]) -> str:
    cards = [("training rows", f"{n:,}", False),
             ("flagged as likely label errors", f"{flagged:,} ({flagged / n:.1%})" if n else "0", flagged > 0)]
    rate = _number(summary.get("estimated_error_rate"))
    if rate is not None:
        ci = summary.get("estimated_error_rate_ci95")
        bounds = [_number(b) for b in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else [None, None]
        extra = f" <span class='k'>(95% CI {bounds[0]:.1%}–{bounds[1]:.1%})</span>" if None not in bounds else ""
        cards.append(("estimated label error rate", f"{rate:.1%}{extra}", True))
    accuracy = _number(summary.get("train_accuracy"))
    if accuracy is not None:
        cards.append(("training accuracy", f"{accuracy:.1%}", accuracy < 0.5))
    for name in ("suspicion_method", "solver"):
        if isinstance(summary.get(name), str):
            cards.append((name.replace("_", " "), _e(summary[name]), False))
    return "<div class='cards'>" + "".join(
        f"<div class='card{' alert' if alert else ''}'><div class='v'>{value}</div><div class='k'>{_e(label)}</div>"
        "</div>" for label, value, alert in cards) + "</div>"


def _warnings(warnings: Iterable[Any]) -> str:
    items = [f"<li>{_e(w)}</li>" for w in warnings]
    return f"<div class='warn'><strong>Warnings</strong><ul>{''.join(items)}</ul></div>" if items else ""


def _suspects_table(rows: pd.DataFrame, key: str, thumbnails: Mapping[str, bytes]) -> str:
    shown = [c for c in ["rank", "id", "label", "suggested_label", "predicted", "prob_label", key,
                         "self_influence" if key != "self_influence" else "", "loss"]
             if c and c in rows.columns and not _blank(rows[c])]
    extras = [c for c in rows.columns if c not in STANDARD and c not in SIGNALS
              and not pd.api.types.is_numeric_dtype(rows[c])]
    image = any(str(i) in thumbnails for i in rows["id"])
    head = "".join(f"<th>{_e(c)}</th>" for c in (["image"] if image else []) + shown + extras)
    lines = []
    for _, row in rows.iterrows():
        cells = []
        if image:
            png = thumbnails.get(str(row["id"]))
            cells.append(f"<td class='img'><img alt='{_e(row['id'])}' src='{_png_uri(png)}'></td>" if png else "<td>")
        for c in shown + extras:
            css = " class='lab'" if c == "suggested_label" else ""
            cells.append(_cell(row[c], css))
        css = ' class="flagged"' if row["flagged"] else ""
        lines.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _rate_table(table: pd.DataFrame, first: str) -> str:
    """classes.csv / selfcheck_groups.csv, with a bar for estimated_error_rate."""
    rate = pd.to_numeric(table.get("estimated_error_rate"), errors="coerce") if "estimated_error_rate" in table \
        else None
    top_rate = float(rate.max()) if rate is not None and rate.notna().any() and rate.max() > 0 else 1.0
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    lines = []
    for i, row in table.iterrows():
        cells = []
        for c in table.columns:
            if c == "estimated_error_rate" and rate is not None and np.isfinite(rate[i]):
                width = max(1, round(120 * float(rate[i]) / top_rate))
                cells.append(f"<td class='n'>{rate[i]:.1%}<span class='track'><span class='bar' "
                             f"style='width:{width}px'></span></span></td>")
            else:
                cells.append(_cell(row[c]))
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _plain_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _changes(history: Path, table: pd.DataFrame) -> str:
    """Flagged ids new since `history`, still flagged (persistent) and no longer flagged or gone (resolved)."""
    try:
        old = read_selfcheck(history, "history")
    except DataError as e:
        return f"<p class='note'>cannot compare with {_e(history)}: {_e(e.message)}</p>"
    new = table.set_index("id")
    if not old.index.intersection(new.index).size:
        return (f"<p class='note'>{_e(history)} shares no row ids with this report: it is a report of another "
                "dataset, so nothing is compared.</p>")
    old_flagged, new_flagged = set(old.index[old["flagged"]]), set(new.index[new["flagged"]])
    rank = dict(zip(new.index, new["rank"], strict=True))
    old_rank = dict(zip(old.index, old["rank"], strict=True))
    groups = {"new": sorted(new_flagged - old_flagged, key=lambda i: rank[i]),
              "persistent": sorted(new_flagged & old_flagged, key=lambda i: rank[i]),
              "resolved": sorted(old_flagged - new_flagged, key=lambda i: old_rank[i])}
    text = {"new": "flagged now, not in the older report", "persistent": "flagged in both",
            "resolved": "flagged in the older report, not now (or the row is gone)"}
    parts = [f"<p class='note'>compared with {_e(history.resolve())} ({len(old):,} rows, {len(old_flagged):,}"
             " flagged)</p>", "<table><thead><tr><th>status</th><th>rows</th><th>ids (most suspect first)</th>"
             "</tr></thead><tbody>"]
    for status, ids in groups.items():
        listed = ", ".join(_e(i) for i in ids[:SHOWN_IDS]) + (f", … ({len(ids) - SHOWN_IDS} more)"
                                                              if len(ids) > SHOWN_IDS else "")
        parts.append(f"<tr><td><span class='tag {status}'>{status}</span> <br><span class='note'>{text[status]}"
                     f"</span></td><td class='n'>{len(ids):,}</td><td class='ids'>{listed or '—'}</td></tr>")
    return "".join(parts) + "</tbody></table>"


def _distribution_png(values: np.ndarray, flagged: np.ndarray, key: str) -> bytes:
    """Histogram of `values`, flagged rows stacked in red, a dashed line at the flag threshold (the smallest
    value among flagged rows). Log-scaled x when the values are positive and span over two decades."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("infl report draws its plot with matplotlib, which is not installed",
                          hint="pip install 'influence-cli[report]'") from None
    finite = np.isfinite(values)
    values, flagged = values[finite], flagged[finite]
    fig = Figure(figsize=(9, 3.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(values):
        low, high = float(values.min()), float(values.max())
        log = key != "suspicion" and low > 0 and high / low > 100  # suspicion is a rank in (0, 1]
        bins = np.geomspace(low, high, 60) if log else np.linspace(low, high if high > low else low + 1, 60)
        ax.hist([values[~flagged], values[flagged]], bins=bins, stacked=True, color=["#8c96a3", "#d2372c"],
                label=[f"not flagged ({int((~flagged).sum()):,})", f"flagged ({int(flagged.sum()):,})"])
        if log:
            ax.set_xscale("log")
        if flagged.any():
            threshold = float(values[flagged].min())
            ax.axvline(threshold, color="#1d1f23", linestyle="--", linewidth=1.2,
                       label=f"flag threshold {threshold:.3g}")
        ax.legend(frameon=False)
    ax.set_xlabel(f"{key}{' (log scale)' if len(values) and log else ''}  →  more suspect")
    ax.set_ylabel("training rows")
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _threshold_note(values: np.ndarray, flagged: np.ndarray, key: str) -> str:
    if not flagged.any():
        return f"No row is flagged; the plot shows every row's {key}."
    threshold = float(np.nanmin(values[flagged]))
    above = int((values >= threshold).sum())
    return (f"Flag threshold: {key} >= {threshold:.4g} (the smallest value among the {int(flagged.sum()):,} "
            f"flagged rows; {above:,} rows lie at or above it).")


# ---- helpers


def _manifest(path: Path) -> dict[str, Any]:
    """A manifest's content; {} when there is none. selfcheck.manifest.json (if the folder has one) is
    selfcheck's own; manifest.json is the last command's."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e})", hint="rerun the command that wrote it") from None
    return data if isinstance(data, dict) else {}


def _optional_csv(path: Path, *text_columns: str) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype=dict.fromkeys(text_columns, str), keep_default_na=False)
    except pd.errors.EmptyDataError:
        return None
    except Exception as e:  # noqa: BLE001 - pandas raises many types for a damaged file; the file is the cause
        raise DataError(f"{path}: cannot read it as CSV ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _run_line(manifest: Mapping[str, Any]) -> str:
    bits = []
    if isinstance(manifest.get("command"), str):
        bits.append(f"last command: infl {_e(manifest['command'])}")
    if isinstance(manifest.get("solver"), Mapping) and isinstance(manifest["solver"].get("name"), str):
        bits.append(f"solver {_e(manifest['solver']['name'])}")
    if isinstance(manifest.get("run_id"), str):
        bits.append(f"run {_e(manifest['run_id'])}")
    return "".join(f" · {b}" for b in bits)


def _cell(value: Any, css: str = "") -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"<td{css}>{'yes' if value else ''}</td>"
    if isinstance(value, (int, np.integer)):
        return f"<td class='n'>{int(value):,}</td>"
    if isinstance(value, (float, np.floating)):
        return f"<td class='n'>{'' if not np.isfinite(value) else f'{value:.4g}'}</td>"
    return f"<td{css}>{_e(value)}</td>"


def _blank(column: pd.Series) -> bool:
    return bool(column.isna().all() or (column.astype(str).str.strip() == "").all())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return None
    return float(value)


def _png_uri(data: bytes | Sequence[int]) -> str:
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
