"""cluster.yaml's setup_commands, run verbatim in bash as the cluster launcher runs them on a new node,
install this project so that its packages import from any folder and the head can serve the dashboard
that `ray job submit` talks to."""

from __future__ import annotations

import os
import re
import shutil
import site
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# what file_mounts would not copy from a checkout: environments, outputs, caches, build leftovers
NOT_MOUNTED = shutil.ignore_patterns(".venv", ".git", "runs", ".cache", "__pycache__", "*.egg-info", "build",
                                     ".pytest_cache", ".ruff_cache")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_setup_commands_quote_no_tilde(cluster):
    """Inside quotes (needed for the [extras] brackets) bash leaves ~ alone, and pip then looks for a
    folder literally named "~"."""
    for command in cluster["setup_commands"]:
        assert not re.search(r"[\"']~", command), command


def test_setup_commands_ask_for_extras_the_project_has(cluster):
    extras = set(pyproject()["project"]["optional-dependencies"])
    asked = [e.strip() for c in cluster["setup_commands"] for group in re.findall(r"spasem-sr\[([^\]]*)\]", c)
             for e in group.split(",")]
    assert asked and set(asked) <= extras, f"extras {set(asked) - extras} are not in pyproject.toml"


def index_reachable() -> bool:
    host = urlparse(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def run(command: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{output}"
    return done


@pytest.mark.slow
def test_setup_commands_install_the_project_on_a_new_node(cluster, tmp_path):
    if not index_reachable():
        pytest.skip("setup_commands install from the package index, which this machine cannot reach")
    home = tmp_path / "home"
    home.mkdir()
    (remote, local), = cluster["file_mounts"].items()
    project = home / remote.removeprefix("~/")
    shutil.copytree(ROOT / local, project, ignore=NOT_MOUNTED)

    # The node's python: a fresh virtual environment on top of this test's packages (torch, ray, ...),
    # as a node image has them preinstalled, so pip finds them and downloads only what is missing.
    # `venv --system-site-packages` run from a venv would expose the base interpreter's packages, not
    # this environment's, hence the .pth line. It adds the folder only: the editable install of this
    # checkout recorded there stays inactive, so the imports below can only succeed through the node's.
    node = tmp_path / "node-python"
    subprocess.run([sys.executable, "-m", "venv", str(node)], check=True, timeout=300)
    (node_site,) = (node / "lib").glob("python3*/site-packages")
    (node_site / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HOME=str(home), VIRTUAL_ENV=str(node), PATH=f"{node / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # pip's download cache is the only thing shared with this machine (it caches, it changes nothing)
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    for command in cluster["setup_commands"]:
        run(command, env, home)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    packages = [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    names = ", ".join(packages)
    found = run(f"python -c 'import {names}; print(*[m.__file__ for m in ({names},)])'", env, elsewhere)
    files = [Path(f).resolve() for f in found.stdout.split()]
    assert len(files) == len(packages) and all(f.is_relative_to(project.resolve()) for f in files), files
    # what the head's dashboard (and so the job server behind `ray job submit`) needs, as Ray checks it
    run("python -c 'import ray.dashboard.optional_deps'", env, elsewhere)

    bashrc = (home / ".bashrc").read_text()
    assert re.search(r"^export SPASEM_BUCKET=s3://\S+$", bashrc, re.MULTILINE), bashrc
    (line,) = [c for c in cluster["setup_commands"] if ".bashrc" in c]
    run(line, env, home)  # setup commands run again on every `ray up`
    assert (home / ".bashrc").read_text().count("SPASEM_BUCKET") == 1
