"""Shared fixtures: a real local Ray cluster, a real moto S3 server on 127.0.0.1, sample photos.

S3 settings go into the environment at import time, before Ray starts, so Ray's workers inherit the
endpoint and the fake credentials of the moto server.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_PORT = _free_port()
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing-secret-never-logged",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{MOTO_PORT}",
    RAY_AUTH_MODE="disabled",
    RAY_DEDUP_LOGS="0",
    DS_ACCELERATOR="cpu",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    # tiny models on 2 shared cores: one intra-op thread per process is many times faster than
    # threads fighting Ray workers for the same cores (the overfit test: 120 s -> 4 s)
    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
)


def pytest_collection_modifyitems(items):
    """A test that needs the Ray cluster, itself or through a fixture, is slow: ``pytest -m "not slow"``
    stays the quick inner loop without anyone having to remember the mark."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs on 2 cores so pools never starve)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """The tiny SD parts and image encoders, built once per session and loaded by path like real weights."""
    from spasem.profiles import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("tiny-models"), ("sd", "clip_vision", "dinov2"))


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory, tiny, ray_cluster) -> Path:
    """``python -m pipeline.prepare`` as ``make demo`` runs it: the bundled sample photos, the default
    config (every phase, the tiny profile). Built once; tests that change it work on a copy."""
    from pipeline.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("demo-prepared")
    assert prepare_main(demo_prepare_args(out, tiny)) == 0
    return out


def demo_prepare_args(out: Path, tiny: dict[str, str], *extra: str) -> list[str]:
    """The demo's command line with the session's tiny models, writing to ``out``."""
    return ["--output", str(out), "--set", f"models.cache_dir={Path(tiny['sd']).parents[1]}", *extra]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    yield boto3.client("s3")
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3_server.create_bucket(Bucket=name)
    return name


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data
    import skimage.io

    return skimage.io.imread(os.path.join(skimage.data.data_dir, name))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_good_photos(folder: Path) -> list[str]:
    """Real photos in the colour modes cameras and editors write; returns their relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    astro = Image.fromarray(skimage_photo("astronaut.png"))
    coffee = Image.fromarray(skimage_photo("coffee.png"))
    (folder / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    astro.save(folder / "astronaut.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    coffee.save(folder / "nested" / "coffee_rotated.jpg", exif=exif, quality=90)
    Image.fromarray(skimage_photo("camera.png")).save(folder / "nested" / "camera_gray.png")
    Image.fromarray(skimage_photo("logo.png")).save(folder / "logo_rgba.png")
    coffee.convert("P").save(folder / "nested" / "deeper" / "coffee_palette.bmp")
    astro.convert("CMYK").save(folder / "astronaut_cmyk.tif")
    astro.convert("LA").save(folder / "astronaut_la.png")
    gray16 = (skimage_photo("camera.png").astype(np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "camera_16bit.png")
    frames = [astro, astro.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "astronaut_animated.webp", save_all=True, append_images=frames[1:], lossless=True)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind; returns relative path -> expected reject reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(skimage_photo("chelsea.png")).save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "notes.png").write_bytes(b"these are shopping notes, not a picture\n" * 20)
    Image.fromarray(skimage_photo("microaneurysms.png")).save(folder / "small.png")
    (folder / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling.jpg")
    return {
        "empty.png": "empty file",
        "truncated.jpg": "truncated or corrupt data",
        "notes.png": "not an image",
        "small.png": "too small",
        "bomb.png": "too many pixels",
        "dangling.jpg": "unreadable path",
    }


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_good_photos(folder)
    return folder


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def failing_on_key(stage_cls: type, key: str) -> type:
    """A subclass of ``stage_cls`` whose ``process`` raises on the row with ``key``: fault injection from
    the test side, so the production stages carry no test hook. The class is built at run time, so Ray's
    cloudpickle ships it by value to the actors."""

    class FailingOnKey(stage_cls):
        def process(self, batch, rows):
            if any(str(batch["key"][i]) == key for i in rows):
                raise RuntimeError(f"injected failure for key {key}")
            return super().process(batch, rows)

    FailingOnKey.__name__ = FailingOnKey.__qualname__ = f"FailingOnKey{stage_cls.__name__}"
    return FailingOnKey
