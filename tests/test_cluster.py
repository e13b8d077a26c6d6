"""cluster.yaml: valid for Ray's cluster launcher (its own JSON schema) and shaped the way docs/cluster.md says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_launcher_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # what `ray up` itself checks before touching the cloud


def test_node_types_cover_head_cpu_and_gpu_work(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head must not run pool tasks: a busy pool would starve the driver"
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    cpu_only = [n for n, t in workers.items() if t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0]
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) > 0]
    assert cpu_only and len(gpu) >= 2, (cpu_only, gpu)  # CPU decode/degrade; GPU annotation and training
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    # every node reaches the shared bucket through an instance profile, never through keys
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], name
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", text, re.IGNORECASE)


def test_setup_installs_this_project_on_every_node(cluster):
    mounts = cluster["file_mounts"]
    (remote, local), = mounts.items()
    assert local == "."
    setup = " ; ".join(cluster["setup_commands"])
    torch_at = setup.find("torch==")
    project_at = setup.find(f'-e "$HOME/{remote.removeprefix("~/")}')
    assert 0 <= torch_at < project_at, "torch must be pinned and installed before the project"
    assert "SPASEM_BUCKET=s3://" in setup  # the shared storage jobs read and write
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in cluster["worker_start_ray_commands"])


def test_training_resource_in_cluster_matches_the_config_key(cluster):
    """docs/cluster.md steers training onto train nodes with --set train.resources={train_node: 1}."""
    from spasem.config import load_config

    custom = {k for t in cluster["available_node_types"].values() for k in t["resources"] if k not in ("CPU", "GPU")}
    assert custom == {"train_node"}
    cfg = load_config(overrides=["train.resources={train_node: 1}", "train.use_gpu=true"])
    assert cfg.train.resources == {"train_node": 1.0}
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert "train.resources={train_node: 1}" in docs and "ray up cluster.yaml" in docs
