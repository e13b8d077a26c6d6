"""The pictures and the page of ``pipeline.evaluate``: side-by-side crops (LR | output | HR) and index.html."""

from __future__ import annotations

import html
import math
from pathlib import PurePosixPath
from typing import Any

import cv2
import numpy as np

GAP = 4  # white pixels between the panels of a side-by-side crop

# metric key -> (column title, decimals); keys not listed (pyiqa metrics) get 4 decimals
_COLUMNS = {
    "psnr_y": ("PSNR Y (dB)", 2),
    "ssim_y": ("SSIM Y", 4),
    "psnr_rgb": ("PSNR RGB (dB)", 2),
    "ssim_rgb": ("SSIM RGB", 4),
    "clip_good_photo": ("CLIP good photo (not pyiqa clipiqa)", 4),
}


def crop_name(rel: str) -> str:
    """A flat, unique PNG name for an image's crop (folders joined with '__')."""
    return "__".join(PurePosixPath(rel).with_suffix("").parts) + ".png"


def detail_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` square with the most gradient energy: where SR differences show."""
    h, w = hr.shape[:2]
    if size >= h and size >= w:
        return 0, 0
    gray = cv2.cvtColor(hr, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    # box sums over every window through an integral image; ties go to the first (top-left) window
    integral = cv2.integral(energy, sdepth=cv2.CV_64F)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x), int(y)


def side_by_side(sr: np.ndarray, hr: np.ndarray, lr: np.ndarray | None, crop_size: int) -> np.ndarray:
    """The same region of LR (nearest-upsampled), output and HR, side by side with white gaps."""
    h, w = hr.shape[:2]
    size = min(crop_size, h, w)
    x, y = detail_window(hr, size)
    panels = [sr[y:y + size, x:x + size], hr[y:y + size, x:x + size]]
    if lr is not None:
        fy, fx = lr.shape[0] / h, lr.shape[1] / w
        y0, x0 = int(math.floor(y * fy)), int(math.floor(x * fx))
        y1, x1 = max(int(math.ceil((y + size) * fy)), y0 + 1), max(int(math.ceil((x + size) * fx)), x0 + 1)
        region = lr[y0:y1, x0:x1]
        # nearest keeps the LR pixels visible as blocks, which is what a reader wants to compare
        panels.insert(0, cv2.resize(region, (size, size), interpolation=cv2.INTER_NEAREST))
    gap = np.full((size, GAP, 3), 255, np.uint8)
    parts = [panels[0]]
    for panel in panels[1:]:
        parts += [gap, panel]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _fmt(value: Any, decimals: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):  # non-finite numbers travel as "inf" / "nan"
        return value
    return f"{value:.{decimals}f}"


def _cells(row: dict[str, Any], keys: list[str]) -> str:
    return "".join(f"<td>{_fmt(row.get(k), _COLUMNS.get(k, (k, 4))[1])}</td>" for k in keys)


def render_html(result: dict[str, Any]) -> str:
    """index.html: the mean and per-image table, rejects, notes and the crops."""
    keys = result["metrics"]
    esc = html.escape
    head = "".join(f"<th>{esc(_COLUMNS.get(k, (k, 4))[0])}</th>" for k in keys)
    rows = [
        f"<tr><td>{esc(r['path'])}</td><td>{r['width']}x{r['height']}</td>{_cells(r, keys)}</tr>"
        for r in result["images"]
    ]
    mean = f"<tr class='mean'><td>mean of {result['count']}</td><td></td>{_cells(result['mean'], keys)}</tr>"
    rejects = "".join(
        f"<tr><td>{esc(r['source'])}</td><td>{esc(r['reason'])}</td><td>{esc(r['error'])}</td></tr>"
        for r in result["rejected"]
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in result["notes"])
    panels = "LR | output | HR" if result.get("lr") else "output | HR"
    figures = "".join(
        f"<figure><img src='{esc(r['crop'])}' alt='{esc(r['path'])}'><figcaption>{esc(r['path'])}: "
        + ", ".join(f"{esc(_COLUMNS.get(k, (k, 4))[0])} {_fmt(r.get(k), _COLUMNS.get(k, (k, 4))[1])}" for k in keys)
        + "</figcaption></figure>"
        for r in result["images"] if r.get("crop")
    )
    sources = (
        f"output <code>{esc(str(result['input']))}</code>, reference <code>{esc(str(result['reference']))}</code>"
        + (f", LR <code>{esc(str(result['lr']))}</code>" if result.get("lr") else "")
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SR evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
td:first-child {{ text-align: left; }}
tr.mean {{ font-weight: bold; background: #f0f0f0; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
figure img {{ image-rendering: pixelated; height: 256px; }}
figcaption {{ font-size: 0.85em; }}
</style></head><body>
<h1>Super-resolution evaluation</h1>
<p>{sources}. PSNR/SSIM under the {esc(result['protocol'])} protocol ({esc(result['protocol_detail'])}),
{result['crop_border']} px border cropped; Y is the BT.601 luma. Elapsed {result['elapsed_s']} s.</p>
<table><tr><th>image</th><th>size</th>{head}</tr>
{mean}
{"".join(rows)}
</table>
<h2>Rejected ({len(result['rejected'])})</h2>
<table><tr><th>image</th><th>reason</th><th>detail</th></tr>{rejects}</table>
<h2>Notes</h2><ul>{notes or "<li>none</li>"}</ul>
<h2>Crops ({panels})</h2>
{figures}
</body></html>
"""
