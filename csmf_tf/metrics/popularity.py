"""Training-positive counts per item: the most-popular baseline and the popularity prior both read them.

The baseline is scored as D = 1 vectors (:func:`csmf_tf.metrics.vectors.popularity_scoring`), so it runs
through the same exact evaluator.

Every user gets the same ranking: items by decreasing count of training positives for the objective,
``score(u, i) = <1, c_i> = c_i``. With ``query = ones [U, 1]`` and ``items = counts [I, 1]``,
:func:`csmf_tf.metrics.retrieval.evaluate_retrieval` applies the same exclusion of each user's training
positives and the same tie rule (equal counts: lower corpus row first) as for a learned model.
"""
from __future__ import annotations

import numpy as np

from csmf_tf.data.table import InteractionTable
from csmf_tf.metrics.retrieval import _Index


def popularity_counts(table: InteractionTable, objective: str | int, item_ids: np.ndarray) -> np.ndarray:
    """``c[i]`` = number of rows of ``table`` with label 1 for ``objective`` and item ``item_ids[i]``.

    Args:
      table: interactions to count (the training split, so test positives do not leak).
      objective: objective name or column index.
      item_ids: ``[I]`` unique ids, the corpus.

    Returns:
      ``[I]`` float32 counts (duplicate rows count twice; items of ``table`` absent from ``item_ids``
      are not counted, as they cannot be ranked).
    """
    col = table.objective_index(objective)
    if not 0 <= col < table.num_objectives:
        raise KeyError(f"objective index {objective} out of range for objectives {table.objectives}")
    index = _Index(item_ids, "item_ids")
    rows, found = index.lookup(table.item_id[table.labels[:, col] == 1])
    return np.bincount(rows[found], minlength=len(index.keys)).astype(np.float32)
