"""Popularity prior [ours]: item popularity carried inside the one inner product.

Towers trained with the log-Q correction learn scores with the item's popularity divided out, and on
data where popularity predicts the next action well (Beibei) a popularity list beats them. For each
objective ``t`` let ``L[i, t] = log(1 + c_t(i))`` (``c_t``: the item's training positives of ``t``).
The scored method is

    score'_t(u, i) = score_t(u, i) + alpha_t * L[i, t] = < [Q_t[u], alpha_t e_t], [V_t[i], L[i]] >,

so with one shared ``V`` items gain the ``S`` columns of ``L`` and queries ``S`` entries (``alpha_t``
in column ``t``): every objective still ranks one item matrix ``[V, L]`` (``D + S`` dimensions, one
ANN query), and the fused query is ``[sum_t k_t Q_t, (k_1 alpha_1, ..., k_S alpha_S)]``. A method with
one item matrix per objective appends only its own column: ``V_t' = [V_t, L[:, t]]``,
``Q_t' = [Q_t, alpha_t]``.

``alpha_t`` is chosen per objective on validation Recall@50 from :data:`PRIOR_GRID` times the scale
ratio ``r_t = std(score_t) / std(L[:, t])`` (measured on the validation users), so the grid means the
same at any temperature or vector norm. ``alpha = 0`` (in every grid) is the method without the prior.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from csmf_tf.data.table import InteractionTable
from csmf_tf.metrics.popularity import popularity_counts
from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.retrieval import evaluate_retrieval
from csmf_tf.metrics.vectors import ScoringVectors

PRIOR_GRID: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclasses.dataclass(frozen=True)
class PopularityPrior:
    """What an export needs: ``log_popularity`` ``[I, S]`` (rows = the catalog's) and ``alphas`` ``[S]``."""

    log_popularity: np.ndarray
    alphas: np.ndarray

    def __post_init__(self) -> None:
        if self.log_popularity.ndim != 2 or self.alphas.shape != (self.log_popularity.shape[1],):
            raise ValueError(f"log_popularity must be [I, S] and alphas [S]; got {self.log_popularity.shape} "
                             f"and {self.alphas.shape}")
        if not (np.all(np.isfinite(self.log_popularity)) and np.all(np.isfinite(self.alphas))):
            raise ValueError("the popularity prior must be finite")


def log_popularity(train: InteractionTable, objectives: Sequence[str], item_ids: np.ndarray) -> np.ndarray:
    """``L[i, t] = log(1 + c_t(i))``; ``[I, S]`` float32."""
    return np.stack([np.log1p(popularity_counts(train, o, item_ids)) for o in objectives], axis=1).astype(np.float32)


def with_prior(vectors: ScoringVectors, log_pop: np.ndarray, alphas: Sequence[float]) -> ScoringVectors:
    """``vectors`` with the prior columns appended (see the module docstring)."""
    count = len(vectors.objectives)
    if log_pop.shape[1] != count or len(alphas) != count:
        raise ValueError(f"need {count} popularity columns and alphas, got {log_pop.shape[1]} and {len(alphas)}")
    if vectors.shared_items:
        shared = np.concatenate([vectors.items[0], log_pop], axis=1)
        columns = [np.eye(count, dtype=np.float32)[t] * alphas[t] for t in range(count)]
        items = [shared] * count
    else:
        columns = [np.float32([alphas[t]]) for t in range(count)]
        items = [np.concatenate([v, log_pop[:, t:t + 1]], axis=1) for t, v in enumerate(vectors.items)]
    queries = [np.concatenate([q, np.broadcast_to(c, (len(q), len(c)))], axis=1).astype(np.float32)
               for q, c in zip(vectors.queries, columns)]
    return ScoringVectors(vectors.objectives, queries, items)


def tune_prior(vectors: ScoringVectors, log_pop: np.ndarray, data: EvaluationData,
               grid: Sequence[float] = PRIOR_GRID, k: int = 50) -> tuple[ScoringVectors, list[float]]:
    """The prior whose ``alpha_t`` maximises each objective's validation Recall@k on ``data``."""
    alphas = []
    for t, (objective, q, v) in enumerate(zip(vectors.objectives, vectors.queries, vectors.items)):
        eval_set = data.eval_sets.get(objective)
        if eval_set is None:
            alphas.append(0.0)
            continue
        users = q[eval_set.user_rows]
        spread = np.std(users[:256] @ v.T)
        ratio = float(spread / max(np.std(log_pop[:, t]), 1e-12))
        best = (-1.0, 0.0)
        for multiple in grid:
            alpha = multiple * ratio
            scored = np.concatenate([users, np.full((len(users), 1), alpha, np.float32)], axis=1)
            recall = evaluate_retrieval(scored, np.concatenate([v, log_pop[:, t:t + 1]], axis=1), eval_set,
                                        ks=(k,))[f"recall@{k}"]
            if recall > best[0]:
                best = (recall, alpha)
        alphas.append(best[1])
    return with_prior(vectors, log_pop, alphas), alphas
