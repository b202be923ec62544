"""Shared command-line plumbing: dataset arguments and loading (preparing the data: csmf_tf.data.prepared),
input checks that stop with one line naming the file and what was expected, and output settings."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import json
import os
from pathlib import Path

import csmf_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)
from csmf_tf.data import adapters
from csmf_tf.data.files import read_csv, read_tfrecord
from csmf_tf.data.synthetic import default_dataset, generate_cascade
from csmf_tf.data.table import InteractionTable
from csmf_tf.data.prepared import PreparedData
from csmf_tf.data.splits import SPLIT_METHODS
from csmf_tf.data.validation import BadRowsError, LabelRule

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
    group.add_argument("--split", choices=SPLIT_METHODS, default="auto",
                       help="train/validation/test rule (csmf_tf/data/splits.py): time = global time cut-offs, "
                            "user = per-pair hash, user_time = each user's own latest pairs; auto (default) = "
                            "time when the data has timestamps, else user")
    group.add_argument("--on-bad-rows", default="error", choices=["error", "skip"])


def load_table(args: argparse.Namespace) -> InteractionTable:
    """The table of the data flags. Wrong input (a missing file, a bad ``--csv-spec``, a file without the
    mapped columns, an empty file, an objective without positives) stops with ``SystemExit`` and one
    line naming the file, the column or rule, and what was expected; bad rows keep their report."""
    if args.dataset == "synthetic":
        if args.num_users:
            return generate_cascade(args.num_users, args.num_items, args.num_exposures, seed=args.data_seed)
        return default_dataset(seed=args.data_seed)
    if args.dataset == "beibei":
        path = args.data_path or shared_data_dir() / "beibei_cascade_ai607" / "task1_val_answers.tsv"
        return check_table(_read(lambda: adapters.read_beibei(path, on_bad_rows=args.on_bad_rows), path), path)
    if args.dataset == "movielens":
        path = args.data_path or shared_data_dir() / "movielens_latest_small"
        return check_table(_read(lambda: adapters.read_movielens(path, on_bad_rows=args.on_bad_rows), path), path)
    if not (args.data_path and args.csv_spec):
        raise SystemExit("--dataset csv needs --data-path (the CSV/TSV file) and --csv-spec (a JSON file with "
                         "read_generic's arguments: column_mapping, labels, ...)")
    spec = read_csv_spec(args.csv_spec)
    table = _read(lambda: adapters.read_generic(args.data_path, on_bad_rows=args.on_bad_rows, **spec),
                  args.data_path, args.csv_spec)
    return check_table(table, args.data_path, {o: str(r) for o, r in spec["labels"].items()}, args.csv_spec)


#: The keys a ``--csv-spec`` may hold: :func:`csmf_tf.data.adapters.read_generic`'s arguments.
CSV_SPEC_KEYS = tuple(k for k in inspect.signature(adapters.read_generic).parameters
                      if k not in ("path", "on_bad_rows"))
_RULE_HELP = "0 or 1, a 0/1 column name, or '<column><op><number>' with op one of >=, >, ==, <=, <"


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_csv_spec(path: str | os.PathLike) -> dict:
    """``--csv-spec``: a JSON object of :func:`~csmf_tf.data.adapters.read_generic` arguments, checked
    key by key (unknown or missing keys, ``column_mapping`` keys, every label rule) before the data is read."""
    where = f"--csv-spec {path}"
    if not Path(path).is_file():
        raise SystemExit(f"{where}: no such file; expected a JSON file with read_generic's arguments "
                         "(column_mapping, labels, ...)")
    try:
        spec = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = f"{error.msg} at line {error.lineno} column {error.colno}" if isinstance(
            error, json.JSONDecodeError) else str(error)
        raise SystemExit(f"{where}: not valid JSON ({detail}); expected an object such as "
                         '{"column_mapping": {"user_id": "uid", "item_id": "iid"}, "labels": {...}}') from None
    if not isinstance(spec, dict):
        raise SystemExit(f"{where}: expected a JSON object of read_generic arguments, got {type(spec).__name__}")
    for key in spec:
        if key not in CSV_SPEC_KEYS:
            raise SystemExit(f"{where}: unknown key {key!r}{_did_you_mean(key, CSV_SPEC_KEYS)}; expected keys "
                             f"among {', '.join(CSV_SPEC_KEYS)}")
    for key, example in (("column_mapping", '{"user_id": "<column>", "item_id": "<column>"}'),
                         ("labels", '{"exposure": "1", "click": "<column>", "conversion": "<column>>=1"}')):
        if key not in spec:
            raise SystemExit(f"{where}: missing key {key!r}; expected e.g. \"{key}\": {example}")
        if not isinstance(spec[key], dict) or not spec[key]:
            raise SystemExit(f"{where}: {key!r} must be a non-empty JSON object, e.g. {example}; got {spec[key]!r}")
    mapping = spec["column_mapping"]
    for key in mapping:
        if key not in ("user_id", "item_id", "timestamp"):
            raise SystemExit(f"{where}: column_mapping key {key!r}{_did_you_mean(key, ('user_id', 'item_id'))} "
                             "is not one of user_id, item_id, timestamp")
    for key in ("user_id", "item_id"):
        if key not in mapping:
            raise SystemExit(f"{where}: column_mapping has no {key!r}; expected the column (or list of "
                             f"columns) holding the {key.split('_')[0]} id")
    for objective, rule in spec["labels"].items():
        try:
            LabelRule.parse(rule)
        except ValueError:
            raise SystemExit(f"{where}: labels[{objective!r}] = {rule!r} is not a label rule; expected "
                             f"{_RULE_HELP}") from None
    return spec


def _read(read, path, spec_path=None) -> InteractionTable:
    """``read()`` with its errors as one line (bad-row reports keep their lines: they list the rows)."""
    try:
        return read()
    except BadRowsError as error:
        raise SystemExit(str(error)) from None
    except FileNotFoundError as error:
        text = str(error) if not error.filename else f"no such file: {error.filename}"
        raise SystemExit(f"--data-path: {text}") from None
    except (ValueError, TypeError) as error:
        message = " ".join(str(error).split())
        if "not found; the file has" in message and spec_path is not None:
            message += f" (expected by --csv-spec {spec_path})"
        elif str(path) not in message:
            message = f"{path}: {message}" + (f" (--csv-spec {spec_path})" if spec_path is not None else "")
        raise SystemExit(message) from None


def check_table(table: InteractionTable, path, rules: dict[str, str] | None = None,
                spec_path=None) -> InteractionTable:
    """Stop when the file has no rows or an objective has no positive row."""
    if len(table) == 0:
        raise SystemExit(f"{path}: no data rows; expected one row per (user, item) interaction after the header")
    for objective in table.objectives:
        if int(table.positives(objective).sum()) == 0:
            rule = f" (label rule {rules[objective]!r} of --csv-spec {spec_path})" if rules and objective in rules else ""
            raise SystemExit(f"{path}: objective {objective!r} has no positive row{rule} in {len(table):,} rows; "
                             "expected at least one positive per objective")
    return table


def data_source(args: argparse.Namespace) -> str:
    """The data flags in words, for messages."""
    if args.dataset in ("csv", "beibei", "movielens") and args.data_path:
        return str(args.data_path)
    return f"--dataset {args.dataset}"


def check_objectives(table: InteractionTable, objectives, args: argparse.Namespace) -> None:
    """Stop when a training objective is not one of the data's, or they are out of cascade order (a
    prefix or subsequence of the data's objectives is fine)."""
    missing = [o for o in objectives if o not in table.objectives]
    positions = [table.objectives.index(o) for o in objectives if o in table.objectives]
    if missing or positions != sorted(positions):
        what = f"objective(s) {missing} of --objectives are not in the data" if missing else \
            "--objectives are not in the data's cascade order"
        raise SystemExit(f"{data_source(args)}: {what}; the data's objectives are {','.join(table.objectives)} "
                         f"(pass e.g. --objectives {','.join(table.objectives)})")


def check_prepared(data: PreparedData, args: argparse.Namespace, min_items: int = 50) -> None:
    """Stop before training when the splits cannot be scored: too few items for Recall@50, or an
    objective without positives in the validation or test split."""
    if len(data.items) < min_items:
        raise SystemExit(f"{data_source(args)}: {len(data.items)} items; expected at least {min_items} (training "
                         f"is early-stopped on validation Recall@{min_items} over the item catalog)")
    for split, evaluation in (("validation", data.validation), ("test", data.testing)):
        for objective in data.table.objectives:
            if objective not in evaluation.eval_sets:
                total = int(data.table.positives(objective).sum())
                raise SystemExit(f"{data_source(args)}: objective {objective!r} has {total:,} positive row(s), none "
                                 f"in the {split} split; expected positives in train, validation and test "
                                 "(more rows or a looser label rule)")


def add_shared_training_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The training choices both ``train_cascade`` and ``experiments`` take: ``--optimizer``,
    ``--sparse-embeddings`` and ``--hard-negative-correction`` (the TrainingConfig fields of those names)."""
    from csmf_tf.models.cascade import HARD_NEGATIVE_CORRECTIONS, NO_CORRECTION
    from csmf_tf.training.optimizers import ADAM, OPTIMIZERS

    parser.add_argument("--optimizer", default=ADAM, choices=list(OPTIMIZERS),
                        help="adam: tf-keras Adam (every embedding row updated every step); lazy_adam: only the "
                             "rows a batch touches (README: Training at scale)")
    parser.add_argument("--sparse-embeddings", action="store_true",
                        help="mask looked-up embedding rows instead of rewriting whole tables each step, owners "
                             "per column; with --optimizer lazy_adam a step costs the same at any catalogue size")
    parser.add_argument("--hard-negative-correction", default=NO_CORRECTION, choices=list(HARD_NEGATIVE_CORRECTIONS),
                        help="log-Q correction of cascade hard negatives: none (p = 1, default) or in_batch (their "
                             "item's share of the objective's positives, as an in-batch candidate; docs/method.md)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="details: Keras progress bars, TensorFlow's warnings and its C++ log lines "
                             "(start-up messages included); by default one line per epoch")


@contextlib.contextmanager
def native_stderr_to(path: Path, enabled: bool = True):
    """Send everything written to file descriptor 2 (C++ libraries' log lines: ScaNN's index builder
    logs through absl before any log level applies) to ``path`` while the block runs; its tail is
    printed if the block fails. Python's ``print`` (stdout) is untouched."""
    if not enabled:
        yield
        return
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        tail = path.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def configure_output(verbose: bool) -> int:
    """Quiet TensorFlow unless ``verbose``; returns the training ``verbose`` level (1: one line per
    epoch, 2: also Keras' progress bars).

    C++ log lines are set by ``TF_CPP_MIN_LOG_LEVEL`` before TensorFlow loads (``csmf_tf/__init__.py``;
    ``--verbose`` lifts it through ``pipelines/__init__.py``). Here: TensorFlow's and absl's Python
    loggers show errors only, and grappler's loop optimizer is off: it only skips the tfmot pruning
    wrappers' conditionals, with a warning each time a training step is traced (absl logs it before
    any log level applies).
    """
    import absl.logging
    import tensorflow as tf

    if verbose:
        return 2
    tf.get_logger().setLevel("ERROR")
    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.config.optimizer.set_experimental_options({"loop_optimization": False})
    return 1


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
