"""File formats of an :class:`~csmf_tf.data.table.InteractionTable`: CSV and sharded TFRecord, each with a
JSON schema sidecar (``<stem>.schema.json``: objectives, timestamp, feature kinds).

- :func:`write_csv` / :func:`read_csv`: one row per pair (``user_id, item_id[, timestamp], <objectives>,
  <features>``), read back through the validating reader (bad rows: file, line, reason);
- :func:`write_tfrecord` / :func:`read_tfrecord`: ``tf.train.Example`` records round-robin over
  ``<stem>-<k>-of-<n>.tfrecord`` shards (:func:`shard_paths`), the format
  :class:`~csmf_tf.data.streaming.TFRecordSource` streams;
- :func:`schema_path` / :func:`table_schema`: the sidecar;
- positive shards: the TFRecord writers also copy each shard's positive records of the later objectives
  (every objective but the first, by default) to ``<stem>.positives/<shard stem>.<objective>.tfrecord``,
  and record in ``<stem>.positives.json`` (:func:`positives_manifest_path`) which file holds which
  shard's positives of which objective, with record counts and byte sizes, so a later training stage
  reads only its positives (:class:`~csmf_tf.data.streaming.TFRecordSource` checks the manifest against
  the shards). :func:`write_positive_shards` adds them to shards written without them.

The record field names (``user_id``, ``item_id``, ``label/<objective>``, ``user/<feature>``,
``item/<feature>``) are the file format, not the batch contract (:mod:`csmf_tf.data.features`).
"""
from __future__ import annotations

import json
import os
import re
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


def _file_stem(path: str | os.PathLike) -> str:
    """``path``'s name without extension and shard suffix (``cascade-00000-of-00004.tfrecord`` -> ``cascade``)."""
    stem = Path(path).name
    for ext in (".csv", ".tsv", ".tfrecord"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    if "-of-" in stem:  # sharded name <stem>-00000-of-00004
        stem = stem.rsplit("-", 3)[0]
    return stem


def schema_path(path: str | os.PathLike) -> Path:
    """Where the schema of ``path`` lives: ``<stem>.schema.json`` (shard suffixes removed)."""
    return Path(path).with_name(_file_stem(path) + SCHEMA_SUFFIX)


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


POSITIVES_SUFFIX = ".positives"
#: Layout version of the positives manifest (readers refuse other versions).
POSITIVES_FORMAT = 1


def positives_manifest_path(path: str | os.PathLike) -> Path:
    """The positives manifest of TFRecord shard ``path``: ``<stem>.positives.json`` beside it (the positive
    shards themselves live in the folder ``<stem>.positives/``)."""
    return Path(path).with_name(_file_stem(path) + POSITIVES_SUFFIX + ".json")


class PositiveShardWriter:
    """Copies each main shard's positive records of some objectives to their own files, then writes the
    manifest (see the module docstring).

    The caller writes (or has written) the main shards ``paths`` and hands every record to :meth:`add`
    with its shard number and labels; :meth:`close` closes the positive shards and, when every record was
    added, writes ``<stem>.positives.json``: per main shard its file name, record count and byte size, and
    per objective the positive shard's path (relative to the manifest), record count and byte size. The
    main shards must be closed before :meth:`close` (their sizes go into the manifest).

    Args:
      paths: the main shards (one stem, one folder).
      objectives: the files' objectives, in label-column order.
      positive_objectives: which objectives get positive shards; ``None``: every objective but the first
        (the later stages; the first stage reads every record anyway); empty: none, and no manifest.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], objectives: Sequence[str],
                 positive_objectives: Sequence[str] | None = None) -> None:
        import tensorflow as tf

        self.paths = [Path(p) for p in paths]
        manifests = {positives_manifest_path(p) for p in self.paths}
        if len(manifests) != 1:
            raise ValueError(f"positive shards need shards of one stem in one folder; got {len(manifests)} "
                             f"stems/folders: {sorted(str(m) for m in manifests)[:3]}")
        self.manifest = manifests.pop()
        # A manifest never outlives the shards it describes: rewritten shards lose it until close().
        self.manifest.unlink(missing_ok=True)
        self.objectives = list(objectives)
        chosen = self.objectives[1:] if positive_objectives is None else list(dict.fromkeys(positive_objectives))
        unknown = [o for o in chosen if o not in self.objectives]
        if unknown:
            raise ValueError(f"positive_objectives {unknown} are not objectives of these files "
                             f"({self.objectives})")
        self.chosen = chosen
        names = {o: re.sub(r"[^A-Za-z0-9_.-]+", "_", o) for o in chosen}
        if len(set(names.values())) < len(names):
            raise ValueError(f"objectives {chosen} give clashing positive-shard file names {names}")
        folder = self.manifest.with_name(_file_stem(self.paths[0]) + POSITIVES_SUFFIX)
        self.positive_paths = {o: [folder / f"{p.name.removesuffix('.tfrecord')}.{names[o]}.tfrecord"
                                   for p in self.paths] for o in chosen}
        self.records = np.zeros(len(self.paths), np.int64)
        self.positives = {o: np.zeros(len(self.paths), np.int64) for o in chosen}
        if chosen:
            folder.mkdir(parents=True, exist_ok=True)
        self._writers = {o: [tf.io.TFRecordWriter(str(q)) for q in qs] for o, qs in self.positive_paths.items()}

    def add(self, records: Sequence[bytes], shard: np.ndarray, labels: np.ndarray) -> None:
        """Count ``records`` (``shard[k]``: main shard of record ``k``; ``labels [len, objectives]``) and
        copy their positives of the chosen objectives to the positive shards."""
        shard = np.asarray(shard, dtype=np.int64)
        labels = np.asarray(labels)
        self.records += np.bincount(shard, minlength=len(self.paths))
        for o in self.chosen:
            rows = np.flatnonzero(labels[:, self.objectives.index(o)] == 1)
            self.positives[o] += np.bincount(shard[rows], minlength=len(self.paths))
            writers = self._writers[o]
            for r, k in zip(rows.tolist(), shard[rows].tolist()):
                writers[k].write(records[r])

    def close(self, complete: bool = True) -> Path | None:
        """Close the positive shards; write and return the manifest when ``complete`` and some objective
        was chosen (``None`` otherwise: the readers then scan the main shards)."""
        for writers in self._writers.values():
            for w in writers:
                w.close()
        self._writers = {}
        if not complete or not self.chosen:
            return None
        base = self.manifest.parent
        shards = [{"file": p.name, "records": int(self.records[k]), "bytes": p.stat().st_size,
                   "positives": {o: {"file": self.positive_paths[o][k].relative_to(base).as_posix(),
                                     "records": int(self.positives[o][k]),
                                     "bytes": self.positive_paths[o][k].stat().st_size} for o in self.chosen}}
                  for k, p in enumerate(self.paths)]
        self.manifest.write_text(json.dumps({"format": POSITIVES_FORMAT, "objectives": self.chosen,
                                             "shards": shards}, indent=1) + "\n")
        return self.manifest


def write_tfrecord(table: InteractionTable, path: str | os.PathLike, num_shards: int = 1,
                   positive_objectives: Sequence[str] | None = None) -> list[Path]:
    """Write one ``tf.train.Example`` per row, round-robin over ``num_shards`` files, plus the schema and
    the positive shards with their manifest (:class:`PositiveShardWriter`; ``positive_objectives``:
    ``None`` = every objective but the first, ``()`` = none).

    Feature keys: ``user_id``/``item_id`` (bytes), ``row`` (int64, the row's index in ``table``),
    ``timestamp`` (int64), ``label/<objective>`` (int64), ``user/<name>`` / ``item/<name>`` (bytes for
    categorical, float for numeric). Row ``r`` goes to shard ``r % num_shards``; :func:`read_tfrecord`
    restores the original order. Rows are encoded in chunks (:mod:`csmf_tf.data.example_encoding`).
    Returns the main shards.
    """
    import tensorflow as tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    paths = shard_paths(path, num_shards)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    positives = PositiveShardWriter(paths, table.objectives, positive_objectives)
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    complete = False
    try:
        for a in range(0, len(table), _WRITE_CHUNK_ROWS):
            chunk = table.take(slice(a, a + _WRITE_CHUNK_ROWS))
            records = _encode_rows(chunk, a)
            shard = (a + np.arange(len(records))) % num_shards  # global row r goes to shard r % num_shards
            for record, k in zip(records, shard.tolist()):
                writers[k].write(record)
            positives.add(records, shard, chunk.labels)
        complete = True
    finally:
        for w in writers:
            w.close()
        positives.close(complete)
    _write_schema(table, paths[0])
    return paths


def write_positive_shards(files: str | os.PathLike | Iterable[str | os.PathLike],
                          positive_objectives: Sequence[str] | None = None) -> Path | None:
    """Add positive shards and their manifest to TFRecord shards written without them (e.g. by an older
    version): one pass over ``files`` (a glob pattern or paths of one stem); returns the manifest."""
    import tensorflow as tf

    paths = resolve_files(files)
    objectives = _read_schema(paths[0])["objectives"]
    spec = {f"label/{o}": tf.io.FixedLenFeature([], tf.int64) for o in objectives}
    positives = PositiveShardWriter(paths, objectives, positive_objectives)
    complete = False
    try:
        for k, p in enumerate(paths):
            ds = tf.data.TFRecordDataset(p).batch(65536).map(
                lambda x: (x, tf.stack([tf.io.parse_example(x, spec)[key] for key in spec], axis=1)))
            for records, labels in ds.as_numpy_iterator():
                positives.add(records, np.full(len(records), k), labels)
        complete = True
    finally:
        positives.close(complete)
    return positives.manifest if positives.chosen else None


def resolve_files(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Sorted matches of a glob pattern, or the given list of paths; ``FileNotFoundError`` if none exist."""
    import tensorflow as tf

    if isinstance(files, (str, os.PathLike)):
        found = sorted(tf.io.gfile.glob(str(files)))
        paths = found or [str(files)]
    else:
        paths = [str(p) for p in files]
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if not paths or missing:
        raise FileNotFoundError(f"TFRecord file(s) not found: {missing or files}")
    return paths


def read_tfrecord(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> InteractionTable:
    """Read files written by :func:`write_tfrecord` (all shards) back into one table, original row order.

    ``paths``: one path, a glob pattern, or a list of paths. The schema is read from the sidecar of the
    first file.
    """
    import tensorflow as tf

    paths = resolve_files(paths)
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
