"""``tf.data`` input pipelines, one per objective, for two-tower retrieval training.

A stage-``t`` dataset runs over the rows positive for objective ``t`` (stage 1: every exposed pair). Each
element is a batch dict (``B`` = batch size; the last batch may be smaller unless ``drop_remainder``):

- ``"user_id"``: ``[B]`` tf.string; every user feature: ``[B]`` tf.string (categorical) / tf.float32 (numeric);
- ``"item_id"``: ``[B]`` tf.string; every item feature, same dtypes;
- ``"candidate_sampling_probability"``: ``[B]`` tf.float32, ``p(i) = count_t(i) / N_t`` (the item's share
  of objective ``t``'s positives), for the log-Q correction of ``tfrs.tasks.Retrieval``;
- with ``hard_negatives=True`` (``t >= 1``): ``"hard_negative/item_id"`` ``[B]`` tf.string, its item features
  under ``"hard_negative/<feature>"``, and ``"hard_negative_mask"`` ``[B]`` tf.float32 (1.0 when the row has
  one).

The key names are the batch contract of :mod:`csmf_tf.data.features`. A *cascade hard negative* of a row (user ``u``) is an item positive for objective ``t-1`` but not
  for ``t``, for the same user ``u`` (e.g. clicked but not bought).

The pipeline shuffles row *indices* (seeded, reshuffled each epoch), batches them, then gathers columns held
as constant tensors: cheaper than shuffling dicts of strings element by element.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from csmf_tf.data.features import (FLOAT_KEYS, HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_MASK,
                                   HARD_NEGATIVE_SAMPLING_PROBABILITY, ID_KEYS, ITEM_ID,
                                   SAMPLING_PROBABILITY, USER_ID, hard_negative, strip_hard_negative)
from csmf_tf.data.table import CATEGORICAL, Catalog, InteractionTable


def item_sampling_probabilities(table: InteractionTable, objective: str | int) -> dict[str, float]:
    """``{item_id: count of the item among objective's positives / number of positives}``.

    Only items with at least one positive appear; the values sum to 1. Raises ``ValueError`` when the
    objective has no positive row.
    """
    pos = table.positives(objective)
    if not pos.any():
        raise ValueError(f"objective {objective!r} has no positive rows in this table ({len(table)} rows)")
    items, counts = np.unique(table.item_id[pos].astype(str), return_counts=True)
    total = counts.sum()
    return {str(i): float(c) / float(total) for i, c in zip(items, counts)}


def cascade_hard_negatives(table: InteractionTable, objective_index: int,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One cascade hard negative per row of ``table``, for objective ``objective_index = t >= 1``.

    Candidates of user ``u``: ``C_u = {rows r of u : labels[r, t-1] = 1 and labels[r, t] = 0}``. Row ``r`` (of
    user ``u``) gets ``item_id[C_u[floor(U_r * |C_u|)]]`` with ``U_r ~ Uniform[0, 1)`` drawn from
    ``numpy.random.default_rng(seed)``; when ``C_u`` is empty it gets its own item and mask 0.

    Returns:
      ``(item_ids [n] str object array, mask [n] float32)`` aligned with the rows of ``table``.
    """
    t = table.objective_index(objective_index)
    if not 1 <= t < table.num_objectives:
        raise ValueError(f"cascade hard negatives need an objective with an upstream stage "
                         f"(index 1..{table.num_objectives - 1} of {table.objectives}); got {objective_index!r}")
    n = len(table)
    _, uidx = np.unique(table.user_id.astype(str), return_inverse=True)
    uidx = uidx.reshape(-1)
    cand = np.flatnonzero((table.labels[:, t - 1] == 1) & (table.labels[:, t] == 0))
    # Candidates grouped by user (stable sort keeps row order inside a user): offsets via bincount.
    cand = cand[np.argsort(uidx[cand], kind="stable")]
    num_users = int(uidx.max()) + 1 if n else 0
    count = np.bincount(uidx[cand], minlength=num_users)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]) if num_users else np.zeros(0, dtype=np.int64)
    u = np.random.default_rng(seed).random(n)
    c_row = count[uidx]
    has = c_row > 0
    pick = start[uidx] + np.minimum(np.floor(u * c_row).astype(np.int64), np.maximum(c_row - 1, 0))
    out = table.item_id.copy()
    out[has] = table.item_id[cand[pick[has]]]
    return out.astype(object), has.astype(np.float32)


def _catalog_rows(catalog: Catalog, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of ``catalog`` for every id in ``ids``; ``KeyError`` naming missing ids."""
    cat_ids = catalog.ids.astype(str)
    order = np.argsort(cat_ids, kind="stable")
    sorted_ids = cat_ids[order]
    q = ids.astype(str)
    pos = np.searchsorted(sorted_ids, q)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == q) if len(sorted_ids) else np.zeros(len(q), bool)
    if not found.all():
        missing = np.unique(q[~found])
        raise KeyError(f"{len(missing)} {what} not in item_catalog, e.g. {missing[:5].tolist()}")
    return order[pos_c]


def _as_tensor_column(values: np.ndarray, kind: str):
    import tensorflow as tf

    if kind == CATEGORICAL:
        return tf.constant(np.asarray(values).astype(str).astype(object), dtype=tf.string)
    return tf.constant(np.asarray(values, dtype=np.float32), dtype=tf.float32)


def objective_columns(table: InteractionTable, objective: str | int, item_catalog: Catalog | None = None,
                      hard_negatives: bool = False, seed: int = 0,
                      sampling_probabilities: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """The numpy columns of :func:`make_objective_dataset` (rows = objective's positives, source order).

    ``sampling_probabilities`` defaults to :func:`item_sampling_probabilities` of ``table``.
    """
    t = table.objective_index(objective)
    pos = table.positives(t)
    if not pos.any():
        raise ValueError(f"objective {objective!r} has no positive rows in this table ({len(table)} rows)")
    probs = sampling_probabilities or item_sampling_probabilities(table, t)
    rows = np.flatnonzero(pos)
    item_ids = table.item_id[rows].astype(str).astype(object)
    cols: dict[str, np.ndarray] = {USER_ID: table.user_id[rows].astype(str).astype(object)}
    for k, v in table.user_features.items():
        cols[k] = v[rows]
    cols[ITEM_ID] = item_ids
    if item_catalog is None:
        item_feats = {k: v[rows] for k, v in table.item_features.items()}
    else:
        crow = _catalog_rows(item_catalog, item_ids, "positive item ids")
        item_feats = {k: np.asarray(v)[crow] for k, v in item_catalog.features.items()}
    cols.update(item_feats)
    try:
        cols[SAMPLING_PROBABILITY] = np.array([probs[i] for i in item_ids], dtype=np.float32)
    except KeyError as e:
        raise KeyError(f"item {e.args[0]!r} has no sampling probability") from None
    if hard_negatives:
        neg_all, mask_all = cascade_hard_negatives(table, t, seed)
        neg = neg_all[rows].astype(str).astype(object)
        cols[HARD_NEGATIVE_ITEM_ID] = neg
        catalog = item_catalog if item_catalog is not None else table.item_catalog()
        nrow = _catalog_rows(catalog, neg, "hard-negative item ids")
        for k, v in catalog.features.items():
            cols[hard_negative(k)] = np.asarray(v)[nrow]
        cols[HARD_NEGATIVE_MASK] = mask_all[rows]
        floor = min(probs.values())   # items without a positive of the objective: as if seen once at most
        cols[HARD_NEGATIVE_SAMPLING_PROBABILITY] = np.array([probs.get(i, floor) for i in neg], dtype=np.float32)
    return cols


def _kind(table: InteractionTable, key: str, column: np.ndarray) -> str:
    name = strip_hard_negative(key)
    if name in table.feature_kinds:
        return table.feature_kinds[name]
    return CATEGORICAL if column.dtype == object or column.dtype.kind in "USO" else "numeric"


def make_objective_dataset(table: InteractionTable, objective: str | int, batch_size: int,
                           shuffle: bool = True, seed: int = 0, item_catalog: Catalog | None = None,
                           hard_negatives: bool = False, drop_remainder: bool = False,
                           sampling_probabilities: Mapping[str, float] | None = None):
    """A batched, prefetched ``tf.data.Dataset`` over ``objective``'s positive rows (see module docstring).

    Args:
      table: the (training) table; its positives for ``objective`` are the examples.
      objective: name or index of the objective.
      batch_size: rows per batch (``>= 1``).
      shuffle: shuffle rows with ``seed``, a new order every iteration (epoch); otherwise source order.
      seed: shuffle seed and hard-negative sampling seed.
      item_catalog: where item features come from (positives and hard negatives); defaults to the table's
        own rows (and ``table.item_catalog()`` for hard negatives).
      hard_negatives: add cascade hard negatives (objective index ``>= 1`` only).
      drop_remainder: drop the last incomplete batch.
      sampling_probabilities: override ``{item_id: p}`` (default: :func:`item_sampling_probabilities`).

    Returns:
      ``tf.data.Dataset`` of dicts of ``[B]`` tensors (``tf.string`` / ``tf.float32``).
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    cols = objective_columns(table, objective, item_catalog=item_catalog, hard_negatives=hard_negatives,
                             seed=seed, sampling_probabilities=sampling_probabilities)
    n = len(cols[USER_ID])
    tensors = {}
    for key, col in cols.items():
        if key in ID_KEYS:
            tensors[key] = _as_tensor_column(col, CATEGORICAL)
        elif key in FLOAT_KEYS:
            tensors[key] = tf.constant(col, dtype=tf.float32)
        else:
            tensors[key] = _as_tensor_column(col, _kind(table, key, col))

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda idx: {k: tf.gather(v, idx) for k, v in tensors.items()},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
