"""The shards' PNG writer and its fast reader: exact pixels, ordinary files, and every other PNG still read."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from spasem import png
from spasem.png import decode_png, encode_png
from tests.conftest import skimage_photo


def _pil_png(image: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", **save)
    return buf.getvalue()


def _no_general_decoder(monkeypatch):
    """Make OpenCV and Pillow fail, so only the fast path can decode."""
    monkeypatch.setattr(png.cv2, "imdecode", lambda *a: pytest.fail("fell back to OpenCV"))
    monkeypatch.setattr(png.Image, "open", lambda *a: pytest.fail("fell back to Pillow"))


@pytest.mark.parametrize("shape", [(512, 512, 3), (1, 1, 3), (7, 300, 3), (300, 7, 3)])
def test_round_trip_is_exact_and_takes_the_fast_path(shape, monkeypatch):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, np.uint8)
    data = encode_png(image)
    _no_general_decoder(monkeypatch)
    out = decode_png(data)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, image)


def test_the_files_are_ordinary_pngs_that_pillow_and_opencv_read_to_the_same_pixels():
    photo = np.ascontiguousarray(skimage_photo("astronaut.png")[:200, :256])
    data = encode_png(photo)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), photo)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], photo)
    grey = photo[..., 1].copy()
    with Image.open(io.BytesIO(encode_png(grey))) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), grey)
    np.testing.assert_array_equal(decode_png(encode_png(grey)), np.repeat(grey[..., None], 3, axis=2))


def test_same_pixels_same_bytes_and_about_pillows_size():
    photo = np.ascontiguousarray(skimage_photo("coffee.png")[:256, :384])
    assert encode_png(photo) == encode_png(photo.copy())
    # the Up filter at level 1 against Pillow's adaptive filters at the same level: within a few percent
    assert len(encode_png(photo)) <= 1.05 * len(_pil_png(photo, compress_level=1))


@pytest.mark.parametrize("save", [{"compress_level": 1}, {"compress_level": 9}, {"optimize": True}])
def test_pngs_written_by_pillow_still_decode(save):
    """Old shards (Pillow's adaptive filters: Sub, Average, Paeth) go through the general decoders."""
    photo = np.ascontiguousarray(skimage_photo("chelsea.png")[:120, :160])
    np.testing.assert_array_equal(decode_png(_pil_png(photo, **save)), photo)


def _png_with_rows(image: np.ndarray, filters: list[int], tail: bytes = b"") -> bytes:
    """An RGB PNG whose rows carry the given filter bytes (0 None, 1 Sub, 2 Up), written by hand."""
    rows = []
    for y, kind in enumerate(filters):
        row = image[y].reshape(-1).astype(np.int16)
        prior = {0: 0, 1: np.concatenate([np.zeros(3, np.int16), row[:-3]]),
                 2: image[y - 1].reshape(-1).astype(np.int16) if y else 0}[kind]
        rows.append(bytes([kind]) + ((row - prior) % 256).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", image.shape[1], image.shape[0], 8, 2, 0, 0, 0)
    return b"".join((png.SIGNATURE, png._chunk(b"IHDR", header),
                     png._chunk(b"IDAT", zlib.compress(b"".join(rows) + tail)), png._chunk(b"IEND", b"")))


def test_unfiltered_and_mixed_filter_rows_decode_exactly(monkeypatch):
    image = np.random.default_rng(3).integers(0, 256, (6, 5, 3), np.uint8)
    np.testing.assert_array_equal(decode_png(_png_with_rows(image, [0, 2, 1, 2, 0, 1])), image)  # libpng
    with monkeypatch.context() as patch:  # no filter, or only None and Up: the fast path, writable pixels
        _no_general_decoder(patch)
        for shape, filters in (((6, 5, 3), [0] * 6), ((6, 5, 3), [0, 2, 2, 0, 2, 0]), ((1, 5, 3), [0]),
                               ((1, 5, 3), [2]), ((4, 1, 3), [0] * 4)):
            part = np.ascontiguousarray(image[: shape[0], : shape[1]])
            pixels = decode_png(_png_with_rows(part, filters))
            np.testing.assert_array_equal(pixels, part)
            assert pixels.flags.writeable and pixels.flags.c_contiguous, (shape, filters)
            pixels[0, 0] = 0  # callers may write into what they decode


def test_empty_images_are_refused_not_written():
    for shape in ((0, 5, 3), (5, 0, 3), (0, 0), (0, 7)):
        with pytest.raises(ValueError, match="empty image"):
            encode_png(np.zeros(shape, np.uint8))


def test_several_idat_chunks_take_the_fast_path(monkeypatch):
    image = np.random.default_rng(5).integers(0, 256, (20, 9, 3), np.uint8)
    data = encode_png(image)
    idat = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[idat : idat + 4])
    stream = data[idat + 8 : idat + 8 + length]
    split = b"".join(png._chunk(b"IDAT", stream[i : i + 50]) for i in range(0, len(stream), 50))
    _no_general_decoder(monkeypatch)
    np.testing.assert_array_equal(decode_png(data[:idat] + split + data[idat + 12 + length :]), image)


def test_broken_files_raise_instead_of_returning_wrong_pixels():
    image = np.random.default_rng(4).integers(0, 256, (16, 16, 3), np.uint8)
    data = encode_png(image)
    with pytest.raises(OSError):
        decode_png(data[: len(data) // 2])  # truncated inside the IDAT
    flipped = bytearray(data)
    flipped[60] ^= 0xFF  # a byte of the compressed stream: adler32 or the stream itself breaks
    with pytest.raises(OSError):
        decode_png(bytes(flipped))
    # more pixel data than the header's size: the fast path does not guess, the general decoders decide
    overlong = _png_with_rows(image, [2] * 16, tail=b"\x02" + b"\x00" * 48)
    assert png._fast_decode(overlong) is None
    lying = bytearray(data)
    lying[16:20] = struct.pack(">I", 1 << 20)  # a width the data does not hold, header CRC left stale
    assert png._fast_decode(bytes(lying)) is None
    with pytest.raises(OSError):
        decode_png(bytes(lying))
