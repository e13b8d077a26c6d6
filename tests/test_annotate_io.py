"""The annotate phase around its models: each PNG decoded once per phase, OpenCV's pixels equal PIL's, and
the tars written byte for byte as ``tarfile`` writes them (the golden shards pin the same bytes end to end)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import annotate_phase
from spasem import shards
from spasem.shards import PAIRS_DIR, ShardWriter, build_tar, decode_png, encode_pair, load_marker, read_tar
from spasem.storage import LocalStore
from tests.conftest import skimage_photo


def _png(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def _kinds() -> dict[str, bytes]:
    photo = Image.fromarray(skimage_photo("astronaut.png")[:96, :80])
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    with_alpha = photo.convert("RGBA")
    with_alpha.putalpha(Image.linear_gradient("L").resize(photo.size))
    return {
        "rgb (as shards write it)": shards.encode_png(np.asarray(photo)),
        "rgb, zlib level 9": _png(photo, compress_level=9),
        "rgba": _png(with_alpha),
        "grey": _png(photo.convert("L")),
        "grey + alpha": _png(with_alpha.convert("LA")),
        "palette": _png(palette),
        "palette + transparency": _png(palette, transparency=0),
        "16-bit grey": _png(Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_png_decoder_gives_pils_rgb_pixels_for_every_kind(kind):
    data = _kinds()[kind]
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(im.convert("RGB"))
    out = decode_png(data)
    assert out.dtype == np.uint8 and out.shape == expected.shape and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)


def test_a_corrupt_png_is_pils_error_not_a_crash():
    data = shards.encode_png(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(OSError):
        decode_png(data[: len(data) // 2])
    with pytest.raises(OSError):
        decode_png(b"not an image at all")


def test_each_image_is_decoded_once_per_phase(tmp_path, monkeypatch):
    """load_pairs decodes HR and LR once per row; the writer re-reads the pairs tar without decoding pixels."""
    rng = np.random.default_rng(0)
    pairs = LocalStore(tmp_path / PAIRS_DIR)
    writer = ShardWriter(pairs, 0)
    images = {}
    for k in range(3):
        hr, lr = rng.integers(0, 256, (64, 48, 3), np.uint8), rng.integers(0, 256, (16, 12, 3), np.uint8)
        images[f"k{k}"] = (hr, lr)
        writer.write(encode_pair(f"k{k}", hr, lr, {"source": f"p{k}.png"}))
    writer.close({"shard": "test"})
    calls = []
    monkeypatch.setattr(shards, "decode_png", lambda data: calls.append(len(data)) or decode_png(data))
    batch = annotate_phase.load_pairs({"shard": np.asarray([0])}, pairs)
    assert len(calls) == 2 * 3
    for i, key in enumerate(batch["key"]):
        np.testing.assert_array_equal(batch["hr"][i], images[key][0])
        np.testing.assert_array_equal(batch["lr"][i], images[key][1])
    rows = [{k: v[i] for k, v in batch.items() if k not in annotate_phase.PIXELS} for i in range(3)]
    final = LocalStore(tmp_path / "shards")
    annotate_phase.write_final_shard(pairs, final, 0, load_marker(pairs, 0), rows, {})
    assert len(calls) == 2 * 3  # the writer copies the PNG members' bytes as they are
    assert dict(read_tar(final.read("shard-000000.tar"))) == dict(read_tar(pairs.read("shard-000000.tar")))


def _tarfile_bytes(samples: list[dict]) -> bytes:
    """What ``tarfile`` writes for the members, as build_tar wrote them before it joined the bytes itself."""
    members = sorted((s["__key__"], e, d) for s in samples for e, d in s.items() if e != "__key__")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tars_are_byte_identical_to_tarfiles():
    rng = np.random.default_rng(1)
    cases = [
        [],
        [{"__key__": "a", "json": b""}],
        [{"__key__": "k" * 120, "json": b"1" * 511, "png": b"2" * 513}],  # a GNU long name
        [{"__key__": f"s{i:03d}", "npy": rng.bytes(int(rng.integers(0, 5000))), "caption.json": b"{}"}
         for i in range(37)],
    ]
    for samples in cases:
        assert build_tar(samples) == _tarfile_bytes(samples)
