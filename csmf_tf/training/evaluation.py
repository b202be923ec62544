"""Models as :class:`~csmf_tf.metrics.vectors.ScoringVectors`, the one currency every method is scored in.

A cascade model's objective ``t`` is scored by its stage ``min(t, S)``: one forward pass per tower gives
``u`` and ``v``, the stage score is ``<u * m_t, v>`` and the fused score ``<u * w, v>``
(:mod:`csmf_tf.scoring`), so every objective shares one item matrix. A model with fewer stages than
objectives (a single-objective two-tower) ranks every objective with its last stage score. Models
trained with weight-level CPP (``model.per_stage_forward``) need one forward pass per stage instead,
and their fused ranking concatenates the ``S`` stage vectors (``S * D`` dimensions). Multi-vector
models (shared-bottom, MMoE) score objective ``t`` with output vector ``t`` of both towers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors
from csmf_tf.models.cascade import CascadeTwoTower
from csmf_tf.models.multitask import MultiVectorTwoTower


def stage_vectors(model: CascadeTwoTower, data: EvaluationData, stage: int) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)`` of the model as it was in ``stage`` (weight-level models need a forward pass per
    stage; their later weights are saved and restored around it)."""
    if not model.per_stage_forward or stage == model.stage:
        users, items = model.user_vectors(data.users.as_inputs(USER_ID)), model.item_vectors(
            data.items.as_inputs(ITEM_ID))
        return (users if model.per_stage_forward else model.stage_query(users, stage)), items
    current = model.stage
    # Variables only: the id lookups' vocabularies also appear in model.weights (as handlers that
    # checkpoints use) and do not change between stages.
    variables = [w for w in model.weights if isinstance(w, tf.Variable)]
    saved = [w.numpy() for w in variables]
    try:
        model.set_stage(stage)
        return (model.user_vectors(data.users.as_inputs(USER_ID)),
                model.item_vectors(data.items.as_inputs(ITEM_ID)))
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
        model.set_stage(current)


def scoring_stage(objective: str, objectives: Sequence[str], trained: Sequence[str]) -> int:
    """The stage that ranks ``objective`` (one of ``objectives``, in cascade order) for a model whose
    stages are ``trained`` (a subsequence of them): its own stage when it was trained, else the last
    trained stage before it (stage 1 when none is). A model trained on a prefix ranks the objectives
    beyond it by ``s_S``; one trained on exposure and conversion ranks click by ``s_1``."""
    if objective in trained:
        return list(trained).index(objective) + 1
    position = list(objectives).index(objective)
    return max(1, sum(1 for o in trained if o in objectives and list(objectives).index(o) < position))


def served_columns(objectives: Sequence[str], trained: Sequence[str]) -> list[int]:
    """The columns of the data's ``objectives`` that a model's stages ``trained`` serve, in stage order."""
    missing = [o for o in trained if o not in objectives]
    if missing:
        raise ValueError(f"the model's objectives {missing} are not among the data's {list(objectives)}")
    return [list(objectives).index(o) for o in trained]


def cascade_vectors(model: CascadeTwoTower, data: EvaluationData, objectives: Sequence[str]) -> ScoringVectors:
    """A (CSMF or plain) cascade model: each of ``objectives`` is scored by its :func:`scoring_stage`."""
    per_stage: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    queries, items = [], []
    for objective in objectives:
        stage = scoring_stage(objective, objectives, model.objectives)
        if stage not in per_stage:
            per_stage[stage] = stage_vectors(model, data, stage)
        queries.append(per_stage[stage][0])
        items.append(per_stage[stage][1])
    if not model.per_stage_forward:
        items = [items[0]] * len(items)   # the same V for every stage: mark it shared
    return ScoringVectors(tuple(objectives), queries, items)


def current_vectors(model: CascadeTwoTower, data: EvaluationData, objectives: Sequence[str]) -> ScoringVectors:
    """The model's current forward pass (``s_t`` of its current stage) for every one of ``objectives``:
    what a stage is early-stopped on while it trains."""
    users = model.user_vectors(data.users.as_inputs(USER_ID))
    items = model.item_vectors(data.items.as_inputs(ITEM_ID))
    return ScoringVectors(tuple(objectives), [users] * len(objectives), [items] * len(objectives))


def multivector_vectors(model: MultiVectorTwoTower, data: EvaluationData) -> ScoringVectors:
    """Shared-bottom / MMoE: objective ``t`` scored by output vector ``t`` of both towers."""
    users = model.user_vectors(data.users.as_inputs(USER_ID))
    items = model.item_vectors(data.items.as_inputs(ITEM_ID))
    return ScoringVectors(model.objectives, [users[:, t] for t in range(len(model.objectives))],
                          [items[:, t] for t in range(len(model.objectives))])


def evaluate_model(model: CascadeTwoTower, data: EvaluationData, objectives: Sequence[str],
                   fusion_weights: Sequence[float] | None = None,
                   ks: Sequence[int] = (20, 50, 100, 200)) -> dict[str, dict[str, float]]:
    """:func:`~csmf_tf.metrics.vectors.evaluate_vectors` of :func:`cascade_vectors`: ``{"stage": ...,
    "fused": ...}`` (``fused`` only with ``fusion_weights`` and ``S > 1``)."""
    weights = fusion_weights if model.num_stages > 1 else None
    return evaluate_vectors(cascade_vectors(model, data, objectives), data, weights, ks=ks)


def count_parameters(model: tf.keras.Model) -> int:
    """Trainable parameters (ownership, masks and optimiser state are not parameters)."""
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
