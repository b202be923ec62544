"""The CSMF two-tower model: one set of parameters, one stage active at a time.

``CascadeTwoTower`` is a ``tfrs.Model`` with a user tower ``f_u`` and an item tower ``f_i`` (both
:class:`~csmf_tf.models.towers.MaskedTower`, ``{features} -> [B, D]``) and one
:class:`~csmf_tf.tasks.aml.AdaptiveMarginRetrieval` task per objective. In stage ``t`` the forward
pass uses exactly the parameters of stages ``<= t`` (later units are zero), so ``<f_u(u), f_i(i)>``
is the stage score ``s_t``; only stage ``t``'s parameters receive gradients.

The output dimensions are shared units of both towers: dimension ``j`` has one owner ``s(j)`` in the
user and in the item output layer, so the blocks ``B_b`` of :mod:`csmf_tf.scoring` line up.

With one objective and no CPP this is the plain single-objective two-tower baseline: the same towers,
the same task, the same training loop.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from csmf_tf import scoring
from csmf_tf.data.features import (HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_MASK, HARD_NEGATIVE_SAMPLING_PROBABILITY,
                                   ITEM_ID, SAMPLING_PROBABILITY, hard_negative)
from csmf_tf.masks import ownership
from csmf_tf.models.towers import MaskedTower
from csmf_tf.tasks.aml import AdaptiveMarginRetrieval, MarginFn


def tower_input_names(tower: MaskedTower) -> list[str]:
    return list(tower.model.input.keys())


#: How cascade hard negatives enter the log-Q correction [ours] (:meth:`CascadeTwoTower.compute_loss`).
#: ``"none"``: they are chosen, not drawn from the in-batch distribution, so they get no correction
#: (``p = 1``). The in-batch candidates' logits are raised by ``-log p(i)`` (several nats), so such a
#: negative competes at a disadvantage of about ``-log p`` of a typical item and barely enters the
#: softmax. ``"in_batch"``: a hard negative is corrected like an in-batch candidate of the same item
#: (``p`` = its item's share of the objective's positives, the smallest share when it has none).
NO_CORRECTION, IN_BATCH_CORRECTION = "none", "in_batch"
HARD_NEGATIVE_CORRECTIONS = (NO_CORRECTION, IN_BATCH_CORRECTION)


class CascadeTwoTower(tfrs.Model):
    """CSMF two-tower retrieval model.

    Args:
      user_tower, item_tower: masked towers with the same output dimension ``D``.
      objectives: objective names in cascade order (``S >= 1``).
      temperature: softmax temperature of every retrieval task.
      eta: AML margin scale (``0``: plain TFRS retrieval loss in every stage).
      margin_fn: optional pluggable margin ``p_{t-1} -> m`` (see :mod:`csmf_tf.tasks.aml`).
      remove_accidental_hits: mask in-batch candidates with the positive's item id.
      candidates: optional dataset of item feature dicts; when given, every task carries
        ``tfrs.metrics.FactorizedTopK`` over it (reported by ``model.evaluate``).
    """

    def __init__(self, user_tower: MaskedTower, item_tower: MaskedTower, objectives: Sequence[str],
                 temperature: float = 0.05, eta: float = 0.0, margin_fn: Optional[MarginFn] = None,
                 remove_accidental_hits: bool = True, candidates: Optional[tf.data.Dataset] = None,
                 hard_negative_correction: str = NO_CORRECTION):
        super().__init__()
        if hard_negative_correction not in HARD_NEGATIVE_CORRECTIONS:
            raise ValueError(f"hard_negative_correction must be one of {HARD_NEGATIVE_CORRECTIONS}, "
                             f"got {hard_negative_correction!r}")
        self.hard_negative_correction = hard_negative_correction
        if user_tower.output_layer.units != item_tower.output_layer.units:
            raise ValueError("user and item towers must have the same output dimension D; got "
                             f"{user_tower.output_layer.units} and {item_tower.output_layer.units}")
        self.user_tower, self.item_tower = user_tower, item_tower
        self.user_model, self.item_model = user_tower.model, item_tower.model
        self.objectives = tuple(objectives)
        self.user_inputs = tower_input_names(user_tower)
        self.item_inputs = tower_input_names(item_tower)
        self.eta = float(eta)
        self.tasks = []
        for objective in self.objectives:
            metrics = None
            if candidates is not None:
                ids_and_vectors = candidates.map(lambda x: (x[ITEM_ID], self.item_model(x)))
                metrics = tfrs.metrics.FactorizedTopK(candidates=ids_and_vectors, ks=(20, 50, 100, 200),
                                                      name=f"{objective}_factorized_top_k")
            self.tasks.append(AdaptiveMarginRetrieval(
                eta=eta, margin_fn=margin_fn, temperature=temperature, metrics=metrics,
                remove_accidental_hits=remove_accidental_hits, name=f"{objective}_retrieval"))
        self.stage = 1
        # Weight-level ownership (set by training.stages.build_model): stage scores need one forward
        # pass per stage instead of a query mask.
        self.per_stage_forward = False
        self.upstream_query_mask = tf.Variable(tf.zeros([self.output_dim]), trainable=False,
                                               name="upstream_query_mask")

    # ----- ownership and stages -------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.user_tower.output_layer.units

    @property
    def num_stages(self) -> int:
        return len(self.objectives)

    @property
    def owner_stage(self) -> np.ndarray:
        """Owner stage of each output dimension, ``[D]`` (shared by both towers)."""
        return self.user_tower.output_layer.unit_owner.numpy()

    @property
    def towers(self) -> tuple[MaskedTower, MaskedTower]:
        return self.user_tower, self.item_tower

    def set_stage(self, stage: int, reinitialise: bool = False, seed: int = 0,
                  zero_item_block: bool = False) -> None:
        """Make ``stage`` the trainable one: masks, gradient masks and the AML upstream query.

        ``reinitialise`` gives the stage's (freed) units fresh values; use it when the stage begins.
        ``zero_item_block`` [ours] starts the stage's output block at zero on the item side, so
        ``s_t = s_{t-1}`` before the first step: the stage starts from the upstream ranking instead
        of upstream plus noise (the user side stays random, so the block still gets gradients).
        """
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")
        for tower in self.towers:
            if reinitialise:
                tower.reinitialise(stage, seed)
            tower.apply_stage(stage)
        if reinitialise and zero_item_block:
            output = self.item_tower.output_layer
            output.zero_units(output.units_of(stage))
        self.stage = stage
        self.upstream_query_mask.assign(ownership.upstream_mask(self.owner_stage, stage))
        # The towers see the stage only through mask variables, but compute_loss reads the Python
        # ``self.stage`` (which task, whether hard negatives and the margin apply) while Keras traces
        # it: drop every traced step here, explicitly, so the next fit/evaluate traces this stage.
        self.train_function = self.test_function = self.predict_function = None

    # ----- forward passes -------------------------------------------------------------------
    def _select(self, features: Mapping[str, tf.Tensor], names: Sequence[str], hard_negatives: bool = False):
        return {name: features[hard_negative(name) if hard_negatives else name] for name in names}

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The current stage's loss on one batch (keys: :mod:`csmf_tf.data.features`).

        In stages ``t > 1`` a batch with cascade hard negatives has ``2B`` candidates: the ``B``
        in-batch positives, then the ``B`` hard negatives, each a candidate for every query. A row
        without one (``hard_negative_mask = 0``) adds no candidate: its column is removed from the
        current and the upstream softmax. Their log-Q correction follows ``hard_negative_correction``
        (:data:`HARD_NEGATIVE_CORRECTIONS`) [ours]: none (``p = 1``) by default, or their item's
        in-batch share (``hard_negative/candidate_sampling_probability``).
        """
        query = self.user_model(self._select(features, self.user_inputs), training=training)
        candidates = self.item_model(self._select(features, self.item_inputs), training=training)
        candidate_ids = features[ITEM_ID]
        probability = features.get(SAMPLING_PROBABILITY)
        candidate_mask = None
        if HARD_NEGATIVE_ITEM_ID in features and self.stage > 1:
            negatives = self.item_model(self._select(features, self.item_inputs, hard_negatives=True),
                                        training=training)
            candidates = tf.concat([candidates, negatives], axis=0)
            candidate_ids = tf.concat([candidate_ids, features[HARD_NEGATIVE_ITEM_ID]], 0)
            mask = tf.cast(features[HARD_NEGATIVE_MASK], candidates.dtype)
            candidate_mask = tf.concat([tf.ones_like(mask), mask], axis=0)
            if probability is not None:
                negative_probability = (features[HARD_NEGATIVE_SAMPLING_PROBABILITY]
                                        if self.hard_negative_correction == IN_BATCH_CORRECTION
                                        else tf.ones_like(probability))
                probability = tf.concat([probability, negative_probability], axis=0)
        upstream = query * self.upstream_query_mask if self.stage > 1 else None
        return self.tasks[self.stage - 1](
            query, candidates, candidate_sampling_probability=probability,
            candidate_ids=candidate_ids, compute_metrics=not training,
            upstream_query_embeddings=upstream, candidate_mask=candidate_mask)

    def user_vectors(self, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """``f_u`` over a dict of arrays; ``[N, D]`` float32."""
        return _predict(self.user_model, self._select(inputs, self.user_inputs), batch_size)

    def item_vectors(self, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """``f_i`` over a dict of arrays; ``[N, D]`` float32."""
        return _predict(self.item_model, self._select(inputs, self.item_inputs), batch_size)

    def stage_query(self, user_vectors: np.ndarray, stage: int) -> np.ndarray:
        """Query vectors whose inner product with item vectors is ``s_stage``."""
        return scoring.stage_queries(user_vectors, self.owner_stage, stage)

    def fused_query(self, user_vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
        """Query vectors whose inner product with item vectors is ``sum_t k_t s_t``."""
        return scoring.fused_query(user_vectors, self.owner_stage, weights)


@tf.function(reduce_retracing=True)
def _forward(model, batch):
    return model(batch, training=False)


def _predict(model: tf.keras.Model, inputs: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, batch_size):
        batch = {k: tf.constant(v[start:start + batch_size]) for k, v in inputs.items()}
        out.append(_forward(model, batch).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)
