"""Generate the synthetic exposure -> click -> conversion cascade and write it to disk.

Example::

    python -m pipelines.generate_data --num-users 3000 --num-items 2000 --num-exposures 150000 \\
        --seed 0 --out-dir data/synthetic --format both --shards 4

Writes ``<out-dir>/<name>.csv`` and/or ``<out-dir>/<name>[-0000k-of-0000N].tfrecord`` plus
``<out-dir>/<name>.schema.json``, and prints row / user / item counts and the label rate per objective.

``--format tfrecord`` writes the shards chunk by chunk without building the table (10^7 rows fit in a
few hundred MB); ``--holdout-users F`` then also writes ``<name>_holdout.tfrecord``: the last
``--holdout-time`` of the time range of a seeded sample ``F`` of the users, kept out of the shards (the
validation/test rows for ``python -m pipelines.train_cascade --train-tfrecords ... --holdout ...``)::

    python -m pipelines.generate_data --num-users 100000 --num-items 10000 --num-exposures 10000000 \
        --out-dir data/big --format tfrecord --shards 16 --holdout-users 0.02
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported (TFRecord writer)

from csmf_tf.data.files import write_csv, write_tfrecord  # noqa: E402
from csmf_tf.data.synthetic import (DEFAULT_NUM_EXPOSURES, DEFAULT_NUM_ITEMS,  # noqa: E402
                                    DEFAULT_NUM_USERS, generate_cascade, write_cascade_tfrecord)
from csmf_tf.data.table import InteractionTable  # noqa: E402


def summarize_counts(rows: int, users: int, items: int, positives: dict[str, int]) -> str:
    """Human-readable counts: rows, users, items, and per objective (cascade order) positives and rate."""
    lines = [f"rows={rows:,} users={users:,} items={items:,}"]
    n = max(rows, 1)
    names = list(positives)
    for t, name in enumerate(names):
        pos = positives[name]
        parent = positives[names[t - 1]] if t else n
        lines.append(f"  {name:<12} positives={pos:>10,}  rate={pos / n:7.3%} of rows"
                     + (f", {pos / max(parent, 1):7.3%} of {names[t - 1]}" if t else ""))
    return "\n".join(lines)


def summarize(table: InteractionTable) -> str:
    """:func:`summarize_counts` of a table."""
    import numpy as np

    return summarize_counts(len(table), len(np.unique(table.user_id)), len(np.unique(table.item_id)),
                            {o: int(table.labels[:, t].sum()) for t, o in enumerate(table.objectives)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-users", type=int, default=DEFAULT_NUM_USERS)
    p.add_argument("--num-items", type=int, default=DEFAULT_NUM_ITEMS)
    p.add_argument("--num-exposures", type=int, default=DEFAULT_NUM_EXPOSURES)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="output folder (created if missing)")
    p.add_argument("--name", default="cascade", help="file stem (default: cascade)")
    p.add_argument("--format", choices=("csv", "tfrecord", "both"), default="csv")
    p.add_argument("--shards", type=int, default=1, help="number of TFRecord shards")
    p.add_argument("--holdout-users", type=float, default=0.0,
                   help="tfrecord only: fraction of users whose late rows go to <name>_holdout.tfrecord")
    p.add_argument("--holdout-time", type=float, default=0.2,
                   help="the late part of the time range held out for those users (default 0.2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.shards < 1:
        build_parser().error(f"--shards must be >= 1; got {args.shards}")
    if args.holdout_users and args.format != "tfrecord":
        build_parser().error("--holdout-users needs --format tfrecord")
    start = time.perf_counter()
    out = os.path.join(args.out_dir, args.name)
    if args.format == "tfrecord":
        # Chunked: the table is never built, so 10^7 rows and more fit in memory.
        try:
            files = write_cascade_tfrecord(out, args.num_users, args.num_items, args.num_exposures,
                                           num_shards=args.shards, seed=args.seed, latent_dim=args.latent_dim,
                                           holdout_users=args.holdout_users, holdout_time=args.holdout_time)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"generated and written in {time.perf_counter() - start:.2f}s (seed {args.seed})")
        total = {o: files.positives[o] + files.holdout_positives[o] for o in files.positives}
        print(summarize_counts(files.rows + files.holdout_rows, files.num_users, files.num_items, total))
        for p in files.paths:
            print(f"wrote {p}")
        if files.holdout_path is not None:
            print(f"wrote {files.holdout_path} (holdout: {files.holdout_rows:,} rows, "
                  + ", ".join(f"{o}={c:,}" for o, c in files.holdout_positives.items()) + ")")
        return 0
    try:
        table = generate_cascade(args.num_users, args.num_items, args.num_exposures, seed=args.seed,
                                 latent_dim=args.latent_dim)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"generated in {time.perf_counter() - start:.2f}s (seed {args.seed})")
    print(summarize(table))
    if args.format in ("csv", "both"):
        print(f"wrote {write_csv(table, out + '.csv')}")
    if args.format == "both":  # "tfrecord" alone took the chunked path above
        for p in write_tfrecord(table, out, num_shards=args.shards):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
