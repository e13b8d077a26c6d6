"""prepare's annotate phase end to end: every DESIGN member, determinism, resume, failures as rejects."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.prepare import main as prepare_main
from spasem.shards import read_tar
from tests.conftest import demo_prepare_args, failing_on_key

NPY = {"clip_lr.npy": 2, "dino_lr.npy": 2, "clip_hr.npy": 1, "dino_hr.npy": 1, "text.npy": 3, "text_low_hr.npy": 2,
       "latent.npy": 3}


@pytest.fixture(scope="module")
def annotated(demo_prepared) -> Path:
    """The demo's prepare run (every phase, default config), shared with tests/test_golden_shards.py."""
    return demo_prepared


def _run(out: Path, tiny: dict[str, str], *extra: str) -> dict:
    assert prepare_main(demo_prepare_args(out, tiny, *extra)) == 0
    return json.loads((out / "summary.json").read_text())


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    rows = {}
    for tar in sorted((out / "shards").glob("shard-*.tar")):
        rows.update(dict(read_tar(tar.read_bytes())))
    return rows


def test_every_member_with_design_dtype_and_shape(annotated):
    import webdataset as wds

    samples = _samples(annotated)
    summary = json.loads((annotated / "summary.json").read_text())
    assert len(samples) == summary["samples"] == summary["phases"]["shard"]["samples"] > 0
    for key, members in samples.items():
        assert {"hr.png", "lr.png", "json", "caption.json", "boxes.json", *NPY} <= set(members), key
        for name, ndim in NPY.items():
            arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
            assert arr.dtype == np.float16 and arr.ndim == ndim, (name, arr.dtype, arr.shape)
            assert np.isfinite(arr).all()
        assert np.load(io.BytesIO(members["text.npy"]))[0].shape[0] == 77
        caption = json.loads(members["caption.json"])
        assert set(caption) == {"high", "low", "low_hr", "model"}  # low_hr: the HR's quality (XPSR's _q_GT)
        boxes = json.loads(members["boxes.json"])
        assert set(boxes) == {"phrases", "boxes", "scores", "model"}
        assert all(0 <= v <= 1 for box in boxes["boxes"] for v in box)
    marker = json.loads(sorted((annotated / "shards").glob("shard-*.json"))[0].read_text())
    assert {"read", "crop", "degrade", "captions", "grounding", "embeddings", "encode"} <= set(marker["stages"])
    rows = list(wds.WebDataset(str(annotated / "shards" / "shard-000000.tar"), shardshuffle=False))
    assert rows and "latent.npy" in rows[0]


def test_a_killed_annotate_phase_resumes_to_identical_shards(annotated, tiny, tmp_path):
    # same input, same bytes across fresh runs is what tests/test_golden_shards.py pins; here: resume
    out = tmp_path / "again"
    shutil.copytree(annotated, out)
    first = {p.name: p.read_bytes() for p in sorted((annotated / "shards").glob("shard-*"))}
    # a run killed after shard 1's tar but before its marker: the rerun redoes exactly that shard
    (out / "shards" / "shard-000001.json").unlink()
    (out / "shards" / "shard-000001.tar").write_bytes(b"partial")
    summary = _run(out, tiny)
    assert summary["phases"]["annotate"]["built"] == 1
    assert {p.name: p.read_bytes() for p in sorted((out / "shards").glob("shard-*"))} == first


def test_injected_failure_becomes_a_reject(annotated, tiny, tmp_path, monkeypatch):
    from pipeline import annotate_phase

    victim = sorted(_samples(annotated))[0]
    failing = failing_on_key(annotate_phase.STAGES["captions"], victim)
    monkeypatch.setitem(annotate_phase.STAGES, "captions", failing)
    out = tmp_path / "failing"
    shutil.copytree(annotated / "pairs", out / "pairs")  # the annotate phase alone, on the demo's pairs
    summary = _run(out, tiny, "--set", "prepare.phases=[annotate]", "--set", "annotate.grounding.enabled=false")
    samples = _samples(out)
    assert victim not in samples and len(samples) == len(_samples(annotated)) - 1
    assert "boxes.json" not in next(iter(samples.values()))
    assert summary["rejected_by_reason"].get("captions") == 1
    rejected = [r for m in (out / "shards").glob("shard-*.json") for r in json.loads(m.read_text())["rejected"]]
    assert any(victim in r["source"] and r["reason"].startswith("captions: ") for r in rejected)
