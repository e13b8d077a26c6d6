"""``python -m pipeline.pairs_export``: a prepared run's LR/HR pairs as plain image folders.

The held-out evaluation set of ``make demo``: the pairs of the last ``--last`` shards of
``PREPARED/shards`` (the shards ``training.launch`` holds out with ``train.val_shards``) are written as
``OUTPUT/lr/{key}.png`` and ``OUTPUT/hr/{key}.png``, the folders ``pipeline.upscale`` takes as input
and ``pipeline.evaluate`` as reference. Falls back to ``PREPARED/pairs`` when the annotate phase did
not run. Local or ``s3://`` on both sides; ``--config``/``--set`` as every entry point (``storage.*``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from spasem.config import build_parser, parse_cli
from spasem.shards import (
    FINAL_DIR,
    PAIRS_DIR,
    decode_member,
    encode_png,
    list_shards,
    read_tar,
    split_holdout,
)
from spasem.storage import Store
from stages.runtime import error_line, user_errors

log = logging.getLogger("pipeline.pairs_export")


def export_pairs(prepared: Store, out: Store, last: int = 1, limit: int | None = None) -> list[str]:
    """Write the LR/HR pairs of the last ``last`` finished shards; returns the keys written."""
    folder, shards = list_shards(prepared)
    if not shards:
        raise FileNotFoundError(f"no finished shards under {prepared.url(FINAL_DIR)} or {prepared.url(PAIRS_DIR)}: "
                                "run python -m pipeline.prepare first")
    # the shards training holds out with train.val_shards: the same rule, the same code
    _, held = split_holdout(shards, last)
    keys: list[str] = []
    for shard in held:
        for key, members in read_tar(folder.read(shard.rel)):
            if limit is not None and len(keys) >= limit:
                return keys
            if "lr.png" not in members or "hr.png" not in members:
                continue
            # decoded and re-encoded so the files are exactly what the shard's readers see
            out.write(f"lr/{key}.png", encode_png(decode_member("lr.png", members["lr.png"])))
            out.write(f"hr/{key}.png", encode_png(decode_member("hr.png", members["hr.png"])))
            keys.append(key)
    log.info("exported %d pairs from %s of %s", len(keys), [s.rel for s in held], folder.uri)
    return keys


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m pipeline.pairs_export", __doc__.split("\n")[0], ("storage",))
    parser.add_argument("--last", type=_count, default=1,
                        help="export the last N non-empty shards (the ones train.val_shards=N holds out); 0: none")
    parser.add_argument("--limit", type=_count, default=None, help="at most this many pairs")
    args, cfg = parse_cli(parser, argv, "runs/demo", "")
    prepared = cfg.storage.open(cfg.input)
    out = cfg.storage.open(args.output) if args.output else prepared.child("heldout")
    try:
        keys = export_pairs(prepared, out, args.last, args.limit)
    except user_errors() as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    print(f"exported {len(keys)} pairs: {out.url('lr')} and {out.url('hr')}")
    return 0 if keys or args.last == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
