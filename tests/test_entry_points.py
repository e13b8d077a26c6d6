"""How prepare, upscale and evaluate end for a user: exit status, one-line errors, every file accounted for.

Nothing produced (every input rejected) is exit status 1 with the rejects printed; a bad ``--model``
folder, an unknown URI scheme and a storage error are one ``error: ...`` line each, before any Ray
actor starts; files that are not images are counted by extension in ``summary.json``; a slow image
outlives Ray Data's no-progress timeout; an out-of-memory error raised in an actor reaches the driver
as itself, so ``pipeline.upscale`` can fail the job with its message.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate import main as evaluate_main
from pipeline.prepare import main as prepare_main
from pipeline.upscale import main as upscale_main
from stages.diffuse import DiffuseOutOfMemory
from stages.runtime import find_cause
from tests.conftest import skimage_photo

FAST = ["upscale.steps=2", "upscale.tile_size=16", "upscale.tile_overlap=4", "upscale.tile_batch=16",
        "upscale.scale=2", "upscale.guidance_scale=1", "upscale.stages=[]"]
SHARD_ONLY = ["prepare.phases=[shard]", "data.shard_size=4", "prepare.progress=false", "data.hr_size=64"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err


def _photo(folder: Path, rel: str = "a.png", h: int = 40, w: int = 56) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage_photo("coffee.png")[:h, :w]).save(folder / rel)


def _rejected_only(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"shopping list, not a picture\n" * 20)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "readme.txt").write_text("not an image either, and not an input\n")
    return {"empty.png": "empty file", "notes.jpg": "not an image", "tiny.png": "too small"}


def test_a_model_folder_that_is_no_export_is_one_line(tmp_path, capsys):
    _photo(tmp_path / "in")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "unet.safetensors").write_bytes(b"weights, but no pipeline")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "model")]
    assert upscale_main(argv) == 1
    # neither layout: no model_index.json (full export) nor spasem_export.json + controlnet/ (default export)
    err = capsys.readouterr().err
    _one_error_line(err, "model_index.json", str(tmp_path / "model"))
    assert "spasem_export.json" in err
    assert not (tmp_path / "out" / "a.png").exists()


@pytest.mark.parametrize("main", [prepare_main, upscale_main], ids=["prepare", "upscale"])
def test_an_unknown_uri_scheme_is_one_line(main, tmp_path, capsys):
    assert main(["--input", "gs://bucket/photos", "--output", str(tmp_path / "out")]) == 1
    _one_error_line(capsys.readouterr().err, "unsupported URI scheme", "gs://bucket/photos")


@pytest.mark.parametrize("main", [prepare_main, upscale_main], ids=["prepare", "upscale"])
def test_a_storage_error_is_one_line(main, s3_server, tmp_path, capsys):
    assert main(["--input", "s3://no-such-bucket-here/photos", "--output", str(tmp_path / "out")]) == 1
    _one_error_line(capsys.readouterr().err, "NoSuchBucket")


def test_evaluate_with_nothing_to_measure_prints_the_rejects(tmp_path, capsys):
    _photo(tmp_path / "sr", "a.png")
    _photo(tmp_path / "hr", "b.png")
    argv = ["--input", str(tmp_path / "sr"), "--reference", str(tmp_path / "hr"), "--output", str(tmp_path / "out")]
    assert evaluate_main(argv) == 1
    err = capsys.readouterr().err
    assert "every input was rejected" in err and "a.png: no reference image" in err and "b.png" in err


@pytest.mark.slow
def test_every_input_rejected_exits_non_zero_with_the_rejects(tmp_path, ray_cluster, capsys):
    bad = _rejected_only(tmp_path / "in")
    out = tmp_path / "upscaled"
    assert upscale_main(["--input", str(tmp_path / "in"), "--output", str(out), *_sets(FAST)]) == 1
    err = capsys.readouterr().err
    assert "every input was rejected" in err and all(f"{rel}: {reason}" in err for rel, reason in bad.items()), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upscaled"] == 0 and summary["skipped_by_extension"] == {".txt": 1}

    out = tmp_path / "prepared"
    assert prepare_main(["--input", str(tmp_path / "in"), "--output", str(out), *_sets(SHARD_ONLY)]) == 1
    err = capsys.readouterr().err
    assert "every input was rejected" in err and all(f"{rel}: {reason}" in err for rel, reason in bad.items()), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 0 and summary["rejected_by_reason"] == {r: 1 for r in bad.values()}
    assert summary["files"] == len(bad) and summary["skipped_by_extension"] == {".txt": 1}


@pytest.mark.slow
def test_a_slow_image_outlives_the_no_progress_timeout_and_every_file_counts(tmp_path, ray_cluster, monkeypatch):
    import ray

    # far below one image's time here (and below an actor's model load): the old pipeline died on it
    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 1.0)
    inp, out = tmp_path / "in", tmp_path / "out"
    _photo(inp, "slow.png", 48, 64)
    frames = [Image.fromarray(skimage_photo("chelsea.png")[:24, :32]), Image.new("RGB", (32, 24), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    (inp / "anim.gif").write_bytes(buf.getvalue())
    (inp / "notes.txt").write_text("not an image")
    (inp / "LICENSE").write_text("no extension")
    assert upscale_main(["--input", str(inp), "--output", str(out), *_sets(FAST)]) == 0
    with Image.open(out / "slow.png") as im:
        assert im.size == (128, 96)
    with Image.open(out / "anim.gif") as im:
        assert im.size == (64, 48) and getattr(im, "n_frames", 1) == 1, "the first frame, upscaled"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upscaled"] == 2 and summary["rejected"] == 0
    assert summary["skipped_by_extension"] == {".txt": 1, "(none)": 1}


@pytest.mark.slow
def test_out_of_memory_raised_in_an_actor_reaches_the_driver_as_itself(ray_cluster):
    import ray

    class OutOfMemory:
        def __call__(self, batch):
            raise DiffuseOutOfMemory("out of memory upscaling a.png even at upscale.tile_batch=1")

    ds = ray.data.from_items([{"x": 1}]).map_batches(OutOfMemory, compute=ray.data.ActorPoolStrategy(size=1),
                                                     num_cpus=0.25)
    with pytest.raises(Exception) as info:
        ds.take_all()
    cause = find_cause(info.value, DiffuseOutOfMemory)
    assert cause is not None and "a.png" in str(cause)
