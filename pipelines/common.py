"""Shared command-line plumbing: dataset arguments and loading (preparing the data: csmf_tf.data.prepared)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import csmf_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)
from csmf_tf.data import adapters
from csmf_tf.data.synthetic import default_dataset, generate_cascade, read_csv, read_tfrecord
from csmf_tf.data.table import InteractionTable
from csmf_tf.data.prepared import PreparedData, prepare, prepare_streaming  # noqa: F401  (used by the pipelines)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CSMF_SHARED_DIR", REPO.parent / "shared")) / "data"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="synthetic", choices=["synthetic", "beibei", "movielens", "csv"],
                       help="synthetic: the embedded generator; beibei: ../shared/data/beibei_cascade_ai607; "
                            "movielens: ../shared/data/movielens_latest_small (rated -> rating>=4 -> rating>=4.5, "
                            "genre and year item features); csv: any CSV/TSV through the generic adapter (--csv-spec)")
    group.add_argument("--data-path", help="file for beibei/csv (default beibei: task1_val_answers.tsv); for "
                                           "movielens the folder holding ratings.csv and movies.csv")
    group.add_argument("--csv-spec", help="JSON file with read_generic arguments (column_mapping, labels, ...)")
    group.add_argument("--num-users", type=int, help="synthetic size (default: the embedded default dataset)")
    group.add_argument("--num-items", type=int)
    group.add_argument("--num-exposures", type=int)
    group.add_argument("--data-seed", type=int, default=0)
    group.add_argument("--on-bad-rows", default="error", choices=["error", "skip"])


def load_table(args: argparse.Namespace) -> InteractionTable:
    if args.dataset == "synthetic":
        if args.num_users:
            return generate_cascade(args.num_users, args.num_items, args.num_exposures, seed=args.data_seed)
        return default_dataset(seed=args.data_seed)
    if args.dataset == "beibei":
        path = args.data_path or shared_data_dir() / "beibei_cascade_ai607" / "task1_val_answers.tsv"
        return adapters.read_beibei(path, on_bad_rows=args.on_bad_rows)
    if args.dataset == "movielens":
        path = args.data_path or shared_data_dir() / "movielens_latest_small"
        return adapters.read_movielens(path, on_bad_rows=args.on_bad_rows)
    if not (args.data_path and args.csv_spec):
        raise SystemExit("--dataset csv needs --data-path and --csv-spec")
    spec = json.loads(Path(args.csv_spec).read_text())
    return adapters.read_generic(args.data_path, on_bad_rows=args.on_bad_rows, **spec)


def add_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("streaming (train from TFRecord shards instead of a table)")
    group.add_argument("--train-tfrecords", metavar="GLOB",
                       help="training shards, streamed every epoch (e.g. 'data/big/cascade-*.tfrecord'); "
                            "replaces --dataset and needs --holdout")
    group.add_argument("--holdout", metavar="PATH",
                       help="held-out rows (TFRecord file/glob or CSV with its schema), e.g. the "
                            "<name>_holdout.tfrecord of generate_data --holdout-users; split in time halves "
                            "into validation and test")
    group.add_argument("--shuffle-buffer", type=int, default=65_536,
                       help="records in the streaming shuffle buffer")


def load_holdout(path: str) -> InteractionTable:
    """A holdout table: CSV (``write_csv`` format) or TFRecord file(s) (``write_tfrecord`` format)."""
    return read_csv(path) if str(path).endswith((".csv", ".tsv")) else read_tfrecord(path)
