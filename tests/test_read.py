"""The read stage: every colour mode to RGB, EXIF orientation, and a distinct reason per bad file."""

from __future__ import annotations

import numpy as np
import pytest

from spasem.storage import LocalStore
from stages.read import ReadImages, decode_image
from tests.conftest import skimage_photo, write_bad_files, write_good_photos


@pytest.fixture
def mixed_dir(tmp_path):
    folder = tmp_path / "in"
    good = write_good_photos(folder)
    bad = write_bad_files(folder)
    return folder, good, bad


def test_good_and_bad_files_in_one_batch(mixed_dir):
    folder, good, bad = mixed_dir
    stage = ReadImages(LocalStore(folder), max_pixels=50_000_000, min_size=128, max_bytes=10_000_000)
    paths = sorted(good + list(bad))
    out = stage({"path": np.asarray(paths, dtype=object)})
    by_path = dict(zip(out["source"], zip(out["status"], out["error"], out["image"], strict=True), strict=True))
    for rel in good:
        status, error, image = by_path[rel]
        assert status == "ok", (rel, error)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    for rel, reason in bad.items():
        status, error, _ = by_path[rel]
        assert status == "error" and error.startswith(reason), (rel, error)
    assert len({by_path[r][1].split(":")[0] for r in bad}) == len(bad), "each bad kind has its own reason"


def test_exif_orientation_applied(mixed_dir):
    folder, _, _ = mixed_dir
    stage = ReadImages(LocalStore(folder), 50_000_000, 128, 10_000_000)
    image = stage.read_one("nested/coffee_rotated.jpg")
    h, w = skimage_photo("coffee.png").shape[:2]
    assert image.shape[:2] == (w, h), "orientation 6 turns the landscape photo upright"


def test_modes_convert_faithfully(mixed_dir):
    folder, _, _ = mixed_dir
    stage = ReadImages(LocalStore(folder), 50_000_000, 128, 10_000_000)
    camera = skimage_photo("camera.png")
    gray = stage.read_one("nested/camera_gray.png")
    np.testing.assert_array_equal(gray[..., 0], camera)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    wide = stage.read_one("camera_16bit.png")
    assert np.abs(wide[..., 0].astype(int) - camera).max() <= 1, "16-bit scaled to 8 bits, not clipped"
    logo = stage.read_one("logo_rgba.png")
    assert logo.shape[2] == 3 and (logo == 255).all(axis=2).any(), "transparent pixels composited on white"
    anim = stage.read_one("astronaut_animated.webp")
    np.testing.assert_array_equal(anim, skimage_photo("astronaut.png")), "frame one of the animation"


def test_file_size_limit(tmp_path):
    write_good_photos(tmp_path)
    stage = ReadImages(LocalStore(tmp_path), 50_000_000, 16, max_bytes=1000)
    out = stage({"path": np.asarray(["astronaut.jpg"], dtype=object)})
    assert out["status"][0] == "error" and out["error"][0].startswith("file too large")


def test_bomb_rejected_before_decoding():
    from tests.conftest import _png_header_only

    with pytest.raises(Exception) as exc:
        decode_image(_png_header_only(100_000, 100_000), max_pixels=1_000_000, min_size=1)
    assert getattr(exc.value, "reason", "") == "too many pixels"


def test_an_animated_gif_decodes_to_its_first_frame():
    import io

    from PIL import Image

    first, second = np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30, 3), np.uint8)
    first[..., 0], second[..., 2] = 200, 200
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, format="GIF", save_all=True, append_images=[Image.fromarray(second)],
                                duration=50, loop=0)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.n_frames == 2
    image = decode_image(buf.getvalue(), 10**8, 8)
    assert image.shape == (20, 30, 3) and tuple(image[5, 5]) == (200, 0, 0)


def test_every_file_is_an_input_or_counted_by_extension(tmp_path):
    from spasem.config import load_config
    from stages.read import list_images

    for rel in ("a.png", "b.GIF", "sub/c.jpeg", "notes.txt", "sub/more.TXT", "LICENSE", "out/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    images, others = list_images(LocalStore(tmp_path), load_config().data.suffixes, exclude="out/")
    assert images == ["a.png", "b.GIF", "sub/c.jpeg"], "GIF is a default extension, matched in any case"
    assert others == {".txt": 2, "(none)": 1}, "the excluded output folder is neither"
