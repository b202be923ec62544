"""Exact evaluation of a (cascade) two-tower model on every objective, plus the fused score.

One forward pass per tower gives ``u`` and ``v``; the score of objective ``t`` is ``<u * m_t, v>`` and
the fused score ``<u * w, v>`` (:mod:`csmf_tf.scoring`). A model with fewer stages than objectives
(the single-objective baseline) ranks every objective with its last stage score. Models trained with
weight-level CPP (``model.per_stage_forward``) need one forward pass per stage instead, and their
fused ranking concatenates the ``S`` stage vectors (``S * D`` dimensions).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.metrics.retrieval import EvalSet, build_eval_set, evaluate_retrieval, prefix_results
from csmf_tf.models.cascade import ITEM_ID, USER_ID, CascadeTwoTower


@dataclasses.dataclass
class EvaluationData:
    """Everything needed to rank the full corpus for one split's users, per objective."""

    users: Catalog
    items: Catalog
    eval_sets: dict[str, EvalSet]


def build_evaluation(train: InteractionTable, target: InteractionTable, users: Catalog, items: Catalog,
                     exclude: Sequence[InteractionTable] = ()) -> EvaluationData:
    """Eval sets of ``target``'s positives per objective; each user's ``train`` (and ``exclude``)
    positives of that objective are removed from their ranking."""
    eval_sets = {}
    for objective in train.objectives:
        if not target.positives(objective).any():
            continue
        eval_sets[objective] = build_eval_set(train, target, objective, items.ids, users.ids,
                                              exclude=list(exclude) or None, on_unknown="drop")
    return EvaluationData(users, items, eval_sets)


def stage_vectors(model: CascadeTwoTower, data: EvaluationData, stage: int) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)`` of the model as it was in ``stage`` (weight-level models need a forward pass per
    stage; their later weights are saved and restored around it)."""
    if not getattr(model, "per_stage_forward", False) or stage == model.stage:
        users, items = model.user_vectors(data.users.as_inputs(USER_ID)), model.item_vectors(
            data.items.as_inputs(ITEM_ID))
        return (model.stage_query(users, stage) if not getattr(model, "per_stage_forward", False)
                else users), items
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


def evaluate_model(model: CascadeTwoTower, data: EvaluationData, objectives: Sequence[str],
                   fusion_weights: Sequence[float] | None = None,
                   ks: Sequence[int] = (20, 50, 100, 200)) -> dict[str, dict[str, float]]:
    """Results keyed ``{"stage": {...}, "fused": {...}}`` with ``"<objective>/<metric>"`` entries.

    ``stage``: objective ``t`` ranked by ``s_t`` (``s_S`` for ``t > S``); ``fused``: every objective
    ranked by ``sum_t k_t s_t`` (only when ``fusion_weights`` is given and the model has ``S > 1``).
    """
    results: dict[str, dict[str, float]] = {"stage": {}}
    per_stage = {}
    for index, objective in enumerate(objectives):
        if objective not in data.eval_sets:
            continue
        stage = min(index + 1, model.num_stages)
        if stage not in per_stage:
            per_stage[stage] = stage_vectors(model, data, stage)
        users, items = per_stage[stage]
        eval_set = data.eval_sets[objective]
        results["stage"].update(prefix_results(
            evaluate_retrieval(users[eval_set.user_rows], items, eval_set, ks=ks), objective))
    if fusion_weights is not None and model.num_stages > 1:
        if getattr(model, "per_stage_forward", False):
            stages = [stage_vectors(model, data, s) for s in range(1, model.num_stages + 1)]
            users = np.concatenate([k * u for k, (u, _) in zip(fusion_weights, stages)], axis=1)
            items = np.concatenate([v for _, v in stages], axis=1)
        else:
            users, items = stage_vectors(model, data, model.num_stages)
            users = model.fused_query(users, fusion_weights)
        results["fused"] = {}
        for objective in objectives:
            if objective in data.eval_sets:
                eval_set = data.eval_sets[objective]
                results["fused"].update(prefix_results(
                    evaluate_retrieval(users[eval_set.user_rows], items, eval_set, ks=ks), objective))
    return results


class ValidationRecall(tf.keras.callbacks.Callback):
    """Writes ``val_recall@K`` of one objective into the epoch logs (for early stopping).

    The model is in stage ``t`` during the fit, so ``<f_u, f_i>`` is already ``s_t``.
    """

    def __init__(self, data: EvaluationData, objective: str, k: int = 50, verbose: bool = True):
        super().__init__()
        if objective not in data.eval_sets:
            raise ValueError(f"validation split has no positives for objective {objective!r}")
        self.data, self.objective, self.k, self.verbose = data, objective, k, verbose
        self.history: list[float] = []

    @property
    def monitor(self) -> str:
        return f"val_recall@{self.k}"

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        eval_set = self.data.eval_sets[self.objective]
        users = self.model.user_vectors(self.data.users.take(eval_set.user_rows).as_inputs(USER_ID))
        items = self.model.item_vectors(self.data.items.as_inputs(ITEM_ID))
        value = evaluate_retrieval(users, items, eval_set, ks=(self.k,))[f"recall@{self.k}"]
        self.history.append(value)
        if logs is not None:
            logs[self.monitor] = value
        if self.verbose:
            print(f"  [{self.objective}] epoch {epoch + 1}: {self.monitor} = {value:.4f}", flush=True)
