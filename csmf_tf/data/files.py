"""File formats of an :class:`~csmf_tf.data.table.InteractionTable`: CSV and sharded TFRecord, each with a
JSON schema sidecar (``<stem>.schema.json``: objectives, timestamp, feature kinds).

- :func:`write_csv` / :func:`read_csv`: one row per pair (``user_id, item_id[, timestamp], <objectives>,
  <features>``), read back through the validating reader (bad rows: file, line, reason);
- :func:`write_tfrecord` / :func:`read_tfrecord`: ``tf.train.Example`` records round-robin over
  ``<stem>-<k>-of-<n>.tfrecord`` shards (:func:`shard_paths`), the format
  :class:`~csmf_tf.data.streaming.TFRecordSource` streams;
- :func:`schema_path` / :func:`table_schema`: the sidecar.

The record field names (``user_id``, ``item_id``, ``label/<objective>``, ``user/<feature>``,
``item/<feature>``) are the file format, not the batch contract (:mod:`csmf_tf.data.features`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from csmf_tf.data.table import CATEGORICAL, NUMERIC, InteractionTable

SCHEMA_SUFFIX = ".schema.json"


def table_schema(table: InteractionTable) -> dict:
    """JSON-able description of a table's columns (written next to CSV/TFRecord files)."""
    return {"objectives": list(table.objectives), "has_timestamp": table.timestamp is not None,
            "user_features": {k: table.feature_kinds[k] for k in table.user_features},
            "item_features": {k: table.feature_kinds[k] for k in table.item_features}}


def schema_path(path: str | os.PathLike) -> Path:
    """Where the schema of ``path`` lives: ``<stem>.schema.json`` (shard suffixes removed)."""
    p = Path(path)
    stem = p.name
    for ext in (".csv", ".tsv", ".tfrecord"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    if "-of-" in stem:  # sharded name <stem>-00000-of-00004
        stem = stem.rsplit("-", 3)[0]
    return p.with_name(stem + SCHEMA_SUFFIX)


def _write_schema(table: InteractionTable, path: str | os.PathLike) -> None:
    schema_path(path).write_text(json.dumps(table_schema(table), indent=2) + "\n")


def _read_schema(path: str | os.PathLike) -> dict:
    sp = schema_path(path)
    if not sp.exists():
        raise FileNotFoundError(f"schema file {sp} (written by write_csv/write_tfrecord) not found for {path}")
    return json.loads(sp.read_text())


def _csv_header(schema: dict) -> list[str]:
    return (["user_id", "item_id"] + (["timestamp"] if schema["has_timestamp"] else [])
            + list(schema["objectives"]) + list(schema["user_features"]) + list(schema["item_features"]))


def write_csv(table: InteractionTable, path: str | os.PathLike) -> Path:
    """Write ``table`` as a CSV with a header, plus ``<stem>.schema.json`` (objectives, feature kinds).

    Columns: ``user_id, item_id, [timestamp], <objectives...>, <user features...>, <item features...>``.
    Numeric features are written with ``repr(float32)`` precision (round-trips exactly).
    """
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = table_schema(table)
    for name, col in [("user_id", table.user_id), ("item_id", table.item_id),
                      *[(k, v) for k, v in {**table.user_features, **table.item_features}.items()
                        if table.feature_kinds[k] == CATEGORICAL]]:
        bad = [s for s in np.unique(col.astype(str)) if any(c in s for c in ',"\n\r')]
        if bad:
            raise ValueError(f"column {name!r} holds values with a comma, quote or newline ({bad[0]!r}); "
                             "write_csv keeps the format simple and does not quote")
    cols: list[list[str]] = [table.user_id.astype(str).tolist(), table.item_id.astype(str).tolist()]
    if table.timestamp is not None:
        cols.append(table.timestamp.astype(str).tolist())
    cols += [table.labels[:, t].astype(str).tolist() for t in range(table.num_objectives)]
    for name, col in [*table.user_features.items(), *table.item_features.items()]:
        if table.feature_kinds[name] == NUMERIC:
            cols.append([repr(float(x)) for x in np.asarray(col, dtype=np.float32)])
        else:
            cols.append(np.asarray(col).astype(str).tolist())
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(_csv_header(schema))
        w.writerows(zip(*cols))
    _write_schema(table, path)
    return path


def read_csv(path: str | os.PathLike, on_bad_rows: str = "error",
             rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """Read a CSV written by :func:`write_csv` through the validating reader.

    The schema sidecar (``<stem>.schema.json``) gives objectives and feature kinds; every row is checked
    (see :func:`csmf_tf.data.validation.read_delimited`).
    """
    from csmf_tf.data.validation import LabelRule, TableSpec, read_delimited

    schema = _read_schema(path)
    spec = TableSpec(
        user_id="user_id", item_id="item_id",
        labels={o: LabelRule.parse(o) for o in schema["objectives"]},
        timestamp="timestamp" if schema["has_timestamp"] else None,
        user_features={k: (k, kind) for k, kind in schema["user_features"].items()},
        item_features={k: (k, kind) for k, kind in schema["item_features"].items()},
        delimiter=",", header=True)
    return read_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)


def shard_paths(path: str | os.PathLike, num_shards: int) -> list[Path]:
    """``<stem>.tfrecord`` for one shard, else ``<stem>-00000-of-0000N.tfrecord`` ..."""
    p = Path(path)
    stem = p.name[: -len(".tfrecord")] if p.name.endswith(".tfrecord") else p.name
    if num_shards == 1:
        return [p.with_name(stem + ".tfrecord")]
    return [p.with_name(f"{stem}-{k:05d}-of-{num_shards:05d}.tfrecord") for k in range(num_shards)]


#: Rows encoded per step by the TFRecord writers (bounds the writer's working memory, ~2 KB per row).
_WRITE_CHUNK_ROWS = 100_000


def _encode_rows(table: InteractionTable, first_row: int) -> list[bytes]:
    """Serialised ``tf.train.Example`` per row of ``table``; its row ``k`` is global row ``first_row + k``."""
    from csmf_tf.data.example_encoding import BYTES, FLOAT, INT64, encode_examples

    def text(column: np.ndarray) -> list[bytes]:
        return [s.encode() for s in np.asarray(column).astype(str)]

    columns: dict = {"user_id": (BYTES, text(table.user_id)), "item_id": (BYTES, text(table.item_id)),
                     "row": (INT64, np.arange(first_row, first_row + len(table), dtype=np.int64))}
    if table.timestamp is not None:
        columns["timestamp"] = (INT64, table.timestamp)
    for t, o in enumerate(table.objectives):
        columns[f"label/{o}"] = (INT64, table.labels[:, t])
    for side, feats in (("user", table.user_features), ("item", table.item_features)):
        for k, v in feats.items():
            columns[f"{side}/{k}"] = ((BYTES, text(v)) if table.feature_kinds[k] == CATEGORICAL
                                      else (FLOAT, np.asarray(v, dtype=np.float32)))
    return encode_examples(columns)


def _write_round_robin(writers: Sequence, records: Iterable[bytes], first_row: int) -> None:
    # Global row r goes to shard r % num_shards, whatever the chunking.
    for k, record in enumerate(records):
        writers[(first_row + k) % len(writers)].write(record)


def write_tfrecord(table: InteractionTable, path: str | os.PathLike, num_shards: int = 1) -> list[Path]:
    """Write one ``tf.train.Example`` per row, round-robin over ``num_shards`` files, plus the schema.

    Feature keys: ``user_id``/``item_id`` (bytes), ``row`` (int64, the row's index in ``table``),
    ``timestamp`` (int64), ``label/<objective>`` (int64), ``user/<name>`` / ``item/<name>`` (bytes for
    categorical, float for numeric). Row ``r`` goes to shard ``r % num_shards``; :func:`read_tfrecord`
    restores the original order. Rows are encoded in chunks (:mod:`csmf_tf.data.example_encoding`).
    """
    import tensorflow as tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    paths = shard_paths(path, num_shards)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    try:
        for a in range(0, len(table), _WRITE_CHUNK_ROWS):
            chunk = table.take(slice(a, a + _WRITE_CHUNK_ROWS))
            _write_round_robin(writers, _encode_rows(chunk, a), a)
    finally:
        for w in writers:
            w.close()
    _write_schema(table, paths[0])
    return paths


def read_tfrecord(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> InteractionTable:
    """Read files written by :func:`write_tfrecord` (all shards) back into one table, original row order.

    ``paths``: one path, a glob pattern, or a list of paths. The schema is read from the sidecar of the
    first file.
    """
    import tensorflow as tf

    if isinstance(paths, (str, os.PathLike)):
        found = sorted(tf.io.gfile.glob(str(paths)))
        paths = found or [str(paths)]
    paths = [str(p) for p in paths]
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if missing:
        raise FileNotFoundError(f"TFRecord file(s) not found: {missing}")
    schema = _read_schema(paths[0])
    spec = {"user_id": tf.io.FixedLenFeature([], tf.string), "item_id": tf.io.FixedLenFeature([], tf.string),
            "row": tf.io.FixedLenFeature([], tf.int64)}
    if schema["has_timestamp"]:
        spec["timestamp"] = tf.io.FixedLenFeature([], tf.int64)
    for o in schema["objectives"]:
        spec[f"label/{o}"] = tf.io.FixedLenFeature([], tf.int64)
    for side in ("user", "item"):
        for k, kind in schema[f"{side}_features"].items():
            spec[f"{side}/{k}"] = tf.io.FixedLenFeature([], tf.string if kind == CATEGORICAL else tf.float32)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in spec}
    ds = tf.data.TFRecordDataset(paths).batch(65536).map(lambda x: tf.io.parse_example(x, spec))
    for batch in ds.as_numpy_iterator():
        for k, v in batch.items():
            parts[k].append(v)
    cols = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    order = np.argsort(cols["row"], kind="stable")

    def text(a: np.ndarray) -> np.ndarray:
        return np.array([b.decode() for b in a[order]], dtype=object)

    feature_kinds = {**schema["user_features"], **schema["item_features"]}

    def feat(key: str, kind: str) -> np.ndarray:
        return text(cols[key]) if kind == CATEGORICAL else cols[key][order].astype(np.float32)

    labels = np.stack([cols[f"label/{o}"][order] for o in schema["objectives"]], axis=1) \
        if len(order) else np.zeros((0, len(schema["objectives"])))
    return InteractionTable(
        user_id=text(cols["user_id"]), item_id=text(cols["item_id"]), labels=labels.astype(np.int8),
        objectives=tuple(schema["objectives"]),
        timestamp=cols["timestamp"][order].astype(np.int64) if schema["has_timestamp"] else None,
        user_features={k: feat(f"user/{k}", kind) for k, kind in schema["user_features"].items()},
        item_features={k: feat(f"item/{k}", kind) for k, kind in schema["item_features"].items()},
        feature_kinds=feature_kinds)
