"""pipeline.evaluate end to end: real photos with a degraded copy as the output, rejects, report, S3."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate import NO_OUTPUT, NO_REFERENCE, SIZE_MISMATCH, main, pair_images
from pipeline.evaluate_report import GAP
from spasem.metrics import full_reference_metrics
from tests.conftest import skimage_photo
from tests.test_metrics import build_tiny_clip

SCALE = 4  # data.scale of configs/tiny.yaml, hence the default crop border
CORRUPT = "truncated or corrupt data"


def _degrade(hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(LR, output): area-downscaled by SCALE, then bicubic back to the HR size (odd sizes included)."""
    h, w = hr.shape[:2]
    lr = cv2.resize(hr, (max(w // SCALE, 1), max(h // SCALE, 1)), interpolation=cv2.INTER_AREA)
    return lr, cv2.resize(lr, (w, h), interpolation=cv2.INTER_CUBIC)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_sets() -> dict[str, dict[str, bytes]]:
    """Files of the three folders (hr, lr, sr) by relative path, with one case of every reject."""
    photos = {"astronaut": skimage_photo("astronaut.png")[:256, :256],
              "nested/coffee": skimage_photo("coffee.png"),  # 400x600
              "chelsea": skimage_photo("chelsea.png")[:, :451]}  # 300x451: not divisible by the scale
    sets: dict[str, dict[str, bytes]] = {"hr": {}, "lr": {}, "sr": {}}
    for name, hr in photos.items():
        lr, sr = _degrade(hr)
        sets["hr"][f"{name}.png"] = _png(hr)
        sets["lr"][f"{name}.png"] = _png(lr)
        sets["sr"][f"{name}.jpg" if name == "nested/coffee" else f"{name}.png"] = (
            _jpeg(sr) if name == "nested/coffee" else _png(sr))
    extra = skimage_photo("rocket.jpg")[:96, :128]
    sets["hr"]["missing.png"] = _png(extra)  # no output: a reject
    sets["sr"]["orphan.png"] = _png(extra)  # no reference: a reject
    sets["hr"]["corrupt.png"] = _png(extra)
    sets["sr"]["corrupt.png"] = _png(extra)[:300]  # truncated output: a reject
    sets["hr"]["sized.png"] = _png(extra)
    sets["sr"]["sized.png"] = _png(extra[:-1])  # one row short: a reject
    return sets


EXPECTED_REJECTS = {"missing.png": NO_OUTPUT, "orphan.png": NO_REFERENCE, "corrupt.png": CORRUPT,
                    "sized.png": SIZE_MISMATCH}


def write_sets(root: Path) -> dict[str, Path]:
    for kind, files in make_sets().items():
        for rel, data in files.items():
            (root / kind / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / kind / rel).write_bytes(data)
    return {kind: root / kind for kind in ("hr", "lr", "sr")}


def _decode(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _found_in(panel: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Where ``panel`` sits exactly inside ``image`` (x, y), or None."""
    diff = cv2.matchTemplate(image.astype(np.float32), panel.astype(np.float32), cv2.TM_SQDIFF)
    x, y = cv2.minMaxLoc(diff)[2]
    h, w = panel.shape[:2]
    return (x, y) if np.array_equal(image[y:y + h, x:x + w], panel) else None


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_local_report_with_lr_crops_clip_score_and_rejects(tmp_path, tiny_clip):
    dirs = write_sets(tmp_path)
    report = tmp_path / "report"
    code = main(["--input", str(dirs["sr"]), "--reference", str(dirs["hr"]), "--lr", str(dirs["lr"]),
                 "--output", str(report), "--set", f"evaluate.clip_model={tiny_clip}", "--set", "evaluate.crop_size=64"])
    assert code == 0
    result = _strict_json((report / "metrics.json").read_text())
    assert result["crop_border"] == SCALE and result["protocol"] == "basicsr"
    assert result["count"] == 3
    assert {r["source"]: r["reason"] for r in result["rejected"]} == EXPECTED_REJECTS
    rows = {r["path"]: r for r in result["images"]}
    assert set(rows) == {"astronaut.png", "nested/coffee.jpg", "chelsea.png"}
    assert rows["nested/coffee.jpg"]["reference"] == "nested/coffee.png"  # paired across extensions
    for rel, row in rows.items():
        sr, hr = _decode(dirs["sr"] / rel), _decode(dirs["hr"] / row["reference"])
        expected = full_reference_metrics(sr, hr, SCALE)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
        assert 20 < row["psnr_y"] < 40 and 0.4 < row["ssim_y"] < 1  # a 4x bicubic round trip
        assert 0.0 <= row["clip_good_photo"] <= 1.0 and "clipiqa" not in row
        # crops: the same detail window of LR (nearest-upsampled) | output | HR, found verbatim in the images
        crop = _decode(report / row["crop"])
        size = min(64, *hr.shape[:2])
        assert crop.shape == (size, 3 * size + 2 * GAP, 3)
        panel_sr, panel_hr = crop[:, size + GAP:2 * size + GAP], crop[:, 2 * (size + GAP):]
        where = _found_in(panel_hr, hr)
        assert where is not None
        x, y = where
        assert np.array_equal(panel_sr, sr[y:y + size, x:x + size])
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "clip_good_photo"):
        assert result["mean"][key] == pytest.approx(np.mean([r[key] for r in rows.values()]))
    page = (report / "index.html").read_text()
    for text in ["nested/coffee.jpg", "crops/nested__coffee.png", NO_OUTPUT, SIZE_MISMATCH, "not pyiqa clipiqa", "LR | output | HR"]:
        assert text in page
    assert "clip_model" in (report / "config.yaml").read_text()


def test_identical_images_crop_border_and_defaults(tmp_path):
    hr = skimage_photo("astronaut.png")[:64, :96]
    for kind in ("hr", "sr"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "same.png").write_bytes(_png(hr))
    noisy = np.clip(hr + np.random.default_rng(0).normal(0, 5, hr.shape).round(), 0, 255).astype(np.uint8)
    (tmp_path / "hr" / "noisy.png").write_bytes(_png(hr))
    (tmp_path / "sr" / "noisy.png").write_bytes(_png(noisy))
    args = ["--input", str(tmp_path / "sr"), "--reference", str(tmp_path / "hr")]
    assert main(args + ["--output", str(tmp_path / "a"), "--set", "evaluate.crop_border=0"]) == 0
    result = _strict_json((tmp_path / "a" / "metrics.json").read_text())
    same = next(r for r in result["images"] if r["path"] == "same.png")
    assert same["psnr_y"] == "inf" and same["psnr_rgb"] == "inf"  # strict JSON has no Infinity
    assert same["ssim_y"] == pytest.approx(1.0) and same["ssim_rgb"] == pytest.approx(1.0)
    assert result["crop_border"] == 0 and result["mean"]["psnr_y"] == "inf"
    assert "clip_good_photo skipped: no evaluate.clip_model given" in result["notes"]
    crop = _decode(tmp_path / "a" / same["crop"])
    assert crop.shape == (64, 2 * 64 + GAP, 3)  # no LR given: output | HR
    # the border defaults to data.scale
    assert main(args + ["--output", str(tmp_path / "b"), "--set", "data.scale=2"]) == 0
    other = _strict_json((tmp_path / "b" / "metrics.json").read_text())
    assert other["crop_border"] == 2
    noisy_a = next(r for r in result["images"] if r["path"] == "noisy.png")
    noisy_b = next(r for r in other["images"] if r["path"] == "noisy.png")
    assert noisy_b["psnr_y"] == pytest.approx(full_reference_metrics(noisy, hr, 2)["psnr_y"])
    assert noisy_a["psnr_y"] != noisy_b["psnr_y"]
    # pyiqa's protocol (XPSR's tables): no crop by default, pyiqa's formulas, recorded in metrics.json
    assert main(args + ["--output", str(tmp_path / "c"), "--set", "evaluate.protocol=pyiqa"]) == 0
    third = _strict_json((tmp_path / "c" / "metrics.json").read_text())
    assert third["protocol"] == "pyiqa" and third["crop_border"] == 0 and "test.py" in third["protocol_detail"]
    noisy_c = next(r for r in third["images"] if r["path"] == "noisy.png")
    assert noisy_c["ssim_y"] == pytest.approx(full_reference_metrics(noisy, hr, 0, "pyiqa")["ssim_y"])
    assert next(r for r in third["images"] if r["path"] == "same.png")["psnr_y"] == pytest.approx(80.0)
    assert "pyiqa protocol" in (tmp_path / "c" / "index.html").read_text()


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path), "--reference", str(tmp_path), "--set", "evaluate.crop_boarder=2"])
    assert exc.value.code == 2
    assert "evaluate.crop_border" in capsys.readouterr().err
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "a.png").write_bytes(_png(skimage_photo("astronaut.png")[:32, :32]))
    assert main(["--input", str(tmp_path / "sr"), "--output", str(tmp_path / "out")]) == 1
    assert "--reference" in capsys.readouterr().err


def test_pairing_by_relative_path():
    pairs, rejects = pair_images(
        ["a/x.png", "a/y.jpg", "z.webp", "lone.png", "b.png"],
        ["a/x.png", "a/x.jpg", "a/y.png", "z.png", "z.jpg", "b.png", "extra.png"],
    )
    assert pairs == [("a/x.png", "a/x.png"), ("a/y.jpg", "a/y.png"), ("b.png", "b.png")]
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert reasons == {"z.webp": "ambiguous reference", "lone.png": NO_REFERENCE,
                       "a/x.jpg": NO_OUTPUT, "extra.png": NO_OUTPUT}


def test_s3_in_and_out(s3_server, bucket):
    sets = make_sets()
    for kind in ("hr", "sr"):
        for rel, data in sets[kind].items():
            s3_server.put_object(Bucket=bucket, Key=f"{kind}/{rel}", Body=data)
    code = main(["--input", f"s3://{bucket}/sr", "--reference", f"s3://{bucket}/hr",
                 "--output", f"s3://{bucket}/report", "--set", "evaluate.crop_size=48"])
    assert code == 0
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="report/")["Contents"]}
    assert {"report/metrics.json", "report/index.html", "report/config.yaml",
            "report/crops/astronaut.png", "report/crops/nested__coffee.png", "report/crops/chelsea.png"} <= keys
    result = _strict_json(s3_server.get_object(Bucket=bucket, Key="report/metrics.json")["Body"].read())
    assert result["count"] == 3 and result["reference"] == f"s3://{bucket}/hr"
    assert {r["source"]: r["reason"] for r in result["rejected"]} == EXPECTED_REJECTS
    hr = np.asarray(Image.open(io.BytesIO(sets["hr"]["chelsea.png"])))
    sr = np.asarray(Image.open(io.BytesIO(sets["sr"]["chelsea.png"])))
    chelsea = next(r for r in result["images"] if r["path"] == "chelsea.png")
    assert chelsea["psnr_y"] == pytest.approx(full_reference_metrics(sr, hr, SCALE)["psnr_y"])
    assert not math.isnan(result["mean"]["ssim_y"])
