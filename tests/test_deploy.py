"""deploy/: the KubeRay manifests pass the CRDs' own schemas as strictly as `kubectl --validate=strict`
and agree with cluster.yaml, docs/cluster.md, the entry points and the image; the image pins torch and
takes no model weights in."""

from __future__ import annotations

import copy
import functools
import gzip
import importlib
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.util.accelerators import accelerators

from spasem.config import build_parser, load_config

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
ENTRY_POINTS = {"pipeline.prepare", "training.launch"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")
KEY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes label keys ([prefix/]name) and values, which the KubeRay operator requires of group labels
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# KubeRay's name limits: the operator derives service names (RayCluster) and cluster names (RayJob)
NAME_LIMIT = {"RayCluster": 53, "RayJob": 47, "ServiceAccount": 253}
INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def object_meta(kind: str) -> dict:
    """The part of ObjectMeta a manifest may set (the CRDs leave the root metadata to the API server)."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": DNS1035, "maxLength": NAME_LIMIT[kind]},
        "namespace": {"type": "string", "pattern": DNS1035}, "labels": string_map, "annotations": string_map}}


def strict(node: dict) -> dict:
    """An openAPIV3Schema node as a JSON Schema that refuses what the API server would prune or refuse:
    an object field outside `properties` (unless the node allows more), wrong types, enums, int-or-string."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "format")}
    if "properties" in node:
        out["properties"] = {name: strict(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(node["additionalProperties"])
    elif node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = strict(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in INT_RANGE and node.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_RANGE[node["format"]]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    if kind == "ServiceAccount":
        schema = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata"],
                  "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": kind},
                                 "automountServiceAccountToken": {"type": "boolean"}}}
    else:
        crd = json.loads(gzip.decompress((SCHEMAS / f"{kind.lower()}s.v1.json.gz").read_bytes()))
        schema = strict(crd["openAPIV3Schema"])
        schema["properties"].pop("status")  # written by the operator, never by a manifest
        schema["properties"].update(apiVersion={"const": f"{crd['group']}/{crd['version']}"},
                                    kind={"const": kind})
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["metadata"] = object_meta(kind)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    if doc.get("kind") not in NAME_LIMIT:
        return [f"kind {doc.get('kind')!r} has no schema in tests/data/kuberay: vendor its CRD's schema first"]
    errors = sorted(validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{e.json_path}: {e.message}" for e in errors]


def load_manifests() -> dict[str, dict]:
    return {f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}": doc
            for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc}


MANIFESTS = load_manifests()
RAYJOBS = [doc for doc in MANIFESTS.values() if doc["kind"] == "RayJob"]
(CLUSTER,) = [doc for doc in MANIFESTS.values() if doc["kind"] == "RayCluster"]
(ACCOUNT,) = [doc for doc in MANIFESTS.values() if doc["kind"] == "ServiceAccount"]
CLUSTER_SPECS = [CLUSTER["spec"]] + [job["spec"]["rayClusterSpec"] for job in RAYJOBS]
SPEC_IDS = ["raycluster"] + [job["metadata"]["name"] for job in RAYJOBS]


def groups(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


def pod_specs(spec: dict) -> list[dict]:
    return [g["template"]["spec"] for g in groups(spec).values()]


def autoscaling_config(spec: dict) -> dict:
    """What Ray's autoscaler makes of a RayCluster spec: its own KubeRay code, not a copy of it."""
    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "x", "namespace": "default"}, "spec": spec})


def custom_resources(resources: dict) -> dict:
    """Resources other than CPU/GPU/memory and the accelerator_type:X that Ray adds on GPU nodes."""
    return {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory") and ":" not in k}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    # comment lines go first (a trailing backslash in a comment continues nothing), then continuations
    text = "".join(line for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines(True)
                   if not line.lstrip().startswith("#"))
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def torch_pin(text: str) -> str:
    (pin,) = set(re.findall(r"torch==([0-9][0-9.]*)", text))
    return pin


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


# -- the CRD schemas, strictly ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_its_schema_strictly(name):
    errors = schema_errors(MANIFESTS[name])
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


def _worker(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MUTATIONS = {  # name: (change to a valid RayCluster, the field the error must name)
    "misspelled group field": (lambda d: _rename(_worker(d), "rayStartParams", "rayStartParam"), "rayStartParam"),
    "misspelled pod field": (lambda d: _rename(_worker(d)["template"]["spec"], "nodeSelector", "nodeSelectors"),
                             "nodeSelectors"),
    "status in a manifest": (lambda d: d.update(status={}), "status"),
    "string for an integer": (lambda d: _worker(d).update(replicas="2"), "replicas"),
    "number for a string": (lambda d: _worker(d)["rayStartParams"].update({"num-cpus": 4}), "num-cpus"),
    "missing required field": (lambda d: _worker(d).pop("groupName"), "groupName"),
    "value outside the enum": (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
                               "upscalingMode"),
    "name that is no DNS label": (lambda d: d["metadata"].update(name="spasem_sr"), "name"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_strict_validation_rejects_a_broken_manifest(mutation):
    mutate, field = MUTATIONS[mutation]
    doc = copy.deepcopy(CLUSTER)
    mutate(doc)
    errors = schema_errors(doc)
    assert errors and any(field in e for e in errors), errors


@pytest.mark.parametrize("quantity, ok", [(1, True), ("1", True), ("500m", True), ("1.5Gi", True),
                                          ("lots", False), ("1.5x", False), (True, False), (1.5, False)])
def test_int_or_string_quantities(quantity, ok):
    doc = copy.deepcopy(CLUSTER)
    _worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = quantity
    assert (not schema_errors(doc)) == ok, schema_errors(doc)


@pytest.mark.parametrize("spec", CLUSTER_SPECS, ids=SPEC_IDS)
def test_groups_follow_the_operators_rules(spec):
    """What the KubeRay operator refuses beyond the schema (ray-operator/controllers/ray/utils/validation.go)."""
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and all(re.match(DNS1035, n) for n in names), names
    for name, group in groups(spec).items():
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{name}: Ray labels go in the group's `labels` field"
        assert not (group.get("resources") and params.keys() & {"num-cpus", "num-gpus", "memory", "resources"}), \
            f"{name}: resources in both rayStartParams and the `resources` field"
        for key, value in group.get("labels", {}).items():
            assert re.match(LABEL_KEY, key) and re.match(LABEL_VALUE, value), (name, key, value)
        # autoscaler v2 replaces failed pods itself: restartPolicy Never or unset
        assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", name


# -- one cluster, two routes: the manifests agree with cluster.yaml --------------------------------------

def test_raycluster_mirrors_the_launcher_config(launcher):
    kuberay = autoscaling_config(CLUSTER["spec"])
    launched, head = launcher["available_node_types"], launcher["head_node_type"]
    assert kuberay["available_node_types"]["headgroup"]["resources"]["CPU"] == launched[head]["resources"]["CPU"] == 0
    assert kuberay["idle_timeout_minutes"] == launcher["idle_timeout_minutes"]
    workers = {name.replace("_", "-"): t for name, t in launched.items() if name != head}
    types = {name: t for name, t in kuberay["available_node_types"].items() if name != "headgroup"}
    assert types.keys() == workers.keys()
    for name, t in types.items():
        want = workers[name]
        assert (t["min_workers"], t["max_workers"]) == (want["min_workers"], want["max_workers"]), name
        assert t["resources"].get("GPU", 0) == want["resources"].get("GPU", 0), name
        assert custom_resources(t["resources"]) == custom_resources(want["resources"]), name
        # pods fit the same instance types after the kubelet's share, so they may have fewer CPUs
        assert 0 < t["resources"]["CPU"] <= want["resources"]["CPU"], name


@pytest.mark.parametrize("spec", CLUSTER_SPECS, ids=SPEC_IDS)
def test_gpu_groups_declare_their_accelerator_type(spec):
    """accelerator_type="X" asks for the resource accelerator_type:X, a label_selector for the label
    ray.io/accelerator-type; a group declares both so that the autoscaler can start it for either."""
    known = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    for name, t in autoscaling_config(spec)["available_node_types"].items():
        declared = {k.split(":", 1)[1] for k in t["resources"] if k.startswith("accelerator_type:")}
        label = t["labels"].get("ray.io/accelerator-type")
        if t["resources"].get("GPU", 0):
            assert declared == {label} and label in known, (name, declared, label)
        else:
            assert not declared and label is None, name


@pytest.mark.parametrize("job", RAYJOBS, ids=lambda j: j["metadata"]["name"])
def test_rayjob_clusters_are_made_of_the_rayclusters_groups(job):
    spec, reference = job["spec"]["rayClusterSpec"], CLUSTER["spec"]
    assert {k: v for k, v in spec.items() if k != "workerGroupSpecs"} == \
        {k: v for k, v in reference.items() if k != "workerGroupSpecs"}
    theirs = groups(reference)
    for name, group in groups(spec).items():
        assert name in theirs, f"{name} is not a group of raycluster.yaml"
        ours, its = dict(group), dict(theirs[name])
        ours.pop("replicas", None), its.pop("replicas", None)  # the initial pod count may differ
        assert ours == its, f"{name} drifted from raycluster.yaml"


def test_pods_reach_s3_through_irsa_never_keys(launcher):
    role = ACCOUNT["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in launcher["available_node_types"].values()}
    assert {role.rsplit("/", 1)[1]} == profiles, "the same S3 role as the launcher's instance profile"
    for spec in CLUSTER_SPECS:
        for pod in pod_specs(spec):
            assert pod["serviceAccountName"] == ACCOUNT["metadata"]["name"]
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("AWS_REGION") == launcher["provider"]["region"], container["name"]
                assert not env.keys() & KEY_ENV and "envFrom" not in container, container["name"]
    for path in KUBERAY.glob("*.yaml"):
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", path.read_text(), re.IGNORECASE), path


def test_every_pod_runs_the_image_of_the_dockerfile():
    images = {c["image"] for spec in CLUSTER_SPECS for pod in pod_specs(spec) for c in pod["containers"]}
    assert len(images) == 1, images
    (base,) = [args for op, args in dockerfile() if op == "ARG" and args.startswith("BASE_IMAGE=")]
    ray_version = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", base).group(1)
    assert {spec["rayVersion"] for spec in CLUSTER_SPECS} == {ray_version}


# -- the jobs run real entry points, as documented -------------------------------------------------------

def documented_commands() -> list[list[str]]:
    """Every `python -m ...` command line in docs/cluster.md's bash blocks, as argv."""
    text = re.sub(r"\\\n", " ", (ROOT / "docs" / "cluster.md").read_text())
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            starts = [i for i in range(len(argv) - 1) if argv[i:i + 2] == ["python", "-m"]]
            commands += [argv[starts[0]:]] if starts else []
    return commands


def entrypoint(job: dict):
    """A RayJob's argv, its parsed options and the config the entry point would run with."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2] in ENTRY_POINTS, argv
    args = build_parser(argv[2], "", []).parse_args(argv[3:])
    return argv, args, load_config(ROOT / args.config, args.overrides, input=args.input, output=args.output)


@pytest.mark.parametrize("job", RAYJOBS, ids=lambda j: j["metadata"]["name"])
def test_rayjob_runs_a_documented_entry_point_with_a_real_config(job):
    argv, args, cfg = entrypoint(job)
    assert callable(importlib.import_module(argv[2]).main)
    config = ROOT / args.config
    assert config.parent == ROOT / "configs" and config.is_file(), args.config
    assert argv in documented_commands(), "the RayJob runs a command that docs/cluster.md does not show"
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    # the driver resolves configs/ in the image's copy of the project
    workdir = [args for op, args in dockerfile() if op == "WORKDIR"][-1]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": workdir}
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] >= 0


def test_training_job_fits_its_train_node():
    (job,) = [j for j in RAYJOBS if "training.launch" in j["spec"]["entrypoint"]]
    train = entrypoint(job)[2].train
    (node,) = [t for name, t in autoscaling_config(job["spec"]["rayClusterSpec"])["available_node_types"].items()
               if name != "headgroup"]
    per_worker = {"CPU": train.cpus_per_worker, "GPU": 1 if train.use_gpu else 0, **train.resources}
    for key, amount in per_worker.items():
        assert amount * train.num_workers <= node["resources"].get(key, 0), key  # all workers on one node


def test_annotation_pools_fit_the_gpu_workers():
    (job,) = [j for j in RAYJOBS if "pipeline.prepare" in j["spec"]["entrypoint"]]
    annotate = entrypoint(job)[2].annotate
    gpu = autoscaling_config(job["spec"]["rayClusterSpec"])["available_node_types"]["gpu-worker"]
    pools = [p for p in (annotate.captions, annotate.grounding, annotate.embeddings, annotate.encode) if p.enabled]
    for pool in pools:
        assert pool.num_gpus <= gpu["resources"]["GPU"] and pool.num_cpus <= gpu["resources"]["CPU"], pool
    # all pools' actors at once: more GPUs than the group can ever add would leave prepare waiting
    assert sum(p.num_gpus * p.pool_size for p in pools) <= gpu["resources"]["GPU"] * gpu["max_workers"]


# -- the image ---------------------------------------------------------------------------------------------

def test_image_pins_the_torch_of_every_install_and_then_installs_the_project():
    steps = dockerfile()
    runs = [args for op, args in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(i for i, r in enumerate(runs) if "/app[" in r)
    assert torch_at < project_at, "torch first, pinned, or the project's range pulls another build"
    assert torch_pin(runs[torch_at]) == torch_pin((ROOT / "Makefile").read_text()) \
        == torch_pin((ROOT / "cluster.yaml").read_text()) == "2.13.0"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_at]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    asked = re.search(r"/app\[([^\]]*)\]", runs[project_at]).group(1).split(",")
    assert set(asked) <= set(extras), f"extras {set(asked) - set(extras)} are not in pyproject.toml"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the pods run as the rayproject user"


def dockerignored(patterns: list[str], rel: str) -> bool:
    """Whether Docker leaves `rel` out of the build context: the last matching pattern wins, and a
    pattern that matches a folder takes everything under it."""
    parts, excluded = rel.split("/"), False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_no_model_weights_reach_the_image():
    for op, args in dockerfile():
        if op in ("COPY", "ADD"):
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            assert not any(s.endswith(WEIGHT_SUFFIXES) or ".cache" in s or "runs" in s or "://" in s
                           for s in sources), args
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".venv/lib/x.py", "runs/demo/shards/shard-000000.tar", ".cache/tiny/unet/model.safetensors",
                 "configs/models/unet.bin", "weights/sd15.ckpt", ".git/HEAD"):
        assert dockerignored(patterns, path), path
    # the context a build would send from this very checkout
    size, sent = 0, []
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        dirs[:] = [d for d in dirs if not dockerignored(patterns, os.path.normpath(os.path.join(rel, d)))]
        for name in files:
            path = os.path.normpath(os.path.join(rel, name))
            if not dockerignored(patterns, path):
                sent.append(path)
                size += os.path.getsize(ROOT / path)
    assert not [p for p in sent if p.endswith(WEIGHT_SUFFIXES)]
    assert "pyproject.toml" in sent and "configs/sd15.yaml" in sent
    assert size < 20 * 2**20, f"build context of {size / 2**20:.0f} MiB: something large is not ignored"
