"""PNG for the shards: a writer whose files decode at a third of the CPU, and the reader with its fast path.

The annotate phase decodes every HR and LR of a pairs shard, and decoding a 512 px HR that Pillow
wrote (adaptive filters, deflate level 1) cost ~11 ms of CPU, more than everything else outside
the models together. Two things make it slow: zlib's inflate, and undoing the Paeth filter, which
runs pixel by pixel. So the writer filters every row with ``Up`` (the byte minus the byte above)
and deflates at level 1: the files come out the same size as Pillow's (within a few percent on
photos), and the reader inflates with ISA-L (``isal``, 2x zlib's speed; zlib when it is missing)
and undoes ``Up`` with one in-place add per row. Any other PNG (other filters, modes, bit
depths, interlacing) is decoded by OpenCV's libpng or Pillow, so old shards read as before.

The files are ordinary PNGs (every reader decodes them) and byte-stable: the same pixels give the
same bytes for a given zlib, as Pillow's did.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

try:  # ISA-L's inflate: the same output as zlib's, at about twice the speed
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a core dependency; zlib is the fallback
    _inflate_lib = zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type 2: each byte minus the byte above it
_FAST_MAX_PIXELS = 1 << 26  # larger images never come from the shards: the general decoders take them
_LEVEL = 1  # deflate level: 6 saves ~8% of the bytes for 3x the encoding time


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit RGB or gray ``uint8`` image -> PNG bytes, every row ``Up``-filtered, deflate level 1."""
    image = np.asarray(image)
    if image.size == 0:  # PNG has no empty images: no reader would open the file
        raise ValueError(f"cannot write an empty image as PNG (shape {image.shape})")
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        buf = io.BytesIO()  # anything else (alpha, 16 bit) as Pillow writes it
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=_LEVEL)
        return buf.getvalue()
    height, width = image.shape[:2]
    rows = image.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG's
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(filtered.tobytes(), _LEVEL)),
                     _chunk(b"IEND", b"")))


def _fast_decode(data: bytes) -> np.ndarray | None:
    """The pixels of an 8-bit RGB, non-interlaced PNG whose rows are ``Up`` or unfiltered, else None.

    None also for anything odd about the file (a short chunk, a bad header CRC): the general decoders
    then read it and say what is wrong.
    """
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    header = data[16:29]
    if struct.unpack(">I", data[29:33])[0] != zlib.crc32(b"IHDR" + header):
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour != 2 or interlace != 0 or not 0 < width * height <= _FAST_MAX_PIXELS:
        return None  # huge ones too: libpng and Pillow have their own guards against decompression bombs
    idat, pos = [], 33
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            return None
        if kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    stride = 3 * width + 1
    inflater = _inflate_lib.decompressobj()
    try:  # max_length: a stream that inflates past the image's size is not read any further
        raw = inflater.decompress(b"".join(idat), height * stride + 1)
    except _inflate_lib.error:  # the general decoders then name what is wrong
        return None
    if len(raw) != height * stride or not inflater.eof:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride)
    filters = rows[:, 0]
    if filters.any():
        if ((filters != 0) & (filters != _UP)).any():
            return None  # Sub, Average or Paeth: libpng undoes them faster than numpy can
        rows = rows.copy()  # undone in place, row by row: 3x faster than np.cumsum along axis 0
        add, views = np.add, list(rows[:, 1:])
        for i in (filters[1:] == _UP).nonzero()[0].tolist():  # an Up first row adds zeros: nothing to undo
            add(views[i], views[i + 1], out=views[i + 1])  # uint8 wraps mod 256: undoes Up exactly
    # a copy unless the rows were undone in place: a view would be read-only (the inflated bytes)
    pixels = rows[:, 1:] if rows.flags.writeable else rows[:, 1:].copy()
    return np.ascontiguousarray(pixels).reshape(height, width, 3)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB uint8 ``[H, W, 3]``.

    The files :func:`encode_png` writes take the fast path; other 8-bit RGB PNGs go through OpenCV's
    libpng (a fifth less CPU than Pillow); any other mode, and any error, is Pillow's to decode or
    to explain.
    """
    if data[:8] == SIGNATURE:
        fast = _fast_decode(data)
        if fast is not None:
            return fast
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if bgr is not None and bgr.dtype == np.uint8 and bgr.ndim == 3 and bgr.shape[2] == 3:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
