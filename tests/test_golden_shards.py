"""The demo shards are byte-identical to those recorded before the layout move (issue 11).

``tests/data/demo_shards.sha256`` holds the sha256 of every pairs and final shard that
``python -m pipeline.prepare`` wrote on the bundled sample photos with the tiny profile, recorded
from main before ``spasem/`` existed. A refactor that changes a byte of a shard fails here; a change
meant to alter shards (a new preset default, another grounding image) updates the table and says why
in its commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.prepare import main as prepare_main

RECORDED = Path(__file__).parent / "data" / "demo_shards.sha256"


def _recorded() -> dict[str, str]:
    rows = [line.split() for line in RECORDED.read_text().splitlines() if line.strip()]
    return {name: digest for digest, name in rows}


@pytest.mark.slow
def test_demo_shards_are_byte_identical_to_the_recorded_ones(tmp_path, tiny, ray_cluster):
    cache = Path(tiny["sd"]).parents[1]
    assert prepare_main(["--output", str(tmp_path), "--set", f"models.cache_dir={cache}"]) == 0
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "shards").glob("*.tar"))}
    found |= {f"pairs/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((tmp_path / "pairs").glob("*.tar"))}
    assert found == _recorded()
