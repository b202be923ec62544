"""Training input streamed from sharded TFRecord files, never holding the table in memory.

:class:`TFRecordSource` reads files written by :func:`csmf_tf.data.synthetic.write_tfrecord` or
:func:`~csmf_tf.data.synthetic.write_cascade_tfrecord` (one ``tf.train.Example`` per row, schema JSON
beside them). Construction makes **one streaming pass** (``tf.data``, fixed-size batches) that collects:

- the user and item catalogs (ids and side features, first occurrence by the ``row`` key the writers
  store, i.e. the same rows :meth:`InteractionTable.user_catalog` / ``item_catalog`` pick);
- per objective, each item's number of positives (the log-Q sampling probabilities) and row counts.

What the source holds is catalog-sized (ids, features, ``[items, objectives]`` counts), never row-sized:
its memory does not grow with the number of rows (:meth:`TFRecordSource.held_bytes`).

:meth:`TFRecordSource.objective_dataset` then gives, per epoch, a ``tf.data`` pipeline with exactly the
element format and dtypes of :func:`csmf_tf.data.tfdata.make_objective_dataset`: shards interleaved
with parallel reads (file order reshuffled each epoch), the objective's positives filtered on the
serialised records, a bounded shuffle (``shuffle_buffer`` records, see below), batching, one vectorised
parse per batch, the sampling probability from a ``tf.lookup.StaticHashTable``, prefetch. Shuffling is
*windowed*, not global as in memory: the file order is reshuffled every epoch, the shards interleaved,
and each consecutive window of ``shuffle_buffer`` positives is permuted as one tensor (a new seeded
permutation per window and epoch). A record stays within its window, as with a shuffle buffer of that
size; the window is permuted in one op because element-wise ``Dataset.shuffle`` was the bottleneck
(2.4x fewer examples per second on 10^6 rows).

**Later stages read only their positives** when the files have positive shards (written by the TFRecord
writers, or added by :func:`csmf_tf.data.files.write_positive_shards`): an epoch of objective ``t`` then
reads the positive shards of ``t`` (one per file, same interleaving and shuffling), i.e. O(positives of
``t``) records instead of every exposure, and checks each record's label (a non-positive record is an
error, not a filtered row). The manifest (``<stem>.positives.json``) is checked at construction against
the files' byte sizes and the first pass' row and positive counts, so stale or missing positive shards
are a clear error. Files without a manifest (e.g. written by an older version) are scanned and filtered
as before, with a one-line notice. Either way an epoch gives the same multiset of examples
(:meth:`TFRecordSource.epoch_files` names what it reads).

**Cascade hard negatives are implemented** (not just refused): the first call for objective ``t`` makes
a second streaming pass (over the positive shards of ``t-1`` when there are some, else every file) that
builds a per-user index of the user's rows positive for ``t-1`` but not for ``t`` (CSR: ``int64``
offsets per user, one ``int32`` item row per candidate row, ~4 bytes per candidate; cached). This index
is the one structure that grows with the data: for the click stage it has one entry per unclicked
exposure (~0.9 of the rows, ~36 MB at 10^7 rows). Each row draws one candidate with a uniform that is a
hash of the record's bytes and a seeded random key per epoch: the draw does not depend on the record's
batch or position, so the reading order (positive shards or a scan, shuffled or not) never changes
which hard negative an example gets in an epoch. The draws follow the same rule as
:func:`~csmf_tf.data.tfdata.cascade_hard_negatives` but not its exact numbers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from csmf_tf.data.files import POSITIVES_FORMAT, positives_manifest_path, resolve_files, schema_path
from csmf_tf.data.table import CATEGORICAL, NUMERIC, Catalog, InteractionTable, objective_position
from csmf_tf.data.features import (HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_MASK, HARD_NEGATIVE_SAMPLING_PROBABILITY,
                                   ITEM_ID, SAMPLING_PROBABILITY, USER_ID, hard_negative)
from csmf_tf.data.tfdata import _as_tensor_column, _catalog_rows

logger = logging.getLogger("csmf_tf.data")

#: Records without a ``row`` feature (other writers) are ordered after every numbered record, by position.
_UNNUMBERED = 1 << 40
#: Hard-negative draws: a record's uniform is its salted hash modulo this, divided by it (float64-exact).
_DRAW_BUCKETS = 1 << 53


@dataclasses.dataclass(frozen=True)
class HardNegativeIndex:
    """Per-user cascade hard-negative candidates of one objective ``t``, in CSR form.

    The candidates of the user in row ``u`` of the source's user catalog are the item-catalog rows
    ``items[offsets[u]:offsets[u + 1]]``: one entry per row of that user positive for objective ``t-1`` and
    negative for ``t`` (duplicates kept, as in the in-memory sampler).
    """

    offsets: np.ndarray  # int64 [num_users + 1]
    items: np.ndarray    # int32 [num_candidate_rows]

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.items.nbytes)


class _FirstOccurrence:
    """Distinct ids seen so far with the features of their first row (smallest row key) and, optionally,
    per-id sums of count columns. State is sorted by id: memory is O(distinct ids), never O(rows)."""

    def __init__(self, feature_keys: Sequence[str], num_counts: int) -> None:
        self.ids = np.empty(0, dtype="S1")
        self.first = np.empty(0, dtype=np.int64)
        self.features: dict[str, np.ndarray] = {k: np.empty(0) for k in feature_keys}
        self.counts = np.zeros((0, num_counts), dtype=np.int64)

    def add(self, ids: np.ndarray, keys: np.ndarray, features: Mapping[str, np.ndarray],
            counts: np.ndarray | None) -> None:
        all_ids = np.concatenate([self.ids, np.asarray(ids, dtype="S")])
        all_keys = np.concatenate([self.first, keys])
        order = np.lexsort((all_keys, all_ids))  # by id, then by row key
        sorted_ids = all_ids[order]
        start = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        keep = order[start]
        self.ids, self.first = sorted_ids[start], all_keys[keep]
        self.features = {k: np.concatenate([v, features[k]])[keep] for k, v in self.features.items()}
        if counts is not None:
            self.counts = np.add.reduceat(np.concatenate([self.counts, counts])[order], start, axis=0)


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() for v in values], dtype=object)


class TFRecordSource:
    """Streaming training data over sharded TFRecord files (see the module docstring).

    Args:
      files: a glob pattern or a list of TFRecord paths; the schema is read from the first file's
        sidecar (``<stem>.schema.json``).
      shuffle_buffer: records per shuffle window of :meth:`objective_dataset` (bounds its memory:
        ~200 bytes per record for the synthetic schema).
      cycle_length: shards read in parallel (interleaved).
      parse_batch_size: records per vectorised label parse in :meth:`objective_dataset`.
      scan_batch_size: records per step of the streaming passes (bounds their working memory).
      positive_shards: read an objective's positive shards when the files' manifests list them (see
        the module docstring); ``False`` scans every record for every objective (as for files without
        positive shards).

    Attributes:
      files: the resolved paths; objectives, feature_kinds, user_feature_kinds, item_feature_kinds,
      has_timestamp: from the schema; num_rows: rows over all files; positive_counts:
      ``{objective: number of positive rows}``.
    """

    def __init__(self, files: str | os.PathLike | Iterable[str | os.PathLike], *, shuffle_buffer: int = 65_536,
                 cycle_length: int = 4, parse_batch_size: int = 1024, scan_batch_size: int = 65_536,
                 positive_shards: bool = True) -> None:
        for name, value in (("shuffle_buffer", shuffle_buffer), ("cycle_length", cycle_length),
                            ("parse_batch_size", parse_batch_size), ("scan_batch_size", scan_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        self.files: tuple[str, ...] = tuple(resolve_files(files))
        sidecar = schema_path(self.files[0])
        if not sidecar.exists():
            raise FileNotFoundError(f"schema file {sidecar} (written by write_tfrecord) not found for "
                                    f"{self.files[0]}")
        schema = json.loads(sidecar.read_text())
        self.objectives: tuple[str, ...] = tuple(schema["objectives"])
        self.has_timestamp: bool = bool(schema["has_timestamp"])
        self.user_feature_kinds: dict[str, str] = dict(schema["user_features"])
        self.item_feature_kinds: dict[str, str] = dict(schema["item_features"])
        self.feature_kinds: dict[str, str] = {**self.user_feature_kinds, **self.item_feature_kinds}
        self.shuffle_buffer, self.cycle_length = shuffle_buffer, cycle_length
        self.parse_batch_size, self.scan_batch_size = parse_batch_size, scan_batch_size
        self._hard_negatives: dict[int, HardNegativeIndex] = {}
        self._tables = None  # id -> catalog row lookup tables, built on first use
        self._scan()
        # objective index -> its positive shards, one per file in self.files' order
        self._positive_files: dict[int, tuple[str, ...]] = self._load_positive_shards() if positive_shards else {}

    # ------------------------------------------------------------------------------------ first pass

    def _spec(self, *, ids: bool = True, row: bool = False, timestamp: bool = False,
              labels: Sequence[int] = (), user_features: bool = False, item_features: bool = False) -> dict:
        import tensorflow as tf

        spec: dict[str, Any] = {}
        if ids:
            spec["user_id"] = tf.io.FixedLenFeature([], tf.string)
            spec["item_id"] = tf.io.FixedLenFeature([], tf.string)
        if row:
            spec["row"] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
        if timestamp and self.has_timestamp:
            spec["timestamp"] = tf.io.FixedLenFeature([], tf.int64)
        for t in labels:
            spec[f"label/{self.objectives[t]}"] = tf.io.FixedLenFeature([], tf.int64)
        for side, kinds, wanted in (("user", self.user_feature_kinds, user_features),
                                    ("item", self.item_feature_kinds, item_features)):
            if wanted:
                for k, kind in kinds.items():
                    spec[f"{side}/{k}"] = tf.io.FixedLenFeature(
                        [], tf.string if kind == CATEGORICAL else tf.float32)
        return spec

    def _batches(self, spec: dict, keep=None, transform=None, files: Sequence[str] | None = None):
        """Numpy batches of parsed records of ``files`` (default: every file), in file order (sequential
        reads: the order is the fallback row key). In the pipeline, ``keep(parsed) -> bool [B]`` selects
        records and ``transform(parsed) -> dict`` replaces the parsed columns, when given."""
        import tensorflow as tf

        def parse(serialized):
            parsed = tf.io.parse_example(serialized, spec)
            if keep is not None:
                mask = keep(parsed)
                parsed = {k: tf.boolean_mask(v, mask) for k, v in parsed.items()}
            return parsed if transform is None else transform(parsed)

        ds = tf.data.TFRecordDataset(list(files or self.files)).batch(self.scan_batch_size)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
        return ds.as_numpy_iterator()

    def _scan(self) -> None:
        objectives = range(len(self.objectives))
        spec = self._spec(row=True, labels=objectives, user_features=True, item_features=True)
        users = _FirstOccurrence(list(self.user_feature_kinds), 0)
        items = _FirstOccurrence(list(self.item_feature_kinds), len(self.objectives))
        seen = 0
        for batch in self._batches(spec):
            n = len(batch["user_id"])
            keys = np.where(batch["row"] >= 0, batch["row"], _UNNUMBERED + seen + np.arange(n))
            labels = np.stack([batch[f"label/{o}"] for o in self.objectives], axis=1)
            users.add(batch["user_id"], keys, {k: batch[f"user/{k}"] for k in self.user_feature_kinds}, None)
            items.add(batch["item_id"], keys, {k: batch[f"item/{k}"] for k in self.item_feature_kinds},
                      (labels == 1).astype(np.int64))
            seen += n
        self.num_rows: int = seen
        self._user_keys, self._item_keys = users.ids, items.ids  # sorted bytes ids, for searchsorted
        self._item_counts = items.counts                          # [I, S] positives per item
        self.positive_counts: dict[str, int] = {o: int(items.counts[:, t].sum())
                                                for t, o in enumerate(self.objectives)}

        def catalog(state: _FirstOccurrence, kinds: Mapping[str, str]) -> Catalog:
            feats = {k: (_decode(state.features[k]) if kind == CATEGORICAL
                         else np.asarray(state.features[k], dtype=np.float32)) for k, kind in kinds.items()}
            return Catalog(_decode(state.ids), feats)

        self._users = catalog(users, self.user_feature_kinds)
        self._items = catalog(items, self.item_feature_kinds)

    def _load_positive_shards(self) -> dict[int, tuple[str, ...]]:
        """The positive shards of each objective that has them, from the files' manifests, checked against
        the files (byte sizes) and the first pass (row and positive counts); ``{}`` with a notice when a
        file has no manifest."""
        by_manifest: dict[Path, list[str]] = {}
        for f in self.files:
            by_manifest.setdefault(positives_manifest_path(f), []).append(f)
        absent = [str(m) for m in by_manifest if not m.exists()]
        if absent:
            logger.warning("no positive shards for %s (no %s; files written without them, e.g. by an older "
                           "version): later stages scan all %d records; "
                           "csmf_tf.data.files.write_positive_shards adds them",
                           self.files[0] if len(self.files) == 1 else f"{len(self.files)} files",
                           absent[0], self.num_rows)
            return {}

        def stale(what: str) -> ValueError:
            return ValueError(f"stale positive shards: {what}; rewrite them with "
                              "csmf_tf.data.files.write_positive_shards (or pass positive_shards=False)")

        entries: dict[str, tuple[Path, dict]] = {}
        covered: set[str] | None = None
        for manifest, files in by_manifest.items():
            content = json.loads(manifest.read_text())
            if content.get("format") != POSITIVES_FORMAT:
                raise ValueError(f"{manifest}: positives manifest format {content.get('format')!r}; this "
                                 f"version reads format {POSITIVES_FORMAT}")
            listed = {e["file"]: e for e in content["shards"]}
            for f in files:
                entry = listed.get(Path(f).name)
                if entry is None:
                    raise stale(f"{manifest} does not list {f}")
                size = Path(f).stat().st_size
                if size != entry["bytes"]:
                    raise stale(f"{f} has {size} bytes, {manifest} recorded {entry['bytes']} (the shard "
                                "changed after its positive shards were written)")
                entries[f] = (manifest.parent, entry)
            covered = set(content["objectives"]) if covered is None else covered & set(content["objectives"])
        unknown = sorted(covered - set(self.objectives))
        if unknown:
            raise stale(f"the manifests list objectives {unknown} that the schema lacks ({self.objectives})")
        listed_rows = sum(entry["records"] for _, entry in entries.values())
        if listed_rows != self.num_rows:
            raise stale(f"the manifests count {listed_rows} records in these {len(self.files)} files, the "
                        f"files hold {self.num_rows}")
        plan: dict[int, tuple[str, ...]] = {}
        for t, o in enumerate(self.objectives):
            if o not in covered:
                continue
            paths, records = [], 0
            for f in self.files:
                base, entry = entries[f]
                shard = entry["positives"][o]
                path = base / shard["file"]
                if not path.exists():
                    raise FileNotFoundError(f"positive shard {path} ({o!r} positives of {f}), listed in "
                                            f"{positives_manifest_path(f)}, is missing")
                if path.stat().st_size != shard["bytes"]:
                    raise stale(f"{path} has {path.stat().st_size} bytes, the manifest recorded {shard['bytes']}")
                paths.append(str(path))
                records += shard["records"]
            if records != self.positive_counts[o]:
                raise stale(f"the {o!r} positive shards hold {records} records (manifest), the files have "
                            f"{self.positive_counts[o]} {o!r} positives")
            plan[t] = tuple(paths)
        return plan

    # ------------------------------------------------------------------------------------ metadata

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_objectives(self) -> int:
        return len(self.objectives)

    def objective_index(self, objective: str | int) -> int:
        return objective_position(self.objectives, objective)

    def user_catalog(self) -> Catalog:
        """Every user (sorted ids) with the features of its first row, like ``InteractionTable.user_catalog``."""
        return self._users

    def item_catalog(self) -> Catalog:
        """Every item (sorted ids) with the features of its first row, like ``InteractionTable.item_catalog``."""
        return self._items

    def item_positive_counts(self, objective: str | int) -> np.ndarray:
        """``int64 [len(item_catalog())]``: positives of ``objective`` per catalog item."""
        return self._item_counts[:, self.objective_index(objective)].copy()

    def sampling_probabilities(self, objective: str | int) -> dict[str, float]:
        """``{item_id: count / total}`` over ``objective``'s positives, as
        :func:`csmf_tf.data.tfdata.item_sampling_probabilities` computes on the whole table."""
        t = self.objective_index(objective)
        counts = self._item_counts[:, t]
        total = counts.sum()
        if total == 0:
            raise ValueError(f"objective {objective!r} has no positive rows in these files "
                             f"({self.num_rows} rows)")
        nz = np.flatnonzero(counts)
        return {self._items.ids[r]: float(counts[r]) / float(total) for r in nz}

    def epoch_files(self, objective: str | int) -> tuple[str, ...]:
        """The files an epoch of :meth:`objective_dataset` for ``objective`` reads: its positive shards when
        the manifest lists them, else every file (scanned and filtered)."""
        return self._positive_files.get(self.objective_index(objective), self.files)

    def epoch_records(self, objective: str | int) -> int:
        """Records an epoch of ``objective`` reads: its positives with positive shards, else every row."""
        t = self.objective_index(objective)
        return self.positive_counts[self.objectives[t]] if t in self._positive_files else self.num_rows

    def held_bytes(self) -> int:
        """Bytes held in numpy arrays and the strings they reference (catalogs, counts, cached
        hard-negative indexes): independent of the number of rows, except the hard-negative indexes."""
        def size(a: np.ndarray) -> int:
            extra = sum(sys.getsizeof(x) for x in a.ravel()) if a.dtype == object else 0
            return int(a.nbytes) + extra

        arrays = [self._user_keys, self._item_keys, self._item_counts, self._users.ids, self._items.ids,
                  *self._users.features.values(), *self._items.features.values()]
        return sum(size(a) for a in arrays) + sum(ix.nbytes for ix in self._hard_negatives.values())

    # ------------------------------------------------------------------------------ further passes

    def hard_negative_index(self, objective: str | int) -> HardNegativeIndex:
        """The cascade hard-negative candidates of ``objective`` (index ``t >= 1``), built on first use by
        a streaming pass over the positives of ``t-1`` (their positive shards, else every file) and cached
        (memory: ~4 bytes per candidate row, see the module docstring)."""
        t = self.objective_index(objective)
        if not 1 <= t < self.num_objectives:
            raise ValueError(f"cascade hard negatives need an objective with an upstream stage (index 1.."
                             f"{self.num_objectives - 1} of {self.objectives}); got {objective!r}")
        if t not in self._hard_negatives:
            import tensorflow as tf

            up, own = f"label/{self.objectives[t - 1]}", f"label/{self.objectives[t]}"
            user_row, item_row = self._row_tables()
            user_rows, item_rows = [], []
            # Ids become catalog rows inside the pipeline: only int32 pairs reach Python.
            for batch in self._batches(self._spec(labels=(t - 1, t)),
                                       keep=lambda p: tf.equal(p[up], 1) & tf.equal(p[own], 0),
                                       transform=lambda p: {"u": tf.cast(user_row.lookup(p["user_id"]), tf.int32),
                                                            "i": tf.cast(item_row.lookup(p["item_id"]), tf.int32)},
                                       files=self._positive_files.get(t - 1)):
                user_rows.append(batch["u"])
                item_rows.append(batch["i"])
            users = np.concatenate(user_rows or [np.zeros(0, np.int32)])
            items = np.concatenate(item_rows or [np.zeros(0, np.int32)])
            if len(users) and min(users.min(), items.min()) < 0:
                raise RuntimeError("an id missing from the first pass: the files changed since the scan")
            order = np.argsort(users, kind="stable")
            counts = np.bincount(users, minlength=len(self._user_keys))
            self._hard_negatives[t] = HardNegativeIndex(
                offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items=items[order])
        return self._hard_negatives[t]

    def rows_of_users(self, user_ids: Iterable[str]) -> InteractionTable:
        """Every row of the given users (ids, labels, timestamps; no side features), in row order.

        Streams the files and keeps only those users' rows: memory is proportional to their rows. Used to
        exclude a small evaluation sample's training positives from its rankings.
        """
        import tensorflow as tf

        wanted = np.unique(np.array([str(u) for u in user_ids], dtype=object))
        spec = self._spec(row=True, timestamp=True, labels=range(self.num_objectives))
        parts: dict[str, list[np.ndarray]] = {k: [] for k in spec}
        seen = 0
        if len(wanted):
            member = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(wanted), tf.ones(len(wanted), tf.int64)), default_value=0)
            for batch in self._batches(spec, keep=lambda p: tf.equal(member.lookup(p["user_id"]), 1)):
                n = len(batch["user_id"])
                batch["row"] = np.where(batch["row"] >= 0, batch["row"], _UNNUMBERED + seen + np.arange(n))
                seen += n
                for k, v in batch.items():
                    parts[k].append(v)
        cols = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
        order = np.argsort(cols["row"], kind="stable")
        labels = (np.stack([cols[f"label/{o}"][order] for o in self.objectives], axis=1) if len(order)
                  else np.zeros((0, self.num_objectives)))
        return InteractionTable(
            user_id=_decode(cols["user_id"][order]), item_id=_decode(cols["item_id"][order]),
            labels=labels.astype(np.int8), objectives=self.objectives,
            timestamp=cols["timestamp"][order].astype(np.int64) if self.has_timestamp else None)

    # ---------------------------------------------------------------------------------- training data

    def objective_dataset(self, objective: str | int, batch_size: int, shuffle: bool = True, seed: int = 0,
                          item_catalog: Catalog | None = None, hard_negatives: bool = False,
                          drop_remainder: bool = False,
                          sampling_probabilities: Mapping[str, float] | None = None,
                          fraction: float = 1.0):
        """The streaming counterpart of :func:`csmf_tf.data.tfdata.make_objective_dataset`.

        Same arguments and the same element format (dict of ``[B]`` ``tf.string`` / ``tf.float32``
        tensors, same keys), read each epoch from :meth:`epoch_files` (the objective's positive shards,
        or every file). Differences: ``shuffle`` reshuffles the file order and permutes windows of
        ``shuffle_buffer`` records (windowed, not global), ``shuffle=False`` gives the interleaved file
        order; hard negatives are drawn as described in the module docstring. ``fraction < 1`` keeps the rows whose keyed hash of ``(user_id, item_id, seed)``
        falls below ``fraction`` (the same rows every epoch); sampling probabilities stay those of all
        positives.

        Raises:
          ValueError: no positive row for ``objective``, bad ``batch_size`` or ``fraction``, or hard
            negatives for the first objective.
          KeyError: a positive (or hard-negative candidate) item is missing from ``item_catalog``.
          tf.errors.InvalidArgumentError (while iterating): a record of a positive shard is not positive
            (positive shards out of step with the manifest).
        """
        import tensorflow as tf

        t = self.objective_index(objective)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        probabilities = sampling_probabilities or self.sampling_probabilities(t)
        catalog = item_catalog if item_catalog is not None else self._items
        item_kinds = {k: self.feature_kinds.get(k, CATEGORICAL if np.asarray(v).dtype == object else NUMERIC)
                      for k, v in catalog.features.items()}
        positive_items = self._items.ids[self._item_counts[:, t] > 0]
        if item_catalog is not None:
            _catalog_rows(item_catalog, positive_items, "positive item ids")  # raises KeyError early
        hard = self._hard_negative_tensors(t, catalog) if hard_negatives else None

        def lookup(keys: np.ndarray, values, default):
            return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(np.asarray(keys).astype(str).astype(object)), values), default_value=default)

        probability = lookup(np.array(list(probabilities), dtype=object),
                             tf.constant(np.array(list(probabilities.values()), dtype=np.float32)), -1.0)
        smallest_share = np.float32(min(probabilities.values()))
        needs_catalog = item_catalog is not None or hard_negatives
        if needs_catalog:
            catalog_row = lookup(catalog.ids, tf.range(len(catalog), dtype=tf.int64), tf.constant(-1, tf.int64))
            catalog_ids = _as_tensor_column(catalog.ids, CATEGORICAL)
            catalog_features = {k: _as_tensor_column(v, item_kinds[k]) for k, v in catalog.features.items()}
        label_key = f"label/{self.objectives[t]}"
        positive_files = self._positive_files.get(t)
        filter_spec = self._spec(ids=fraction < 1.0, labels=(t,))
        spec = self._spec(user_features=True, item_features=item_catalog is None)
        threshold = int(fraction * (1 << 31))

        def positives(serialized):
            parsed = tf.io.parse_example(serialized, filter_spec)
            keep = tf.equal(parsed[label_key], 1)
            if positive_files is not None:  # nothing to filter: a non-positive record means stale shards
                with tf.control_dependencies([tf.debugging.assert_equal(keep, True, message=(
                        f"a record of a positive shard of {self.objectives[t]!r} is not positive: positive "
                        "shards out of step with their manifest (rewrite them with write_positive_shards)"))]):
                    keep = tf.identity(keep)
            if fraction < 1.0:
                pair = tf.strings.join([parsed["user_id"], parsed["item_id"]], separator="\x1f")
                bucket = tf.strings.to_hash_bucket_strong(pair, 1 << 31, key=[seed & 0xFFFFFFFF, 0x5EED])
                keep &= bucket < threshold
            return tf.boolean_mask(serialized, keep)

        def finish(epoch_key, serialized):
            parsed = tf.io.parse_example(serialized, spec)
            out = {USER_ID: parsed["user_id"]}
            out.update({k: parsed[f"user/{k}"] for k in self.user_feature_kinds})
            out[ITEM_ID] = parsed["item_id"]
            if item_catalog is None:
                out.update({k: parsed[f"item/{k}"] for k in self.item_feature_kinds})
            else:
                rows = catalog_row.lookup(parsed["item_id"])
                out.update({k: tf.gather(v, rows) for k, v in catalog_features.items()})
            p = probability.lookup(parsed["item_id"])
            # -1: an item missing from the first pass' counts, i.e. the files changed since the scan.
            with tf.control_dependencies([tf.debugging.assert_non_negative(
                    p, message="item without a sampling probability: files changed since the scan?")]):
                out[SAMPLING_PROBABILITY] = tf.identity(p)
            if hard is not None:
                offsets, candidates, user_row = hard
                u = user_row.lookup(parsed["user_id"])
                safe = tf.maximum(u, 0)
                start = tf.gather(offsets, safe)
                count = tf.where(u >= 0, tf.gather(offsets, safe + 1) - start, tf.zeros_like(start))
                has = count > 0
                # A uniform per record from its bytes and the epoch's key: independent of batch and position.
                salted = tf.strings.join([tf.strings.as_string(epoch_key), serialized], separator="\x1f")
                draw = tf.cast(tf.strings.to_hash_bucket_fast(salted, _DRAW_BUCKETS), tf.float64) / _DRAW_BUCKETS
                pick = start + tf.minimum(tf.cast(tf.floor(draw * tf.cast(count, tf.float64)), tf.int64),
                                          tf.maximum(count - 1, 0))
                own = catalog_row.lookup(parsed["item_id"])
                negative = tf.where(has, tf.cast(tf.gather(candidates, tf.where(has, pick, 0)), tf.int64), own)
                out[HARD_NEGATIVE_ITEM_ID] = tf.gather(catalog_ids, negative)
                out.update({hard_negative(k): tf.gather(v, negative) for k, v in catalog_features.items()})
                out[HARD_NEGATIVE_MASK] = tf.cast(has, tf.float32)
                # An item without a positive of the objective (-1) gets the smallest share, as in memory.
                share = probability.lookup(out[HARD_NEGATIVE_ITEM_ID])
                out[HARD_NEGATIVE_SAMPLING_PROBABILITY] = tf.where(share < 0, smallest_share, share)
            return out

        read = list(positive_files or self.files)
        files = tf.data.Dataset.from_tensor_slices(read)
        if shuffle:
            files = files.shuffle(len(read), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(self.cycle_length, len(read)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Batches of serialised positives (variable sizes); nothing below handles records one by one:
        # per-element tf.data steps (unbatch, shuffle buffer) cost more than reading and parsing.
        ds = ds.batch(self.parse_batch_size)
        ds = ds.map(positives, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle:
            # Windowed shuffle: every window of shuffle_buffer records is permuted at once, with a new
            # seeded permutation per window and epoch (2.4x faster than Dataset.shuffle here).
            windows = ds.rebatch(self.shuffle_buffer)
            keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((windows, keys)).map(
                lambda records, key: tf.random.experimental.stateless_shuffle(records, seed=key),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
        # One hard-negative key per epoch: the scan keeps the first of a seeded stream re-drawn every epoch.
        keys = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

        def keep_first_key(state, element):
            (have, first), (key, batch) = state, element
            first = tf.where(have, first, key)
            return (tf.constant(True), first), (first, batch)

        ds = tf.data.Dataset.zip((keys, ds)).scan((tf.constant(False), tf.constant(0, tf.int64)), keep_first_key)
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _hard_negative_tensors(self, t: int, catalog: Catalog):
        """``(offsets, candidate rows of catalog, user id -> user row table)`` for the dataset graph."""
        import tensorflow as tf

        index = self.hard_negative_index(t)
        if catalog is self._items:
            rows = index.items.astype(np.int64)
        else:
            needed = np.unique(index.items)
            remap = np.full(len(self._items), -1, np.int64)
            remap[needed] = _catalog_rows(catalog, self._items.ids[needed], "hard-negative item ids")
            rows = remap[index.items]
        # int32 halves the largest constant; an empty index gets one dummy entry (never selected).
        candidates = tf.constant((rows if len(rows) else np.zeros(1, np.int64)).astype(np.int32))
        return tf.constant(index.offsets), candidates, self._row_tables()[0]

    def _row_tables(self):
        """``(user id -> user catalog row, item id -> item catalog row)`` lookup tables (-1: unknown)."""
        import tensorflow as tf

        if self._tables is None:
            def table(catalog: Catalog):
                return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                    tf.constant(catalog.ids.astype(str).astype(object)), tf.range(len(catalog), dtype=tf.int64)),
                    default_value=tf.constant(-1, tf.int64))
            self._tables = (table(self._users), table(self._items))
        return self._tables
