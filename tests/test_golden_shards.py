"""The demo shards are byte-identical to the recorded ones.

``tests/data/demo_shards.sha256`` holds the sha256 of every pairs and final shard that
``python -m pipeline.prepare`` wrote on the bundled sample photos with the tiny profile (the session's
``demo_prepared`` run, which tests/test_annotate.py also reads). First recorded before the layout move
(issue 11); re-recorded when the PNG writer changed (spasem/png.py: every PNG decodes to the
same pixels as before, every other member stayed byte-identical), and when the degradations took the
papers' torch ops (``ops: torch`` in the record: F.interpolate's mapping and area mode, BasicSR's DiffJPEG
at a float quality), which changed every LR and record; then for the mirrored crops (``flip``), and
for the captions in XPSR's prompt format (only the final shards changed), and when the captions stage
asked the quality prompt about the HR too (``low_hr`` in caption.json, ``text_low_hr.npy``; only the final
shards changed). A refactor that changes a byte of a
shard fails here; a change meant to alter shards (a new preset default, another grounding image)
updates the table and says why in its commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

RECORDED = Path(__file__).parent / "data" / "demo_shards.sha256"


def _recorded() -> dict[str, str]:
    rows = [line.split() for line in RECORDED.read_text().splitlines() if line.strip()]
    return {name: digest for digest, name in rows}


@pytest.mark.slow
def test_demo_shards_are_byte_identical_to_the_recorded_ones(demo_prepared):
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((demo_prepared / "shards").glob("*.tar"))}
    found |= {f"pairs/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((demo_prepared / "pairs").glob("*.tar"))}
    assert found == _recorded()
