"""pipeline.upscale end to end on a real local Ray cluster with the untrained tiny-profile pipeline.

One run over a folder of odd-sized photos in several formats (one large enough for dozens of tiles)
plus one bad file of each kind; then re-runs (skip-existing, resume), S3 in and out through moto, and
the realism knob and seams on the real model in-process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.upscale import main
from pipeline.upscale_model import resolve_model
from spasem.config import load_config
from spasem.metrics import full_reference_metrics
from spasem.model.sr_pipeline import REFERENCE, write_reference
from spasem.model.tiled_vae import bicubic_upsample
from tests.conftest import _png_header_only, skimage_photo

FAST = ["upscale.steps=2", "upscale.tile_size=16", "upscale.tile_overlap=4", "upscale.tile_batch=16"]
# relative path -> (crop of a sample photo: rows, cols); odd sizes on purpose
GOOD = {
    "astronaut.jpg": ("astronaut.png", 45, 67),
    "nested/coffee.png": ("coffee.png", 61, 90),
    "nested/deeper/chelsea.webp": ("chelsea.png", 33, 51),
    "large.png": ("coffee.png", 333, 517),
}
FORMATS = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
BAD = {
    "empty.png": "empty file",
    "notes.jpg": "not an image",
    "truncated.jpg": "truncated or corrupt data",
    "tiny.png": "too small",
    "bomb.png": "too many pixels",
    "dangling.png": "unreadable path",
}


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_inputs(folder: Path) -> None:
    for rel, (name, h, w) in GOOD.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(skimage_photo(name)[:h, :w], FORMATS[path.suffix]))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"not a picture\n" * 30)
    (folder / "truncated.jpg").write_bytes(_encode(skimage_photo("chelsea.png"), "JPEG")[:2000])
    (folder / "tiny.png").write_bytes(_encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    (folder / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    os.symlink(folder / "gone.png", folder / "dangling.png")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("upscale")
    write_inputs(root / "in")
    # no guidance here (half the model calls); the S3 run and the in-process tests exercise it
    argv = ["--input", str(root / "in"), "--output", str(root / "out"), "--set", "upscale.scale=2",
            "--set", "upscale.guidance_scale=1"]
    for item in FAST:
        argv += ["--set", item]
    assert main(argv) == 0
    return root, argv


def test_outputs_keep_path_format_and_exact_size(first_run):
    root, _ = first_run
    for rel, (_, h, w) in GOOD.items():
        with Image.open(root / "out" / rel) as im:
            assert im.format == FORMATS[Path(rel).suffix], rel
            assert im.size == (2 * w, 2 * h), rel
            assert im.mode == "RGB"
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["upscaled"] == len(GOOD) and summary["skipped"] == 0 and summary["files"] == len(GOOD) + len(BAD)
    assert summary["stages"][-1] == "diffuse" and "captions" in summary["stages"], "the annotation stages are reused"
    expected_mp = sum(4 * h * w for _, h, w in GOOD.values()) / 1e6
    assert summary["output_megapixels"] == pytest.approx(expected_mp, abs=1e-3)
    assert summary["megapixels_per_s"] > 0
    assert (root / "out" / "config.yaml").read_text().count("realism") == 1


def test_bad_inputs_are_rejects_with_reasons(first_run):
    root, _ = first_run
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert {r["source"]: r["reason"] for r in summary["rejects"]} == BAD
    assert summary["rejected"] == len(BAD)
    assert not any((root / "out" / rel).exists() for rel in BAD)


def test_rerun_skips_existing_and_finishes_the_rest(first_run):
    root, argv = first_run
    out = root / "out"
    stamps = {rel: (out / rel).stat().st_mtime_ns for rel in GOOD}
    (out / "nested/coffee.png").unlink()  # as if the job died before writing it
    assert main(argv + ["--set", "upscale.stages=[]"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upscaled"] == 1 and summary["skipped"] == len(GOOD) - 1
    for rel, stamp in stamps.items():
        if rel != "nested/coffee.png":
            assert (out / rel).stat().st_mtime_ns == stamp, f"{rel} was rewritten"
    with Image.open(out / "nested/coffee.png") as im:
        assert im.size == (180, 122)


def test_s3_input_output_and_model(bucket, s3_server, tmp_path, ray_cluster):
    photo = skimage_photo("coffee.png")
    s3_server.put_object(Bucket=bucket, Key="in/a.png", Body=_encode(photo[:40, :56], "PNG"))
    s3_server.put_object(Bucket=bucket, Key="in/sub/b.jpg", Body=_encode(photo[100:137, 200:249], "JPEG"))
    s3_server.put_object(Bucket=bucket, Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\n broken")
    # the model too comes from S3 in a training run's default layout: controlnet/ + the base-model reference
    cfg = load_config()
    export = tmp_path / "export"
    shutil.copytree(Path(resolve_model(cfg)) / "controlnet", export / "controlnet")
    write_reference(export, cfg.models, cfg.model)
    (export / "export.json").write_text(json.dumps({"step": time.time_ns()}))  # a new export at the same URI
    for path in (p for p in export.rglob("*") if p.is_file()):
        s3_server.put_object(Bucket=bucket, Key=f"export/{path.relative_to(export)}", Body=path.read_bytes())
    argv = ["--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--model", f"s3://{bucket}/export",
            "--set", "upscale.stages=[]"]
    for item in FAST:
        argv += ["--set", item]
    assert main(argv) == 0
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/a.png", "out/sub/b.jpg", "out/summary.json", "out/config.yaml"} <= keys
    body = s3_server.get_object(Bucket=bucket, Key="out/sub/b.jpg")["Body"].read()
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "JPEG" and im.size == (49 * 4, 37 * 4)
    summary = json.loads(s3_server.get_object(Bucket=bucket, Key="out/summary.json")["Body"].read())
    assert summary["upscaled"] == 2 and summary["rejected_by_reason"] == {"not an image": 1}
    # the driver passed the URI on; the diffusion actor fetched the export into its node's cache itself
    assert summary["model"] == f"s3://{bucket}/export"
    stamp = (export / "export.json").read_bytes()
    digest = hashlib.sha256(f"s3://{bucket}/export\n".encode() + stamp).hexdigest()[:16]
    fetched = Path(cfg.models.cache_dir).resolve() / "remote" / digest
    assert (fetched / ".complete").exists() and sorted(p.name for p in fetched.iterdir()) == [
        ".complete", "controlnet", "export.json", REFERENCE]


@pytest.fixture(scope="module")
def tiny_pipe():
    from spasem.model.sr_pipeline import load_sr_pipeline

    return load_sr_pipeline(resolve_model(load_config()))


def _upscaler(pipe, **kw):
    from spasem.model.tiled_diffusion import TiledUpscaler

    base = {"steps": 4, "tile_size": 16, "tile_overlap": 8, "color_fix": "none", "scale": 4}
    return TiledUpscaler(pipe, load_config().upscale.model_copy(update={**base, **kw}))


def test_psnr_to_bicubic_falls_as_realism_rises(tiny_pipe):
    lr = cv2.resize(skimage_photo("coffee.png"), (32, 32), interpolation=cv2.INTER_AREA)
    reference = bicubic_upsample(lr, 4)
    psnr = []
    for realism in (0.0, 0.5, 1.0):
        out = _upscaler(tiny_pipe, realism=realism)(lr, "a cup of coffee", "sharp", seed=7)
        psnr.append(full_reference_metrics(out, reference, 4)["psnr_rgb"])
    # margins of several dB on the untrained model (23 / 17 / 8.5 when written): a real trend, not noise
    assert psnr[0] > psnr[1] + 1 > psnr[2] + 2, psnr


def test_no_seams_with_the_real_model(tiny_pipe):
    h, w = 24, 88
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    lr = (np.stack([xx, yy, 1 - xx], axis=-1) * 200 + 20).astype(np.uint8)
    out = _upscaler(tiny_pipe, realism=0.3, color_fix="wavelet")(lr, seed=0).astype(np.float64)
    from spasem.model.tiled_diffusion import padded_latent_size
    from spasem.model.tiling import tile_starts

    jumps = np.abs(np.diff(out, axis=1)).max(axis=(0, 2))
    starts = tile_starts(padded_latent_size(h * 4, w * 4, 8)[1], 16, 8)
    borders = {b for s in starts for b in (8 * s, 8 * (s + 16)) if 4 < b < w * 4 - 5}
    inner = [j for i, j in enumerate(jumps) if all(abs(i + 1 - b) > 4 for b in borders) and 4 < i < w * 4 - 5]
    assert max(jumps[b - 1] for b in borders) <= max(inner)


def test_whole_image_tokens_come_from_the_embeddings_stage(tiny_pipe, monkeypatch):
    from spasem.columns import object_array
    from spasem.profiles import ensure_tiny
    from stages.embeddings import Embedder

    cfg = load_config()
    lr = cv2.resize(skimage_photo("chelsea.png"), (48, 32), interpolation=cv2.INTER_AREA)
    row = Embedder(cfg.annotate.embeddings, cfg.models, ensure_tiny(cfg.models.cache_dir, ("clip_vision", "dinov2")))(
        {"key": object_array(["k"]), "lr": lr[None], "status": object_array(["ok"]), "error": object_array([""])})
    seen = []
    real = tiny_pipe.predict_noise

    def spy(latents, t, control, cond, *args, **kwargs):
        seen.append(cond.clip_tokens.float().clone())
        return real(latents, t, control, cond, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "predict_noise", spy)
    _upscaler(tiny_pipe, visual_tokens="image", steps=2, realism=1.0)(
        lr, seed=0, image_tokens=(row["clip_lr"][0], row["dino_lr"][0]))
    expected = torch.as_tensor(row["clip_lr"][0]).float()
    assert seen and all(torch.allclose(tokens, expected.expand_as(tokens), atol=1e-3) for tokens in seen)
    seen.clear()
    _upscaler(tiny_pipe, visual_tokens="tile", steps=2, realism=1.0)(lr, seed=0)
    tiles = seen[0]
    assert len(tiles) > 1 and not torch.allclose(tiles[0], tiles[-1]), "each tile sees its own crop"


def test_output_equal_to_input_and_grounding_without_captions_are_refused(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_photo("coffee.png")[:40, :60]).save(photos / "a.png")
    before = sorted(p.name for p in photos.iterdir())
    # in place, the outputs would replace the originals: refused before anything is written
    assert main(["--input", str(photos), "--output", str(photos)]) == 1
    assert "replace the originals" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == before
    out = tmp_path / "out"
    assert main(["--input", str(photos), "--output", str(out), "--set", "upscale.stages=[grounding]"]) == 1
    assert "needs the objects named by the captions stage" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def diffuser():
    from stages.diffuse import Diffuser

    cfg = load_config()
    fast = {"steps": 2, "tile_size": 16, "tile_overlap": 4, "tile_batch": 8, "scale": 2, "guidance_scale": 1.0}
    return Diffuser(cfg.upscale.model_copy(update=fast), cfg.models, resolve_model(cfg))


def _diffuse_row(lr: np.ndarray, source: str) -> dict:
    from spasem.columns import object_array

    return {"lr": object_array([lr]), "source": object_array([source]), "status": object_array(["ok"]),
            "error": object_array([""])}


def _failing_upscaler(monkeypatch, fail):
    """TiledUpscaler.__call__ that records its tile_batch and raises ``fail(call number)`` when not None."""
    from spasem.model import tiled_diffusion

    real, seen = tiled_diffusion.TiledUpscaler.__call__, []

    def call(self, *args, **kwargs):
        seen.append(self.cfg.tile_batch)
        exc = fail(len(seen))
        if exc is not None:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tiled_diffusion.TiledUpscaler, "__call__", call)
    return seen


def test_out_of_memory_retries_the_image_with_a_smaller_tile_batch(diffuser, monkeypatch):
    lr = skimage_photo("coffee.png")[:24, :32]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    seen = _failing_upscaler(monkeypatch, lambda n: oom if n == 1 else None)
    out = diffuser(_diffuse_row(lr, "a.png"))
    assert list(out["status"]) == ["ok"] and out["sr"][0].shape == (48, 64, 3)
    assert seen == [8, 4], "the retry halves upscale.tile_batch"


def test_out_of_memory_at_one_tile_fails_the_job_other_errors_are_rejects(diffuser, monkeypatch):
    from stages.diffuse import DiffuseOutOfMemory

    lr = skimage_photo("coffee.png")[:24, :32]
    seen = _failing_upscaler(monkeypatch, lambda n: RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(DiffuseOutOfMemory, match=r"a\.png .*tile_batch=1"):
        diffuser(_diffuse_row(lr, "a.png"))
    assert seen == [8, 4, 2, 1]
    seen = _failing_upscaler(monkeypatch, lambda n: ValueError("a broken caption"))
    out = diffuser(_diffuse_row(lr, "b.png"))
    assert list(out["status"]) == ["error"] and out["error"][0].startswith("diffuse: ValueError: a broken caption")
    assert seen == [8], "only memory errors are retried"


def test_each_image_logs_its_tiles_steps_and_time_left(diffuser, caplog):
    from stages.progress import image_work

    caplog.set_level("INFO", logger="stages.diffuse")
    lr = skimage_photo("coffee.png")[:64, :96]  # two diffusion tiles, two VAE tiles
    diffuser(_diffuse_row(lr, "p.png"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("diffuse p.png")]
    work = image_work(lr, diffuser.cfg, 8)
    assert work["sample"] >= work["encode"] == 2, work
    assert "started" in lines[0] and "done in" in lines[-1]
    for phase, label in (("encode", "vae encode tiles"), ("sample", "tile-steps"), ("decode", "vae decode tiles")):
        assert f"{label} {work[phase]}/{work[phase]}" in lines[-1], lines[-1]
    assert any(line.endswith(" left") and "?" not in line for line in lines[1:-1]), lines


def test_the_xpsr_preset_logs_its_one_vae_call_each_way(caplog):
    """The preset draws the start latent (``lr_latent: sample``) and hands the VAE the whole image: one
    encode and one decode, counted as such. It runs in float32 (XPSR's ``mixed_precision: "no"``) even
    where the configs load the models in bfloat16."""
    from stages.diffuse import Diffuser

    caplog.set_level("INFO", logger="stages.diffuse")
    cfg = load_config(overrides=["upscale.preset=xpsr", "upscale.steps=1", "upscale.guidance_scale=1",
                                 "models.dtype=bfloat16"])
    diffuser = Diffuser(cfg.upscale, cfg.models, resolve_model(cfg))
    assert diffuser.dtype == torch.float32 and diffuser.pipe.unet.dtype == torch.float32
    diffuser(_diffuse_row(skimage_photo("coffee.png")[:16, :24], "x.png"))
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("diffuse x.png")][-1]
    assert "vae encode tiles 1/1" in last and "vae decode tiles 1/1" in last and "tile-steps 1/1" in last, last


def test_time_left_comes_from_each_phase_pace():
    from stages.progress import DECODE_PER_ENCODE, ImageProgress

    now, lines = [0.0], []
    p = ImageProgress("a.png", "8x8 -> 32x32", {"encode": 2, "sample": 10, "decode": 2}, clock=lambda: now[0],
                      emit=lines.append)
    now[0] = 2.0
    p.advance("encode", 2, 2.0)
    assert p.left_s() is None, "no estimate before the sampler's pace is known"
    now[0] = 4.0
    p.advance("sample", 2, 2.0)
    assert p.left_s() == pytest.approx(8 * 1.0 + 2 * DECODE_PER_ENCODE * 1.0)
    now[0] = 12.0
    p.advance("sample", 8, 8.0)
    now[0] = 15.0
    p.advance("decode", 1, 3.0)
    assert p.left_s() == pytest.approx(3.0), "the decoder at its own measured pace once it ran"
    assert lines[-1].endswith("15s elapsed, ~3s left") and "83%" in lines[-1]


def test_xpsr_size_rule_runs_the_real_model_on_a_latent_of_any_width(tiny_pipe, monkeypatch):
    """test.py's sizes are multiples of 8 px, not of 64: a 33 x 47 LR runs at 512 x 728 px, a 64 x 91
    latent, through the real UNet and ControlNet, and comes back at 132 x 188."""
    from spasem.model.tiled_diffusion import TiledUpscaler

    seen = []
    real = tiny_pipe.predict_noise

    def spy(latents, t, control, *args, **kwargs):
        seen.append((tuple(latents.shape[-2:]), tuple(control.shape[-2:])))
        return real(latents, t, control, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "predict_noise", spy)
    lr = cv2.resize(skimage_photo("coffee.png"), (47, 33), interpolation=cv2.INTER_AREA)
    cfg = load_config(overrides=["upscale.preset=xpsr", "upscale.steps=2"]).upscale
    out = TiledUpscaler(tiny_pipe, cfg)(lr, "a cup of coffee", "blurry", seed=0)
    assert out.shape == (132, 188, 3) and out.dtype == np.uint8
    assert seen == [((64, 91), (512, 728))] * 2


def test_lr_latent_sample_is_diffusers_posterior_sample_with_the_real_vae(tiny_pipe):
    """One VAE tile: ``lr_latent: sample`` is ``vae.encode(x).latent_dist.sample(generator)``, scaled."""
    from spasem.model.latents import scale_latents
    from spasem.model.tiled_diffusion import TiledUpscaler
    from spasem.model.tiled_vae import BicubicSource

    lr = cv2.resize(skimage_photo("chelsea.png"), (16, 16), interpolation=cv2.INTER_AREA)
    cfg = load_config(overrides=["upscale.preset=xpsr"]).upscale
    src = BicubicSource(lr, 4, kernel="pillow", process_size=cfg.process_size)
    got = TiledUpscaler(tiny_pipe, cfg).lr_latent(src, 64, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = tiny_pipe.vae.encode(src.full().to(tiny_pipe.vae.dtype)).latent_dist
        expected = scale_latents(tiny_pipe.vae.config, dist.sample(torch.Generator().manual_seed(1)).float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, scale_latents(tiny_pipe.vae.config, dist.mean.float()))


def test_vae_rule_xpsr_runs_the_hook_on_the_whole_image(tiny_pipe, monkeypatch):
    """``vae_rule: xpsr`` (the preset): the VAE sees the whole 512 x 728 image and latent, tiled inside by
    XPSR's hook once they exceed its tiles (small tiles here, to make it tile)."""
    from spasem.model import vae_hook
    from spasem.model.tiled_diffusion import TiledUpscaler
    from stages.progress import image_work

    runs = []
    real = vae_hook.run_tiles
    monkeypatch.setattr(vae_hook, "run_tiles", lambda net, x, boxes, *a: (runs.append((tuple(x.shape[2:]), len(boxes))),
                                                                         real(net, x, boxes, *a))[1])
    lr = cv2.resize(skimage_photo("coffee.png"), (47, 33), interpolation=cv2.INTER_AREA)
    cfg = load_config(overrides=["upscale.preset=xpsr", "upscale.steps=1", "upscale.vae_encoder_tile=256",
                                 "upscale.vae_decoder_tile=32"]).upscale
    out = TiledUpscaler(tiny_pipe, cfg)(lr, "a cup of coffee", "blurry", seed=0)
    assert out.shape == (132, 188, 3)
    assert runs == [((512, 728), 6), ((64, 91), 6)]  # encoder: 2 x 3 tiles of 256 px; decoder: 2 x 3 of 32
    assert image_work(lr, cfg, 8)["encode"] == image_work(lr, cfg, 8)["decode"] == 1
