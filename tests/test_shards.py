"""The shard format: deterministic tars, markers after tars, hostile tars refused, codecs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from spasem.shards import (
    ShardFormatError,
    ShardWriter,
    build_tar,
    decode_member,
    done_indices,
    encode_npy,
    encode_png,
    make_key,
    read_tar,
)
from spasem.storage import LocalStore, StorageError


def _sample(key: str, value: int) -> dict:
    img = np.full((8, 8, 3), value, np.uint8)
    return {"__key__": key, "hr.png": encode_png(img), "json": json.dumps({"key": key}).encode(),
            "latent.npy": encode_npy(np.full((2, 2), value, np.float16))}


def test_tar_bytes_do_not_depend_on_insertion_order():
    a = build_tar([_sample("k1", 1), _sample("k2", 2)])
    b = build_tar([_sample("k2", 2), _sample("k1", 1)])
    assert a == b
    names = tarfile.open(fileobj=io.BytesIO(a)).getnames()
    assert names == sorted(names)
    assert all(m.mtime == 0 for m in tarfile.open(fileobj=io.BytesIO(a)).getmembers())


def test_keys_are_stable_unique_and_dotless():
    keys = {make_key(p, i) for p in ("a/b.c.png", "a_b/c_c.png", "a/b/c.png") for i in range(3)}
    assert len(keys) == 9
    assert all("." not in k and "/" not in k for k in keys)
    assert make_key("x/y.jpg", 1) == make_key("x/y.jpg", 1)


def test_writer_marker_and_webdataset_reads_it(tmp_path):
    import webdataset as wds

    store = LocalStore(tmp_path)
    writer = ShardWriter(store, 3)
    writer.write(_sample("b", 2))
    writer.write(_sample("a", 1))
    writer.reject("bad.jpg", "empty file")
    marker = writer.close({"read": "pillow"})
    assert marker["count"] == 2 and marker["keys"] == ["a", "b"]
    assert marker["rejected"] == [{"source": "bad.jpg", "reason": "empty file"}]
    assert done_indices(store) == {3}
    assert (tmp_path / "shard-000003.tar").stat().st_size == marker["bytes"]
    rows = list(wds.WebDataset(str(tmp_path / "shard-000003.tar"), shardshuffle=False).decode("rgb8"))
    assert [r["__key__"] for r in rows] == ["a", "b"]
    assert rows[0]["hr.png"].shape == (8, 8, 3) and rows[1]["hr.png"][0, 0, 0] == 2
    ours = read_tar((tmp_path / "shard-000003.tar").read_bytes())
    assert decode_member("latent.npy", ours[1][1]["latent.npy"]).dtype == np.float16


def _tar_with(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil.png", "/etc/passwd.json", "sub/dir.png"])
def test_hostile_member_paths_refused(name):
    with pytest.raises(ShardFormatError, match="refusing"):
        read_tar(_tar_with(name))


def test_links_skipped_and_garbage_refused():
    assert read_tar(_tar_with("k.png", kind=tarfile.SYMTYPE)) == []
    with pytest.raises(ShardFormatError):
        read_tar(b"\x00garbage" * 100 + b"not a tar")


def test_pickle_is_never_decoded():
    with pytest.raises(ShardFormatError, match="refusing to decode"):
        decode_member("pkl", b"\x80\x04K\x01.")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_member("x.npy", obj.getvalue())


def test_store_refuses_escaping_paths(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(StorageError):
        store.write("../outside.txt", b"x")
    store.write("a/b.txt", b"x")
    assert store.list() == ["a/b.txt"] and not list(tmp_path.glob("a/.*tmp"))
