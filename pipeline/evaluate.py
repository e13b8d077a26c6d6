"""``python -m pipeline.evaluate``: PSNR/SSIM (Y and RGB; BasicSR's or pyiqa's protocol), a CLIP score, pyiqa
metrics -> a report. docs/evaluate.md says which protocol the papers' tables use.

Outputs (``--input``) and references (``--reference``) are paired by relative path, ignoring the
extension (``a/b.png`` pairs with ``a/b.jpg``). Writes ``OUTPUT/metrics.json`` (per image and mean),
``OUTPUT/index.html`` and side-by-side crops under ``OUTPUT/crops/``. Unpaired, undecodable and
size-mismatched images are rejects with a reason, never a crash. Local folders or ``s3://`` prefixes.
The exit status is 1 when no image could be evaluated (the report is still written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipeline.evaluate_report import crop_name, render_html, side_by_side
from spasem.config import (
    Config,
    ConfigError,
    build_parser,
    config_from_args,
    config_to_yaml,
)
from spasem.config.evaluate import EvaluateConfig
from spasem.metrics import ClipGoodPhoto, PyiqaMetrics, full_reference_metrics
from spasem.shards import encode_png
from spasem.storage import Store
from stages.read import TOO_SMALL, ReadImages, RejectError
from stages.runtime import error_line, print_rejects, user_errors

log = logging.getLogger("pipeline.evaluate")
DEFAULT_INPUT = "runs/upscale"
DEFAULT_OUTPUT = "runs/evaluate"

NO_REFERENCE = "no reference image"
NO_OUTPUT = "no output image"
AMBIGUOUS = "ambiguous reference"
SIZE_MISMATCH = "size mismatch"
PROTOCOLS = {
    "basicsr": "BasicSR's basicsr/metrics/psnr_ssim.py: BT.601 Y (and RGB), crop_border px cut from each side",
    "pyiqa": "XPSR's test.py metrics() with pyiqa 0.1.10: psnr/ssim on the BT.601 Y, no crop unless crop_border; "
             "RGB as pyiqa's psnr / ssimc defaults",
}


def _stem(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(""))


def pair_images(outputs: Sequence[str], references: Sequence[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """Pair by relative path (exact first, then same path without extension); the rest become rejects."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for ref in references:
        by_stem[_stem(ref)].append(ref)
    refs, used = set(references), set()
    pairs, rejects = [], []
    for out in outputs:
        candidates = [out] if out in refs else by_stem.get(_stem(out), [])
        if len(candidates) == 1:
            pairs.append((out, candidates[0]))
            used.add(candidates[0])
        elif candidates:
            used.update(candidates)  # they have an output, just not a unique one: not "no output" too
            rejects.append(_reject(out, AMBIGUOUS, f"{len(candidates)} references match: {', '.join(candidates)}"))
        else:
            rejects.append(_reject(out, NO_REFERENCE, "no reference with this relative path (any extension)"))
    for ref in references:
        if ref not in used:
            rejects.append(_reject(ref, NO_OUTPUT, "reference without an output with this relative path"))
    return pairs, rejects


def _reject(source: str, reason: str, detail: str) -> dict[str, str]:
    return {"source": source, "reason": reason, "error": f"{reason}: {detail}"}


def _json_safe(value: Any) -> Any:
    """inf/nan (PSNR of identical images) as strings, so metrics.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _lr_index(store: Store | None, suffixes: tuple[str, ...]) -> dict[str, str]:
    return {_stem(rel): rel for rel in store.list(suffixes)} if store is not None else {}


def _means(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    # BasicSR and the papers average per-image values (not a PSNR of the pooled MSE)
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys if any(k in r for r in rows)}


def run_evaluate(cfg: Config, ecfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every output against its reference; write metrics.json, index.html, crops/ and config.yaml."""
    if not ecfg.reference:
        raise ConfigError("evaluate needs the HR references: --reference URI (or evaluate.reference)")
    if not cfg.input or not cfg.output:
        raise ConfigError("evaluate needs --input (the SR outputs) and --output (the report)")
    start = time.time()

    def store(uri: str) -> Store:
        return cfg.storage.open(uri)

    sr_store, hr_store, out = store(cfg.input), store(ecfg.reference), store(cfg.output)
    lr_store = store(ecfg.lr) if ecfg.lr else None
    out.write("config.yaml", config_to_yaml(cfg).encode())
    suffixes = cfg.data.suffixes
    outputs, references = sr_store.list(suffixes), hr_store.list(suffixes)
    if not outputs:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) found under {cfg.input}")
    pairs, rejects = pair_images(outputs, references)
    lr_index = _lr_index(lr_store, suffixes)
    border = ecfg.effective_crop_border(cfg.data.scale)
    log.info("%d outputs, %d references: %d pairs, %s protocol, crop border %d", len(outputs), len(references),
             len(pairs), ecfg.protocol, border)

    def reader(store: Store) -> ReadImages:
        return ReadImages(store, cfg.data.max_pixels, 1, cfg.data.max_bytes)

    read_sr, read_hr = reader(sr_store), reader(hr_store)
    read_lr = reader(lr_store) if lr_store is not None else None
    clip = ClipGoodPhoto(ecfg.clip_model, ecfg.device) if ecfg.clip_model else None
    pyiqa = PyiqaMetrics(ecfg.pyiqa_metrics, ecfg.device)
    notes = list(pyiqa.notes)
    if clip is None:
        notes.append("clip_good_photo skipped: no evaluate.clip_model given")
    rows: list[dict[str, Any]] = []
    for i, (sr_rel, hr_rel) in enumerate(pairs):
        try:
            row, sr, hr = _measure(read_sr, read_hr, sr_rel, hr_rel, border, ecfg.protocol)
        except RejectError as exc:
            rejects.append({"source": sr_rel, "reason": exc.reason, "error": str(exc)})
            continue
        if clip is not None:
            row["clip_good_photo"] = clip([sr])[0]
        row.update(pyiqa(sr, hr))
        if sum("crop" in r for r in rows) < ecfg.report_images:
            lr = _read_lr(read_lr, lr_index.get(_stem(sr_rel)), notes)
            name = crop_name(sr_rel)
            if any(r.get("crop") == f"crops/{name}" for r in rows):  # a.png and a.jpg both in the outputs
                name = f"{name[:-4]}-{i}.png"
            row["crop"] = f"crops/{name}"
            out.write(row["crop"], encode_png(side_by_side(sr, hr, lr, ecfg.crop_size)))
        rows.append(row)
        if (i + 1) % 50 == 0:
            log.info("evaluated %d / %d pairs", i + 1, len(pairs))
    keys = ["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"] + (["clip_good_photo"] if clip else []) + list(pyiqa.metrics)
    elapsed = round(time.time() - start, 3)
    result = {
        "input": sr_store.uri, "reference": hr_store.uri, "lr": lr_store.uri if lr_store else None,
        "protocol": ecfg.protocol, "protocol_detail": PROTOCOLS[ecfg.protocol], "crop_border": border, "metrics": keys, "count": len(rows), "mean": _means(rows, keys),
        "images": rows, "rejected": rejects,
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "notes": notes, "elapsed_s": elapsed, "images_per_s": round(len(rows) / elapsed, 3) if elapsed else None,
    }
    result = _json_safe(result)
    out.write("metrics.json", json.dumps(result, indent=1, allow_nan=False).encode())
    out.write("index.html", render_html(result).encode())
    return result


def _measure(read_sr: ReadImages, read_hr: ReadImages, sr_rel: str, hr_rel: str, border: int,
             protocol: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    sr = read_sr.read_one(sr_rel)
    try:
        hr = read_hr.read_one(hr_rel)
    except RejectError as exc:
        detail = str(exc)[len(exc.reason) + 2:]
        raise RejectError(exc.reason, f"reference {hr_rel}" + (f": {detail}" if detail else "")) from None
    if sr.shape != hr.shape:
        raise RejectError(SIZE_MISMATCH, f"output {sr.shape[1]}x{sr.shape[0]}, reference {hr.shape[1]}x{hr.shape[0]}")
    try:
        metrics = full_reference_metrics(sr, hr, border, protocol)
    except ValueError as exc:
        raise RejectError(TOO_SMALL, str(exc)) from None
    row = {"path": sr_rel, "reference": hr_rel, "width": int(sr.shape[1]), "height": int(sr.shape[0])}
    row.update(metrics)
    return row, sr, hr


def _read_lr(reader: ReadImages | None, rel: str | None, notes: list[str]) -> np.ndarray | None:
    """The LR image for the crops, or None; a bad LR costs only its panel, so it is a note, not a reject."""
    if reader is None or rel is None:
        return None
    try:
        return reader.read_one(rel)
    except RejectError as exc:
        notes.append(f"LR {rel} not shown: {exc}")
        return None


def load_evaluate_config(args: argparse.Namespace) -> tuple[Config, EvaluateConfig]:
    """The config tree and its evaluate section, with --reference / --lr applied."""
    cfg = config_from_args(args)
    ecfg = cfg.evaluate
    if args.reference:
        ecfg.reference = args.reference
    if args.lr:
        ecfg.lr = args.lr
    return cfg, ecfg


def main(argv: Sequence[str] | None = None) -> int:
    sections = ["data", "evaluate"]
    parser = build_parser(
        "python -m pipeline.evaluate",
        "SR outputs (--input) vs HR references (--reference) -> OUTPUT/metrics.json and OUTPUT/index.html.",
        sections,
    )
    parser.add_argument("--reference", default=None, help="HR reference URI, paired with --input by relative path")
    parser.add_argument("--lr", default=None, help="LR input URI (optional): adds the LR panel to the report crops")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg, ecfg = load_evaluate_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    cfg.input = cfg.input or DEFAULT_INPUT
    cfg.output = cfg.output or DEFAULT_OUTPUT
    try:
        result = run_evaluate(cfg, ecfg)
    except user_errors() as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    where = cfg.storage.open(cfg.output).url("")
    mean = result["mean"]
    print(f"evaluated {result['count']} images ({len(result['rejected'])} rejected: {result['rejected_by_reason']})")
    if result["count"]:
        print("mean " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in mean.items()))
    print(f"report: {where}/index.html  metrics: {where}/metrics.json")
    if not result["count"]:
        print_rejects("metrics", result["rejected"], result["rejected_by_reason"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
