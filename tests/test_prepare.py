"""prepare's shard phase end to end on a real local Ray cluster: rejects, determinism, resume, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.prepare import main as prepare_main
from spasem.degrade.chain import resynthesize, sharpen
from spasem.degrade.params import UsmParams
from spasem.shards import decode_member, read_tar
from stages.read import decode_image
from tests.conftest import write_bad_files, write_good_photos

ROOT = Path(__file__).resolve().parent.parent
SHARD_ONLY = ["--set", "prepare.phases=[shard]", "--set", "data.shard_size=4", "--set", "prepare.progress=false",
              "--set", "data.hr_size=64"]


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    good = write_good_photos(folder)
    bad = write_bad_files(folder)
    return folder, good, bad


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory, ray_cluster):
    folder, _, _ = corpus
    out = tmp_path_factory.mktemp("ref")
    assert prepare_main(["--input", str(folder), "--output", str(out), *SHARD_ONLY]) == 0
    return out


def test_good_photos_become_pairs_and_bad_files_rejects(corpus, reference_run):
    import webdataset as wds

    folder, good, bad = corpus
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["samples"] == 2 * len(good)  # tiny.yaml: 2 crops per image
    assert summary["rejected_by_reason"] == {reason: 1 for reason in bad.values()}
    assert (reference_run / "config.yaml").exists()
    tars = sorted((reference_run / "pairs").glob("shard-*.tar"))
    rows = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb8"))
    assert len(rows) == summary["samples"] and len({r["__key__"] for r in rows}) == len(rows)
    for row in rows:
        assert row["hr.png"].shape == (64, 64, 3) and row["lr.png"].shape == (16, 16, 3)
        rec = row["json"]
        assert set(rec) == {"key", "source", "crop", "flip", "seed", "degradation"} and rec["key"] == row["__key__"]
        assert rec["source"] in good and rec["degradation"]["preset"] == "xpsr"
        # the record says where the HR came from: the source's box, mirrored when flip, then sharpened
        x, y, w, h = rec["crop"]
        crop = decode_image((corpus[0] / rec["source"]).read_bytes(), 10**9, 1)[y : y + h, x : x + w]
        crop = np.ascontiguousarray(crop[:, ::-1] if rec["flip"] else crop)
        np.testing.assert_array_equal(sharpen(crop, UsmParams(**rec["degradation"]["usm"])), row["hr.png"])
    assert {row["json"]["flip"] for row in rows} == {True, False}
    markers = [json.loads(p.read_text()) for p in sorted((reference_run / "pairs").glob("shard-*.json"))]
    rejected = sorted(r["source"] for m in markers for r in m["rejected"])
    assert rejected == sorted(bad)


def test_lr_resynthesized_from_hr_and_record(reference_run):
    tar = sorted((reference_run / "pairs").glob("shard-*.tar"))[0]
    for _key, members in read_tar(tar.read_bytes()):
        hr = decode_member("hr.png", members["hr.png"])
        lr = decode_member("lr.png", members["lr.png"])
        rec = decode_member("json", members["json"])
        np.testing.assert_array_equal(resynthesize(hr, rec["degradation"], rec["seed"], 4), lr)


def test_second_run_skips_and_matches(corpus, reference_run, tmp_path):
    folder, _, _ = corpus
    before = _shards(reference_run / "pairs")
    assert prepare_main(["--input", str(folder), "--output", str(reference_run), *SHARD_ONLY]) == 0
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["phases"]["shard"]["built"] == 0
    assert _shards(reference_run / "pairs") == before


def test_killed_run_resumes_to_identical_shards(corpus, reference_run, tmp_path):
    folder, _, _ = corpus
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.prepare", "--input", str(folder), "--output", str(out), *SHARD_ONLY,
           "--set", "prepare.shard_parallelism=1", "--set", "ray.num_cpus=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list((out / "pairs").glob("shard-*.json")):
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list((out / "pairs").glob("shard-*.json")))
    expected = _shards(reference_run / "pairs")
    assert 0 < done_before < len(expected) // 2, "killed part-way"
    assert prepare_main(["--input", str(folder), "--output", str(out), *SHARD_ONLY]) == 0
    assert _shards(out / "pairs") == expected
    # the killed driver's Ray workers may finish the shard in flight before they notice, so the rerun
    # can find more finished shards than were counted right after the kill, never fewer
    assert json.loads((out / "summary.json").read_text())["phases"]["shard"]["skipped"] >= done_before


def test_input_and_output_on_s3(bucket, s3_server, tmp_path, ray_cluster):
    local = tmp_path / "in"
    good = write_good_photos(local)
    for rel in good[:3]:
        s3_server.upload_file(str(local / rel), bucket, f"hr/{rel}")
    s3_server.put_object(Bucket=bucket, Key="hr/empty.png", Body=b"")
    uri_in, uri_out = f"s3://{bucket}/hr", f"s3://{bucket}/prepared"
    assert prepare_main(["--input", uri_in, "--output", uri_out, *SHARD_ONLY]) == 0
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]}
    assert {"prepared/config.yaml", "prepared/summary.json", "prepared/pairs/shard-000000.tar",
            "prepared/pairs/shard-000000.json"} <= keys
    summary = json.loads(s3_server.get_object(Bucket=bucket, Key="prepared/summary.json")["Body"].read())
    assert summary["samples"] == 6 and summary["rejected_by_reason"] == {"empty file": 1}
    config_text = s3_server.get_object(Bucket=bucket, Key="prepared/config.yaml")["Body"].read().decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in config_text + json.dumps(summary)


def test_empty_input_is_a_clear_error(tmp_path, capsys, ray_cluster):
    (tmp_path / "in").mkdir()
    assert prepare_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *SHARD_ONLY]) == 1
    assert "no images" in capsys.readouterr().err


