"""The layering rule of DESIGN.md "Layout", pinned on the AST of every module (function bodies included).

spasem imports nothing of ours; stages import spasem; pipeline imports spasem and stages; training
imports spasem and stages; pipeline and training never import each other; nothing imports tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spasem", "stages", "pipeline", "training")
ALLOWED = {
    "spasem": {"spasem"},
    "stages": {"spasem", "stages"},
    "pipeline": {"spasem", "stages", "pipeline"},
    "training": {"spasem", "stages", "training"},
    "benchmarks": {"spasem", "stages", "pipeline", "training"},
}
OURS = (*PACKAGES, "tests", "benchmarks")


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import anywhere in the module, relative imports excluded."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str, source: str, filename: str = "<src>") -> list[str]:
    allowed = ALLOWED[package]
    return [
        f"{filename}:{line} imports {top}"
        for line, top in imported_packages(ast.parse(source, filename))
        if top in OURS and top not in allowed
    ]


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(ALLOWED))
def test_imports_run_one_way(package):
    files = _modules(package)
    assert files, f"no modules under {package}/"
    bad = [v for f in files for v in violations(package, f.read_text(), str(f.relative_to(ROOT)))]
    assert not bad, "imports against DESIGN.md's layering:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions():
    src = "import numpy\n\ndef f():\n    from training.loop import x\n    import pipeline.prepare\n"
    assert violations("stages", src) == ["<src>:4 imports training", "<src>:5 imports pipeline"]
    assert violations("spasem", "from stages import read\n") == ["<src>:1 imports stages"]
    assert violations("pipeline", "from training import losses\n") == ["<src>:1 imports training"]
    assert violations("training", "import pipeline.upscale\n") == ["<src>:1 imports pipeline"]
    assert violations("training", "from stages.read import ReadImages\nimport spasem.config\n") == []


def test_spasem_imports_no_ray():
    bad = [
        f"{f.relative_to(ROOT)}:{line}"
        for f in _modules("spasem")
        for line, top in imported_packages(ast.parse(f.read_text()))
        if top == "ray"
    ]
    assert not bad, f"spasem must run without Ray: {bad}"
