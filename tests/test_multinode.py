"""A three-node Ray cluster on one machine, used the way docs/cluster.md says: a head started with
`ray start --head` (its dashboard serves the Jobs API) and two worker nodes joined with `ray start
--address`, each its own raylet with its own resources. The three entry points are submitted with
`ray job submit --working-dir .` and must each end SUCCEEDED; every input and output (photos, pairs,
shards, checkpoints, the export, the upscaled images) is an s3:// URI on the moto server, so no node
reads a data folder another node wrote; training places one worker on each worker node. Models are
resolved by the actors and workers on their own node (docs/cluster.md); one machine's shared file system
cannot show that each node built its own copy. Each node is stopped through its own process group, never with a global `ray stop`
(which would also stop other tests' clusters)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import _free_port, skimage_photo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = {"node_a": 2, "node_b": 2}  # worker node -> CPUs; the head gets 1 and runs the job drivers
TRAIN = ["deepspeed.stage=3", "train.num_workers=2", "train.batch_size=1", "train.cpus_per_worker=0.5", "train.max_steps=2",
         "train.checkpoint_every=2", "train.log_every=1", "train.sample_steps=2", "train.num_samples=1",
         "train.prefetch_batches=1", "train.resources={trainer: 1}"]


class RayNode:
    """One `ray start --block` in its own process group: stopping it stops that node's processes only."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        stop_all([self])


def stop_all(nodes: list[RayNode], grace: float = 10) -> None:
    """SIGTERM to every node at once, SIGKILL to what still runs after ``grace`` seconds in all."""
    for node in nodes:
        node.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.signal(signal.SIGKILL)
            node.proc.wait(timeout=10)
        node.log.close()


def _wait_for(what: str, check, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def _ports(*names: str) -> list[str]:
    """Explicit free ports: two raylets on one machine that both pick a default port collide."""
    return [a for name in names for a in (f"--{name}-port", str(_free_port()))]


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    try:
        return [n for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]
    except Exception:  # the dashboard is not up yet (the state API raises its own connection errors)
        return []


@pytest.fixture(scope="module")
def cluster(s3_server):
    """(dashboard URL, env for the ray CLI, Ray's temp folder): a head and two worker nodes on this machine."""
    temp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # on a busy 2-core machine a node's Python agents can take minutes to start: the agents' deadline is
    # raised, and a node whose raylet still gives up (15 s for the agent's port file) is started again
    # a node's environment as a machine's would be: the S3 endpoint and credentials of the moto server, the
    # test settings of conftest.py (offline hub, one thread per process), none of pytest's own variables
    keep = ("HOME", "LANG", "TMPDIR", "OMP_NUM_THREADS", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("AWS_")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_agent_register_timeout_ms="600000")
    gcs, dash = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    nodes: list[RayNode] = []

    def start(name: str, args: list[str], alive: int) -> None:
        """`ray start` exits when its raylet fails to come up: then again, on fresh ports, up to 5 times."""
        for attempt in range(5):
            # each node its own temp folder, as each machine has its own disk: in a shared one, a worker node
            # that no longer needs the job's working_dir deletes the folder the driver runs in
            node = RayNode([*args, "--temp-dir", str(temp / name), "--object-store-memory", str(150 * 1024 * 1024),
                            "--disable-usage-stats", *_ports("node-manager", "object-manager", "metrics-export",
                                                             "runtime-env-agent", "dashboard-agent-grpc",
                                                             "dashboard-agent-listen")],
                           env, temp / f"{name}-{attempt}.out")
            nodes.append(node)
            _wait_for(f"node {name}", lambda p=node.proc: p.poll() is not None or len(_alive_nodes(dashboard)) == alive)
            if node.proc.poll() is None:
                return
            node.stop()
        raise RuntimeError(f"node {name} did not start; see {temp}/{name}-*.out")

    try:
        start("head", ["--head", "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard=true",
                       "--dashboard-host", "127.0.0.1", "--num-cpus", "1", *_ports("ray-client-server")], 1)
        for count, (name, cpus) in enumerate(NODES.items(), start=2):  # one at a time: each finds its ports free
            start(name, ["--address", f"127.0.0.1:{gcs}", "--num-cpus", str(cpus),
                         "--resources", json.dumps({name: 1, "trainer": 1})], count)
        yield dashboard, env, temp
    finally:
        stop_all(list(reversed(nodes)))
        shutil.rmtree(temp, ignore_errors=True)


def submit(cluster, entrypoint: list[str]) -> str:
    """`ray job submit --working-dir .` and wait; returns the job's log, asserting it SUCCEEDED."""
    dashboard, env, _ = cluster
    job = f"t-{entrypoint[2].split('.')[-1]}-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job, "--working-dir", ".",
         "--", *entrypoint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(dashboard).get_job_status(job)  # what `ray job status` reports
    output = done.stdout + done.stderr
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{' '.join(entrypoint)}: exit {done.returncode}, {status}\n{output[-6000:]}")
    return output


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_train_upscale_as_ray_jobs_on_three_nodes_over_s3(cluster, s3_server):
    bucket = "multinode"
    s3_server.create_bucket(Bucket=bucket)
    photos = {"astronaut.png": skimage_photo("astronaut.png"), "coffee.png": skimage_photo("coffee.png")}
    for name, image in photos.items():
        s3_server.put_object(Bucket=bucket, Key=f"photos/{name}", Body=_png(image[:160, :160]))
        s3_server.put_object(Bucket=bucket, Key=f"lr/{name}", Body=_png(image[200:224, 200:232]))
    s3 = f"s3://{bucket}"

    # the shard phase only: training computes captions, features and latents online, under ZeRO-3 (the
    # weights partitioned across the two nodes and gathered for the export); the annotation stages run
    # on the cluster in the upscale job
    log = submit(cluster, ["python", "-m", "pipeline.prepare", "--input", f"{s3}/photos", "--output",
                           f"{s3}/prepared", "--set", "data.hr_size=64", "--set", "data.min_size=64",
                           "--set", "data.shard_size=2", "--set", "prepare.progress=false",
                           "--set", "prepare.phases=[shard]"])
    assert "Connecting to existing Ray cluster" in log
    summary = json.loads(s3_server.get_object(Bucket=bucket, Key="prepared/summary.json")["Body"].read())
    assert summary["samples"] == 4 and summary["rejected"] == 0, summary
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="prepared/pairs/")["Contents"]}
    assert {f"prepared/pairs/shard-00000{i}.{ext}" for i in (0, 1) for ext in ("tar", "json")} <= keys

    sets = [a for s in TRAIN for a in ("--set", s)]
    submit(cluster, ["python", "-m", "training.launch", "--input", f"{s3}/prepared", "--output", f"{s3}/run", *sets])
    run = {o["Key"] for o in s3_server.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert any(k.startswith("run/checkpoints/") for k in run), sorted(run)
    # the export: the trained ControlNet and a reference to the base models, no frozen weights uploaded
    assert {"run/export/spasem_export.json", "run/export/controlnet/diffusion_pytorch_model.safetensors"} <= run
    assert not any(k.startswith(("run/export/unet/", "run/export/model_index")) for k in run), sorted(run)
    assert _train_worker_nodes(cluster[0]) == {"node_a", "node_b"}, "one training worker on each worker node"

    submit(cluster, ["python", "-m", "pipeline.upscale", "--input", f"{s3}/lr", "--output", f"{s3}/sr",
                     "--model", f"{s3}/run/export", "--set", "upscale.steps=2", "--set", "upscale.tile_size=16",
                     "--set", "upscale.tile_overlap=4"])
    for name in photos:
        out = Image.open(io.BytesIO(s3_server.get_object(Bucket=bucket, Key=f"sr/{name}")["Body"].read()))
        assert out.size == (32 * 4, 24 * 4), name

    # the package `--working-dir .` uploaded: the sources, without the environment, caches or history
    packages = [p for p in cluster[2].glob("*/session_latest/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert packages
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"spasem", "stages", "pipeline", "training", "configs"} <= names
        assert not names & {".venv", ".git", "runs"}, names


def _train_worker_nodes(dashboard: str) -> set[str]:
    """The worker node (by its custom resource) of every Ray Train worker actor of the run."""
    from ray.util.state import list_actors

    by_id = {n.node_id: next((r for r in n.resources_total if r in NODES), "head") for n in _alive_nodes(dashboard)}
    actors = [a for a in list_actors(address=dashboard, detail=True, limit=10000, raise_on_missing_output=False)
              if "TrainWorker" in a.class_name]
    assert len(actors) >= 2, [a.class_name for a in list_actors(address=dashboard, limit=10000)]
    return {by_id[a.node_id] for a in actors}
