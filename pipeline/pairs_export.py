"""``python -m pipeline.pairs_export``: a prepared run's LR/HR pairs as plain image folders.

The held-out evaluation set of ``make demo``: the pairs of the last ``--last`` shards of
``PREPARED/shards`` (the shards ``training.launch`` holds out with ``train.val_shards``) are written as
``OUTPUT/lr/{key}.png`` and ``OUTPUT/hr/{key}.png``, the folders ``pipeline.upscale`` takes as input
and ``pipeline.evaluate`` as reference. Falls back to ``PREPARED/pairs`` when the annotate phase did
not run. Local or ``s3://`` on both sides.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.annotate_phase import FINAL_DIR
from pipeline.shard_phase import PAIRS_DIR
from pipeline.shards import decode_member, done_indices, encode_png, load_marker, read_tar, shard_name
from pipeline.storage import Store, open_store

log = logging.getLogger("pipeline.pairs_export")


def shard_folder(prepared: Store) -> Store:
    """``PREPARED/shards`` if it holds finished shards, else ``PREPARED/pairs``."""
    for name in (FINAL_DIR, PAIRS_DIR):
        folder = prepared.child(name)
        if done_indices(folder):
            return folder
    raise FileNotFoundError(f"no finished shards under {prepared.url(FINAL_DIR)} or {prepared.url(PAIRS_DIR)}: "
                            "run python -m pipeline.prepare first")


def export_pairs(prepared: Store, out: Store, last: int = 1, limit: int | None = None) -> list[str]:
    """Write the LR/HR pairs of the last ``last`` finished shards; returns the keys written."""
    folder = shard_folder(prepared)
    # the shards training holds out: the last ones that hold samples (training skips empty shards too)
    indices = [i for i in sorted(done_indices(folder)) if load_marker(folder, i)["count"]][-last:]
    keys: list[str] = []
    for index in indices:
        for key, members in read_tar(folder.read(shard_name(index))):
            if limit is not None and len(keys) >= limit:
                return keys
            if "lr.png" not in members or "hr.png" not in members:
                continue
            # decoded and re-encoded so the files are exactly what the shard's readers see
            out.write(f"lr/{key}.png", encode_png(decode_member("lr.png", members["lr.png"])))
            out.write(f"hr/{key}.png", encode_png(decode_member("hr.png", members["hr.png"])))
            keys.append(key)
    log.info("exported %d pairs from shards %s of %s", len(keys), indices, folder.uri)
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pairs_export", description=__doc__.split("\n")[0])
    parser.add_argument("--input", default="runs/demo", help="a prepare output (holding shards/ or pairs/)")
    parser.add_argument("--output", default=None, help="where lr/ and hr/ go (default: INPUT/heldout)")
    parser.add_argument("--last", type=int, default=1, help="export the last N shards (the held-out ones)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prepared = open_store(args.input)
    out = open_store(args.output) if args.output else prepared.child("heldout")
    try:
        keys = export_pairs(prepared, out, args.last, args.limit)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {len(keys)} pairs: {out.url('lr')} and {out.url('hr')}")
    return 0 if keys else 1


if __name__ == "__main__":
    sys.exit(main())
