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

**Cascade hard negatives are implemented** (not just refused): the first call for objective ``t`` makes
a second streaming pass that builds a per-user index of the user's rows positive for ``t-1`` but not for
``t`` (CSR: ``int64`` offsets per user, one ``int32`` item row per candidate row, ~4 bytes per
candidate; cached). This index is the one structure that grows with the data: for the click stage it
has one entry per unclicked exposure (~0.9 of the rows, ~36 MB at 10^7 rows). Each batch draws one
candidate per row with a stateless uniform keyed by the seed and a seeded per-batch random key (new
every epoch), so the draws follow the same rule as :func:`~csmf_tf.data.tfdata.cascade_hard_negatives`
but not its exact numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from csmf_tf.data.files import schema_path
from csmf_tf.data.table import CATEGORICAL, NUMERIC, Catalog, InteractionTable, objective_position
from csmf_tf.data.features import (HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_MASK, ITEM_ID, SAMPLING_PROBABILITY, USER_ID,
                                   hard_negative)
from csmf_tf.data.tfdata import _as_tensor_column, _catalog_rows

#: Records without a ``row`` feature (other writers) are ordered after every numbered record, by position.
_UNNUMBERED = 1 << 40


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

    Attributes:
      files: the resolved paths; objectives, feature_kinds, user_feature_kinds, item_feature_kinds,
      has_timestamp: from the schema; num_rows: rows over all files; positive_counts:
      ``{objective: number of positive rows}``.
    """

    def __init__(self, files: str | os.PathLike | Iterable[str | os.PathLike], *, shuffle_buffer: int = 65_536,
                 cycle_length: int = 4, parse_batch_size: int = 1024, scan_batch_size: int = 65_536) -> None:
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

    def _batches(self, spec: dict, keep=None, transform=None):
        """Numpy batches of parsed records, in file order (sequential reads: the order is the fallback
        row key). In the pipeline, ``keep(parsed) -> bool [B]`` selects records and ``transform(parsed)
        -> dict`` replaces the parsed columns, when given."""
        import tensorflow as tf

        def parse(serialized):
            parsed = tf.io.parse_example(serialized, spec)
            if keep is not None:
                mask = keep(parsed)
                parsed = {k: tf.boolean_mask(v, mask) for k, v in parsed.items()}
            return parsed if transform is None else transform(parsed)

        ds = tf.data.TFRecordDataset(list(self.files)).batch(self.scan_batch_size)
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
        """The cascade hard-negative candidates of ``objective`` (index ``t >= 1``), built by a streaming
        pass on first use and cached (memory: ~4 bytes per candidate row, see the module docstring)."""
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
                                                            "i": tf.cast(item_row.lookup(p["item_id"]), tf.int32)}):
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
        tensors, same keys), read from the files each epoch. Differences: ``shuffle`` reshuffles the
        file order and permutes windows of ``shuffle_buffer`` records (windowed, not global),
        ``shuffle=False`` gives the interleaved file order; hard negatives are drawn as described in the
        module docstring. ``fraction < 1`` keeps the rows whose keyed hash of ``(user_id, item_id, seed)``
        falls below ``fraction`` (the same rows every epoch); sampling probabilities stay those of all
        positives.

        Raises:
          ValueError: no positive row for ``objective``, bad ``batch_size`` or ``fraction``, or hard
            negatives for the first objective.
          KeyError: a positive (or hard-negative candidate) item is missing from ``item_catalog``.
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
        needs_catalog = item_catalog is not None or hard_negatives
        if needs_catalog:
            catalog_row = lookup(catalog.ids, tf.range(len(catalog), dtype=tf.int64), tf.constant(-1, tf.int64))
            catalog_ids = _as_tensor_column(catalog.ids, CATEGORICAL)
            catalog_features = {k: _as_tensor_column(v, item_kinds[k]) for k, v in catalog.features.items()}
        label_key = f"label/{self.objectives[t]}"
        filter_spec = self._spec(ids=fraction < 1.0, labels=(t,))
        spec = self._spec(user_features=True, item_features=item_catalog is None)
        threshold = int(fraction * (1 << 31))

        def positives(serialized):
            parsed = tf.io.parse_example(serialized, filter_spec)
            keep = tf.equal(parsed[label_key], 1)
            if fraction < 1.0:
                pair = tf.strings.join([parsed["user_id"], parsed["item_id"]], separator="\x1f")
                bucket = tf.strings.to_hash_bucket_strong(pair, 1 << 31, key=[seed & 0xFFFFFFFF, 0x5EED])
                keep &= bucket < threshold
            return tf.boolean_mask(serialized, keep)

        def finish(key, serialized):
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
                draw = tf.random.stateless_uniform(tf.shape(u), seed=tf.stack([tf.constant(seed, tf.int64), key]))
                pick = start + tf.minimum(tf.cast(tf.floor(draw * tf.cast(count, tf.float32)), tf.int64),
                                          tf.maximum(count - 1, 0))
                own = catalog_row.lookup(parsed["item_id"])
                negative = tf.where(has, tf.cast(tf.gather(candidates, tf.where(has, pick, 0)), tf.int64), own)
                out[HARD_NEGATIVE_ITEM_ID] = tf.gather(catalog_ids, negative)
                out.update({hard_negative(k): tf.gather(v, negative) for k, v in catalog_features.items()})
                out[HARD_NEGATIVE_MASK] = tf.cast(has, tf.float32)
            return out

        files = tf.data.Dataset.from_tensor_slices(list(self.files))
        if shuffle:
            files = files.shuffle(len(self.files), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(self.cycle_length, len(self.files)),
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
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)  # hard-negative keys
        ds = tf.data.Dataset.zip((draws, ds)).map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
