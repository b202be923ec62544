"""Prepared data: the splits, catalogs and evaluation sets every training run and experiment reads.

:func:`prepare` splits an in-memory table (:func:`csmf_tf.data.splits.split_table`; by default a time
split when it has timestamps, else a per-user pair split), builds the user and item catalogs over every
id, and the validation and test evaluation sets under the protocol of :mod:`csmf_tf.metrics.protocol`.
:func:`prepare_streaming` does the same when the training rows stay in TFRecord shards.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from csmf_tf.data.splits import resolve_method, split_table
from csmf_tf.data.streaming import TFRecordSource
from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.metrics.protocol import SEEN, EvaluationData, build_evaluation


@dataclasses.dataclass
class PreparedData:
    """Everything a training run reads. In streaming mode (:func:`prepare_streaming`) ``train`` is a
    :class:`TFRecordSource` and ``table`` is the in-memory holdout (its schema is the training data's)."""

    table: InteractionTable
    train: InteractionTable | TFRecordSource
    val: InteractionTable
    test: InteractionTable
    users: Catalog
    items: Catalog
    validation: EvaluationData
    testing: EvaluationData
    split: str             # the split rule that made train/val/test (never "auto")


def prepare(table: InteractionTable, seed: int = 0, exclusion: str = SEEN, split: str = "auto") -> PreparedData:
    """Split (rule ``split``, see :mod:`csmf_tf.data.splits`), build catalogs over every user and item, and
    the val/test evaluation sets.

    Rankings leave out the user's training pairs (test: also validation pairs) chosen by
    ``exclusion`` (:mod:`csmf_tf.metrics.protocol`; default: every seen pair).
    """
    splits = split_table(table, seed=seed, method=split)
    split = resolve_method(table, split)
    users, items = table.user_catalog(), table.item_catalog()
    validation = build_evaluation(splits.train, splits.val, users, items, exclusion=exclusion)
    testing = build_evaluation(splits.train, splits.test, users, items, exclude=[splits.val], exclusion=exclusion)
    print(f"data: {len(table):,} rows, {len(users):,} users, {len(items):,} items; positives per objective: "
          + ", ".join(f"{o}={int(table.positives(o).sum()):,}" for o in table.objectives)
          + f"; {split} split train/val/test = {len(splits.train):,}/{len(splits.val):,}/{len(splits.test):,}",
          flush=True)
    return PreparedData(table, splits.train, splits.val, splits.test, users, items, validation, testing, split)


def _merge_catalogs(first: Catalog, second: Catalog) -> Catalog:
    """Union by id (sorted); an id in both keeps ``first``'s features."""
    ids = np.concatenate([first.ids, second.ids])
    _, index = np.unique(ids.astype(str), return_index=True)  # first occurrence: ``first`` wins
    return Catalog(ids[index], {k: np.concatenate([v, second.features[k]])[index]
                                for k, v in first.features.items()})


def prepare_streaming(train: TFRecordSource, holdout: InteractionTable, seed: int = 0,
                      exclusion: str = SEEN) -> PreparedData:
    """Streaming counterpart of :func:`prepare`: training rows stay in the shards.

    ``holdout`` (disjoint from the shards) is split in two by time (by pair hash without timestamps):
    validation then test. Catalogs are the union of the shards' and the holdout's. Rankings exclude the
    user's training positives, read by one streaming pass that keeps only the holdout users' rows
    (small when the holdout covers a sample of users, as ``generate_data --holdout-users`` writes it).
    """
    if holdout.objectives != train.objectives:
        raise ValueError(f"holdout objectives {holdout.objectives} differ from the shards' {train.objectives}")
    halves = split_table(holdout, val_fraction=0.5, test_fraction=0.0, seed=seed)
    val, test = halves.train, halves.val
    users = _merge_catalogs(train.user_catalog(), holdout.user_catalog())
    items = _merge_catalogs(train.item_catalog(), holdout.item_catalog())
    seen = train.rows_of_users(np.unique(holdout.user_id.astype(str)))
    validation = build_evaluation(seen, val, users, items, exclusion=exclusion)
    testing = build_evaluation(seen, test, users, items, exclude=[val], exclusion=exclusion)
    print(f"data (streaming): {train.num_rows:,} training rows in {len(train.files)} files, {len(users):,} users, "
          f"{len(items):,} items; training positives per objective: "
          + ", ".join(f"{o}={c:,}" for o, c in train.positive_counts.items())
          + f"; holdout val/test = {len(val):,}/{len(test):,} rows ({len(seen):,} training rows of their users)",
          flush=True)
    return PreparedData(holdout, train, val, test, users, items, validation, testing,
                        "holdout:" + resolve_method(holdout, "auto"))
