"""Every export measures its own search: recall@k of what a request gets against exact search.

ScaNN's recall depends on the corpus (how clustered the item vectors are) and on the index options, so
the size-based defaults of :class:`~csmf_tf.serving.index.ScannOptions` can be wrong for a given model.
Before a version is published, :func:`measure_ann_recall` runs the module's own search (ScaNN
candidates re-scored exactly, as ``serving_default`` does; the exact search of a brute-force export)
and exact brute-force search on the same fused queries with the export's default weights, one query
per search as a single-user request runs, and counts, per query, the returned items whose exact score
reaches the exact k-th best score (ties count, so an exact search scores 1.0). The queries are:

- ``user_tower``: a sample of real users run through the exported user tower, when the export is
  given their features (``ann_recall_users``; the main job passes its users);
- ``item_vectors``: otherwise, a sample of the indexed item vectors used as the user side of the
  query (a two-tower model places users among the items they like; a stand-in, said so in the record).

The result goes into ``assets/config.json`` (``ann_recall``) and the ``model_info`` signature, which
the server reports in GetModelMetadata and the REST metadata. :func:`check_ann_recall` fails the
export (nothing is published) or only warns when the recall is below the floor.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from csmf_tf.serving.constants import ANN_RECALL_ACTIONS, ANN_RECALL_FAIL, DEFAULT_ANN_RECALL_QUERIES
from csmf_tf.serving.module import RetrievalServingModule
from csmf_tf.serving.tower_inputs import embed_catalog

log = logging.getLogger(__name__)

USER_QUERIES, ITEM_QUERIES = "user_tower", "item_vectors"
# Exact scores of the same item from the index path (gather + einsum) and the exact path (matmul)
# differ by float32 rounding; within this they are the same score.
_RELATIVE_TIE = 1e-5
# Exact search scores [batch, items] float32 at a time: at most 2^24 values (64 MiB).
_SCORES_PER_BATCH = 1 << 24


class AnnRecallTooLow(RuntimeError):
    """The export's measured recall is below its floor (``ann_recall_action="fail"``)."""


@dataclasses.dataclass(frozen=True)
class AnnRecall:
    """One measurement: mean recall@``k`` over ``num_queries`` queries of kind ``queries``."""

    recall: float
    k: int
    num_queries: int
    queries: str
    index: str
    seconds: float

    def to_json(self, min_recall: float | None, action: str) -> dict[str, Any]:
        """The ``ann_recall`` record of ``config.json``."""
        return {"recall_at_k": self.recall, "k": self.k, "num_queries": self.num_queries,
                "queries": self.queries, "weights": "default_weights", "index": self.index,
                "against": "exact search (brute force)", "seconds": round(self.seconds, 3),
                "min_recall": min_recall, "action": action,
                "passed": min_recall is None or self.recall >= min_recall}


def check_recall_options(min_recall: float | None, action: str, num_queries: int) -> None:
    """Raise ``ValueError`` for a floor outside [0, 1], an unknown action or a sample size < 1."""
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_ann_recall must be in [0, 1] (or None for no floor), got {min_recall}")
    if action not in ANN_RECALL_ACTIONS:
        raise ValueError(f"ann_recall_action must be one of {ANN_RECALL_ACTIONS}, got {action!r}")
    if num_queries < 1:
        raise ValueError(f"ann_recall_queries must be >= 1, got {num_queries}")


def measure_ann_recall(module: RetrievalServingModule, k: int, num_queries: int = DEFAULT_ANN_RECALL_QUERIES,
                       user_inputs: Mapping[str, Any] | None = None, seed: int = 0) -> AnnRecall:
    """Recall@``k`` of ``module``'s search against exact search (see module docstring).

    ``user_inputs``: user-tower inputs, one row per user (e.g. ``Catalog.as_inputs("user_id")``); at
    most ``num_queries`` of them are drawn (seeded). ``None``: indexed item vectors stand in.
    """
    if not 1 <= k <= module.k_max:
        raise ValueError(f"ann_recall_k must be in [1, k_max={module.k_max}], got {k}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if user_inputs is not None:
        missing = sorted(set(module.user_spec) - set(user_inputs))
        if missing:
            raise ValueError(f"ann_recall_users lacks user tower inputs {missing} (it has {sorted(user_inputs)})")
        columns = {name: np.asarray(user_inputs[name]) for name in module.user_spec}
        lengths = {name: len(c) for name, c in columns.items()}
        if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
            raise ValueError(f"ann_recall_users needs one non-empty row per user in every column, got "
                             f"lengths {lengths}")
        n = next(iter(lengths.values()))
        rows = np.sort(rng.choice(n, min(n, num_queries), replace=False))
        users = embed_catalog(module.user_embedding, {name: c[rows] for name, c in columns.items()},
                              module.user_spec, "user_embedding", what="ann_recall_users sample")
        kind = USER_QUERIES
    else:
        table = module.item_vectors.numpy()[:, :module.tower_dim]
        users = table[rng.choice(len(table), min(len(table), num_queries), replace=False)]
        kind = ITEM_QUERIES
    weights = module.default_weights.numpy()
    # One query per search, as one user's request runs: in a batch, one row with fewer than k index
    # candidates sends the whole batch to exact search (module._approximate_top_k), which would flatter
    # the index. A micro-batched request can only do better than this.
    served_search = tf.function(lambda q: module.search(q, k)[0], autograph=False,
                                input_signature=[tf.TensorSpec([1, module.dim], tf.float32)])
    batch = max(1, _SCORES_PER_BATCH // int(module.item_vectors.shape[0]))
    hits = 0
    for start in range(0, len(users), batch):
        u = tf.constant(users[start:start + batch], tf.float32)
        query = module.fused_query(u, tf.broadcast_to(weights, [u.shape[0], len(weights)]))
        exact, _ = module.search(query, k, exact=True)
        kth = exact.numpy()[:, -1:]
        served = np.concatenate([served_search(query[i:i + 1]).numpy() for i in range(len(kth))])
        hits += int(np.sum(served >= kth - _RELATIVE_TIE * np.maximum(1.0, np.abs(kth))))
    return AnnRecall(hits / (k * len(users)), int(k), len(users), kind,
                     "brute_force" if module.index is None else "scann", time.perf_counter() - t0)


def check_ann_recall(result: AnnRecall, min_recall: float | None, action: str) -> bool:
    """``True`` when the recall meets the floor (or there is none); below it, raise
    :class:`AnnRecallTooLow` (``action="fail"``) or log a warning and return ``False``."""
    if min_recall is None or result.recall >= min_recall:
        return True
    message = (f"ANN recall@{result.k} = {result.recall:.4f} is below min_ann_recall = {min_recall} "
               f"({result.num_queries} {result.queries} queries with the default weights, against exact "
               "search). Search more leaves (num_leaves_to_search, ScannOptions.leaves_to_search_fraction), "
               "re-rank more candidates (num_reordering_candidates), export with exact search "
               "(use_scann=False / --brute_force), or lower the floor")
    if action == ANN_RECALL_FAIL:
        raise AnnRecallTooLow(message + "; ann_recall_action='warn' (--ann_recall_action warn) exports anyway")
    log.warning("%s; exporting anyway (ann_recall_action='warn')", message)
    return False
