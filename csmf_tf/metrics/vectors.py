"""The scoring currency: every method as per-objective query and item vectors, one exact evaluator.

A trained method is reduced to :class:`ScoringVectors`: for each objective ``t`` a query matrix
``Q_t [U, d_t]`` over the whole user catalog and an item matrix ``V_t [I, d_t]`` over the whole item
catalog, with ``score_t(u, i) = <Q_t[u], V_t[i]>``. The fused ranking of weights ``k`` is

    F(u, i) = sum_t k_t <Q_t[u], V_t[i]>
            = < sum_t k_t Q_t[u], V[i] >                     if every V_t is the same matrix V
            = < concat_t(k_t Q_t[u]), concat_t(V_t[i]) >      otherwise,

so a method whose objectives share one item matrix (CSMF unit level, a single two-tower, popularity
of one objective) serves every objective and any fusion from one index with one ANN query; the
others need ``sum_t d_t`` dimensions (or ``S`` queries of ``d_t``). The main job and the experiments
score every method with :func:`evaluate_vectors`, i.e.
:func:`csmf_tf.metrics.retrieval.evaluate_retrieval` on a split's eval sets.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from csmf_tf.metrics.popularity import popularity_counts
from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.retrieval import evaluate_retrieval, prefix_results
from csmf_tf.data.table import InteractionTable

KS: tuple[int, ...] = (20, 50, 100)


@dataclasses.dataclass
class ScoringVectors:
    """Per-objective query ``[U, d_t]`` and item ``[I, d_t]`` vectors over the full catalogs.

    ``queries[t]`` / ``items[t]`` belong to ``objectives[t]``; rows follow ``EvaluationData.users`` /
    ``.items``. Objectives that share an item index hold the *same* array object in ``items``.
    """

    objectives: tuple[str, ...]
    queries: list[np.ndarray]
    items: list[np.ndarray]

    def __post_init__(self) -> None:
        if not (len(self.objectives) == len(self.queries) == len(self.items)):
            raise ValueError("one query and one item matrix per objective")
        for q, v in zip(self.queries, self.items):
            if q.ndim != 2 or v.ndim != 2 or q.shape[1] != v.shape[1]:
                raise ValueError(f"query {q.shape} and item {v.shape} matrices must be 2-D with the same width")

    @property
    def shared_items(self) -> bool:
        """True when every objective ranks the same item matrix (one index serves them all)."""
        return all(v is self.items[0] or (v.shape == self.items[0].shape and np.array_equal(v, self.items[0]))
                   for v in self.items)

    def fused(self, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """``(query, items)`` whose inner product is ``sum_t k_t score_t`` (see the module docstring)."""
        if len(weights) != len(self.objectives):
            raise ValueError(f"need one fusion weight per objective {self.objectives}, got {tuple(weights)}")
        if self.shared_items:
            query = sum(np.float32(k) * q for k, q in zip(weights, self.queries))
            return np.asarray(query, np.float32), self.items[0]
        return (np.concatenate([np.float32(k) * q for k, q in zip(weights, self.queries)], axis=1),
                np.concatenate(self.items, axis=1))

    def serving(self) -> dict[str, int]:
        """``vector_dim``: width of the fused query/item vectors; ``ann_queries``: ANN look-ups per
        request when each distinct item matrix has its own index (1 when all objectives share one)."""
        distinct = 1 if self.shared_items else len(self.objectives)
        dim = self.items[0].shape[1] if self.shared_items else sum(v.shape[1] for v in self.items)
        return {"vector_dim": int(dim), "ann_queries": int(distinct),
                "per_objective_dim": int(max(v.shape[1] for v in self.items))}


def evaluate_vectors(vectors: ScoringVectors, data: EvaluationData, fusion_weights: Sequence[float] | None = None,
                     ks: Sequence[int] = KS) -> dict[str, dict[str, float]]:
    """``{"stage": {"<objective>/recall@K": ...}, "fused": {...}}`` on ``data``'s eval sets.

    ``stage``: objective ``t`` ranked by ``score_t``; ``fused``: every objective ranked by the fused
    score (only with ``fusion_weights``).
    """
    results: dict[str, dict[str, float]] = {"stage": _rank(vectors.objectives, vectors.queries, vectors.items,
                                                             data, ks)}
    if fusion_weights is not None:
        queries, items = vectors.fused(fusion_weights)
        count = len(vectors.objectives)
        results["fused"] = _rank(vectors.objectives, [queries] * count, [items] * count, data, ks)
    return results


def _rank(objectives, queries, items, data: EvaluationData, ks) -> dict[str, float]:
    out: dict[str, float] = {}
    for objective, q, v in zip(objectives, queries, items):
        if objective in data.eval_sets:
            eval_set = data.eval_sets[objective]
            out.update(prefix_results(evaluate_retrieval(q[eval_set.user_rows], v, eval_set, ks=ks), objective))
    return out


def mean_metric(results: dict[str, float], objectives: Sequence[str], metric: str = "recall@50") -> float:
    """Mean of ``<objective>/<metric>`` over ``objectives`` (the tuning criterion)."""
    return float(np.mean([results[f"{o}/{metric}"] for o in objectives]))


def popularity_scoring(train: InteractionTable, data: EvaluationData, objectives: Sequence[str],
                       source: str | None = None) -> ScoringVectors:
    """Most-popular as ``D = 1`` vectors: ``Q = 1``, ``V = c`` (training positive counts of ``source``,
    or of each objective itself when ``source`` is ``None``)."""
    ones = np.ones((len(data.users), 1), np.float32)
    counts = {o: popularity_counts(train, o, data.items.ids)[:, None]
              for o in ([source] if source else objectives)}
    return ScoringVectors(tuple(objectives), [ones] * len(objectives),
                          [counts[source or o] for o in objectives])


def combine(parts: Sequence[ScoringVectors], objectives: Sequence[str]) -> ScoringVectors:
    """Objective ``t`` from ``parts[t]`` (separate single-objective models)."""
    if len(parts) != len(objectives):
        raise ValueError("one part per objective")
    picked = [part.objectives.index(o) for part, o in zip(parts, objectives)]
    return ScoringVectors(tuple(objectives), [p.queries[i] for p, i in zip(parts, picked)],
                          [p.items[i] for p, i in zip(parts, picked)])
