"""The WebDataset shard format: deterministic tars, done markers, safe reading, member codecs.

A shard is ``shard-{index:06d}.tar`` with members ``{key}.{ext}`` sorted by (key, ext), fixed
mtimes and owners, so the same samples always give the same bytes; its done marker
``shard-{index:06d}.json`` is written after the tar and is what resume looks for.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spasem.columns import as_list
from spasem.png import decode_png, encode_png  # noqa: F401 - the shard codecs, re-exported
from spasem.storage import Store

log = logging.getLogger(__name__)
DECODABLE = (".png", ".json", ".npy")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_MEMBER_BYTES = 256 * 1024 * 1024


class ShardFormatError(ValueError):
    """A tar that is not a valid shard of this project."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def marker_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def make_key(source: str, crop_index: int) -> str:
    """A stable, unique WebDataset key from a source path and crop index: no dots, no slashes."""
    stem = _KEY_UNSAFE.sub("_", source.rsplit(".", 1)[0]).strip("_")[-80:] or "img"
    digest = hashlib.blake2b(source.encode(), digest_size=4).hexdigest()
    return f"{stem}_{digest}_{crop_index:03d}"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_member(ext: str, data: bytes) -> Any:
    """Decode a member by extension; only png, json and npy are ever decoded (never pickle)."""
    kind = ext.rsplit(".", 1)[-1]
    if kind == "png":
        return decode_png(data)
    if kind == "json":
        return json.loads(data)
    if kind == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    raise ShardFormatError(f"refusing to decode member type {ext!r}: only {DECODABLE} are decoded")


def build_tar(samples: Iterable[dict[str, Any]]) -> bytes:
    """Tar samples (``{"__key__": key, ext: bytes, ...}``) deterministically."""
    members = []
    for sample in samples:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ShardFormatError(f"sample key {key!r} must not contain '.' or '/'")
        for ext, data in sample.items():
            if ext != "__key__":
                members.append((key, ext, data))
    members.sort(key=lambda m: (m[0], m[1]))
    # the bytes tarfile.open(mode="w", format=GNU_FORMAT) writes, joined once: each member's header block,
    # its data padded to 512 bytes, then two zero blocks and padding to a whole record (half the CPU)
    chunks = []
    for key, ext, data in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        chunks += (info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape"), data,
                   bytes(-len(data) % tarfile.BLOCKSIZE))
    size = sum(map(len, chunks)) + 2 * tarfile.BLOCKSIZE
    chunks.append(bytes(2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE))
    return b"".join(chunks)


def read_tar(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Group a shard's members by key, in tar order; hostile or odd members are refused or skipped."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise ShardFormatError(f"not a readable tar: {exc}") from None
    with tar:
        for info in tar:
            name = info.name
            if name.startswith("/") or ".." in name.split("/") or "/" in name:
                raise ShardFormatError(f"refusing tar member with path {name!r}")
            if not info.isfile():
                continue  # links, devices and folders are never followed
            if info.size > MAX_MEMBER_BYTES:
                raise ShardFormatError(f"tar member {name!r} is {info.size} bytes, over {MAX_MEMBER_BYTES}")
            key, dot, ext = name.partition(".")
            if not dot:
                continue
            fh = tar.extractfile(info)
            samples.setdefault(key, {})[ext] = fh.read() if fh else b""
    return list(samples.items())


class ShardWriter:
    """Collect one shard's samples, then write the tar and its done marker atomically."""

    def __init__(self, store: Store, index: int):
        self.store = store
        self.index = index
        self.samples: list[dict[str, Any]] = []
        self.rejected: list[dict[str, str]] = []

    def write(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.append({"source": source, "reason": reason})

    def close(self, stages: dict[str, str]) -> dict[str, Any]:
        """Write tar then marker; returns the marker."""
        data = build_tar(self.samples)
        keys = sorted(s["__key__"] for s in self.samples)
        if len(set(keys)) != len(keys):
            raise ShardFormatError(f"shard {self.index} has duplicate keys")
        self.store.write(shard_name(self.index), data)
        marker = {
            "shard": self.index,
            "count": len(keys),
            "keys": keys,
            "rejected": sorted(self.rejected, key=lambda r: (r["source"], r["reason"])),
            "stages": dict(sorted(stages.items())),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.store.write(marker_name(self.index), json.dumps(marker, indent=1, sort_keys=True).encode())
        return marker


def done_indices(store: Store) -> set[int]:
    """Indices of shards whose done marker exists (the tar is complete before its marker is written)."""
    out = set()
    for name in store.list((".json",)):
        m = re.fullmatch(r"shard-(\d{6,})\.json", name)
        if m:
            out.add(int(m.group(1)))
    return out


def load_marker(store: Store, index: int) -> dict[str, Any]:
    return json.loads(store.read(marker_name(index)))


# -- the member table (DESIGN.md "Shard format"): one codec for the writer, the trainer and the exporter --
PAIRS_DIR = "pairs"    # the shard phase's output and the annotate phase's input
FINAL_DIR = "shards"   # the final, annotated shards
IMAGE_MEMBERS = ("hr.png", "lr.png")
NPY_MEMBERS = ("clip_lr", "dino_lr", "clip_hr", "dino_hr", "text", "text_low_hr", "latent")
MEMBERS = {
    "hr.png": "HR crop, RGB uint8",
    "lr.png": "degraded LR, RGB uint8",
    "json": "record: key, source, crop, seed, degradation",
    "caption.json": "captions: high, low, low_hr (the HR's quality caption, when asked), model",
    "boxes.json": "grounding: phrases, boxes (normalized), scores, model",
    "clip_lr.npy": "fp16 CLIP tokens of the LR [tokens, dim]",
    "dino_lr.npy": "fp16 DINOv2 tokens of the LR [tokens, dim]",
    "clip_hr.npy": "fp16 pooled CLIP feature of the HR [dim]",
    "dino_hr.npy": "fp16 pooled DINOv2 feature of the HR [dim]",
    "text.npy": "fp16 text-encoder states of the captions [2, 77, dim]",
    "text_low_hr.npy": "fp16 text-encoder states of the HR's quality caption [77, dim]",
    "latent.npy": "fp16 VAE posterior of the HR [2C, h, w] (mean, logvar)",
}


def encode_pair(key: str, hr: np.ndarray, lr: np.ndarray, record: dict[str, Any]) -> dict[str, Any]:
    """The shard phase's sample: the HR/LR pair and its record."""
    return {"__key__": key, "hr.png": encode_png(hr), "lr.png": encode_png(lr), "json": encode_json(record)}


def encode_annotations(row: dict[str, Any], stages: dict[str, str]) -> dict[str, bytes]:
    """The annotation members of one annotated row, as encoded bytes (``stages``: name -> model id)."""
    members: dict[str, bytes] = {}
    if "caption_high" in row and "captions" in stages:
        caption = {"high": str(row["caption_high"]), "low": str(row["caption_low"])}
        if row.get("caption_low_hr") is not None:
            caption["low_hr"] = str(row["caption_low_hr"])
        members["caption.json"] = encode_json({**caption, "model": stages["captions"]})
    if "boxes" in row and "grounding" in stages:
        boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 4)
        members["boxes.json"] = encode_json({
            "phrases": [str(p) for p in as_list(row["phrases"])],
            "boxes": [[round(float(v), 5) for v in box] for box in boxes],
            "scores": [round(float(s), 5) for s in np.asarray(row["scores"], np.float64).reshape(-1)],
            "model": stages["grounding"],
        })
    for name in NPY_MEMBERS:
        value = row.get(name)
        if value is not None and np.asarray(value).size:
            members[f"{name}.npy"] = encode_npy(np.asarray(value, dtype=np.float16))
    return members


def decode_annotations(members: dict[str, bytes]) -> dict[str, Any]:
    """Inverse of :func:`encode_annotations`: captions, boxes and arrays of the members present."""
    out: dict[str, Any] = {}
    if "caption.json" in members:
        caption = decode_member("json", members["caption.json"])
        out.update(caption_high=str(caption.get("high", "")), caption_low=str(caption.get("low", "")))
        if "low_hr" in caption:
            out["caption_low_hr"] = str(caption["low_hr"])
    if "boxes.json" in members:
        boxes = decode_member("json", members["boxes.json"])
        phrases = [str(p) for p in boxes.get("phrases", [])]
        coords = np.asarray(boxes.get("boxes", []), np.float32).reshape(-1, 4)
        out.update(phrases=phrases, boxes=coords, scores=np.asarray(boxes.get("scores", []), np.float32))
    for name in NPY_MEMBERS:
        if f"{name}.npy" in members:
            out[name] = decode_member("npy", members[f"{name}.npy"])
    return out


# -- finding finished shards, and the held-out split (training and pairs_export share it) --------------
@dataclass(frozen=True)
class ShardInfo:
    rel: str                # path relative to the listing's folder ("" when the folder is one tar)
    keys: tuple[str, ...]   # sample keys in tar order (sorted, as ShardWriter writes them)
    # the done marker's stage -> model id record (empty without a marker): read once, with the keys
    stages: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def count(self) -> int:
        return len(self.keys)


def shard_folder(store: Store) -> tuple[Store, list[str]]:
    """Where a prepare output's shards are: ``shards/`` (final), else ``pairs/`` (shard phase only), else
    the folder itself; ``store`` may also be one tar. Returns the folder and its top-level tars."""
    if store.uri.endswith(".tar"):
        return store, [""]
    for sub in (FINAL_DIR, PAIRS_DIR):
        nested = store.child(sub)
        tars = [t for t in nested.list((".tar",)) if "/" not in t]
        if tars:
            return nested, tars
    return store, [t for t in store.list((".tar",)) if "/" not in t]


def list_shards(store: Store) -> tuple[Store, list[ShardInfo]]:
    """The finished, non-empty shards under a prepare output, in order.

    A tar whose done marker is missing while others have one is still being written and is left out;
    a hand-made folder of tars without any markers lists its keys from the tars themselves.
    """
    folder, tars = shard_folder(store)
    markers = {m for m in folder.list((".json",)) if "/" not in m} if tars != [""] else set()
    finished = []
    for rel in sorted(tars):
        if markers and rel[:-4] + ".json" not in markers:
            log.warning("skipping %s: no done marker, the shard may still be being written", folder.url(rel))
            continue
        finished.append(rel)

    def info(rel: str) -> ShardInfo:
        marker = rel[:-4] + ".json"
        if marker in markers:
            record = json.loads(folder.read(marker))
            return ShardInfo(rel, tuple(record["keys"]), dict(record.get("stages", {})))
        return ShardInfo(rel, tuple(key for key, _ in read_tar(folder.read(rel))))

    with ThreadPoolExecutor(16) as pool:  # one small GET per shard: thousands of them on S3
        infos = [i for i in pool.map(info, finished) if i.keys]
    return folder, infos


def split_holdout(shards: list[ShardInfo], last: int) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """``(kept, held_out)``: the last ``last`` non-empty shards are held out (``last=0``: none)."""
    if last < 0:
        raise ValueError(f"cannot hold out {last} shards: the count must be 0 or more")
    return (list(shards[:-last]), list(shards[-last:])) if last else (list(shards), [])
