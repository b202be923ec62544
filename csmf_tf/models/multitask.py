"""Shared-bottom and MMoE two-towers with one output vector per objective (baselines of section 8).

Both towers map a dict of features to ``S`` vectors, ``[B, S, D]``; objective ``t`` is scored by
``<u_t, v_t>`` and the fused ranking of weights ``k`` is ``sum_t k_t <u_t, v_t>`` =
``<concat_t(k_t u_t), concat_t(v_t)>``, an ``S * D``-dimensional inner product (or ``S`` ANN queries).

They are built from the CSMF towers (:func:`csmf_tf.models.towers.build_tower`, every unit owned by
stage 1, i.e. ordinary layers) so the embeddings, feature handling and MLP sizes are the same:

- **shared-bottom**: ``h = trunk(x)``, the plain tower without its output layer (embeddings -> MLP,
  ReLU); ``u_t = W_t h + b_t``, one linear head ``[h_last, D]`` per objective. With ``S = 1`` this is
  exactly the plain two-tower.
- **MMoE** (Ma et al., KDD 2018): ``x`` = the tower's input block (concatenated embeddings and
  normalised numeric features); ``E`` experts ``e_k = MLP_k(x)`` with the tower's hidden sizes; one
  gate per objective ``g_t = softmax(G_t x + c_t)`` (``[E]``); ``u_t = W_t (sum_k g_tk e_k) + b_t``.

Training (:class:`MultiVectorTwoTower`): one ``tfrs.tasks.Retrieval`` per objective (in-batch softmax,
temperature, log-Q correction, accidental-hit removal: the cascade's loss with ``eta = 0``). Each step
reads one batch of every objective's positives, from the same ``tf.data`` pipeline as the cascade
(:func:`multitask_dataset`), and minimises ``sum_t w_t L_t`` with ``w_1 = 1`` and ``w_t = c`` for the
later objectives (:func:`head_loss_weights`). Adam normalises each parameter's gradient scale, so ``c``
leaves a head's own learning rate unchanged and sets how much the later objectives shape the shared
layers: ``c = 1`` lets their few positives (each seen many times per epoch, as their batches repeat)
pull the shared layers towards them; a small ``c`` keeps the shared layers on the first objective and
makes each later head a readout of them. The experiments tune ``c`` on validation
(:data:`HEAD_WEIGHTINGS`, :mod:`csmf_tf.experiments.methods`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.data.tfdata import make_objective_dataset
from csmf_tf.data.features import ITEM_ID, SAMPLING_PROBABILITY, USER_ID
from csmf_tf.models.cascade import _predict
from csmf_tf.models.towers import MaskedTower, TowerConfig, build_tower
from csmf_tf.tasks.aml import hit_keys

keras = tf.keras

#: The later objectives' loss weights ``c`` the experiments try (on synthetic data, a validation pilot of
#: shared-bottom gave click Recall@50 0.28 / 0.36 / 0.39 / 0.52 at c = 1 / 0.25 / 0.1 / 0.03).
HEAD_WEIGHTINGS = (1.0, 0.1, 0.01)

SHARED_BOTTOM = "shared_bottom"
MMOE = "mmoe"
ARCHITECTURES = (SHARED_BOTTOM, MMOE)


def _stack_heads(name: str, inputs, heads: Sequence[tf.Tensor]) -> keras.Model:
    stacked = keras.layers.Lambda(lambda xs: tf.stack(xs, axis=1), name=f"{name}_stack")(list(heads))
    return keras.Model(inputs=inputs, outputs=stacked, name=name)


def shared_bottom_tower(tower: MaskedTower, num_objectives: int, seed: int = 0) -> keras.Model:
    """``{features} -> [B, S, D]``: ``tower``'s trunk (all but its output layer) and ``S`` linear heads."""
    name = tower.model.name
    trunk = tower.dense[-1].input           # last hidden activations (ReLU), [B, h_last]
    dim = tower.output_layer.units
    heads = [keras.layers.Dense(dim, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + t),
                                name=f"{name}_head_{t}")(trunk) for t in range(num_objectives)]
    return _stack_heads(f"{name}_shared_bottom", tower.model.input, heads)


def mmoe_tower(tower: MaskedTower, hidden_units: Sequence[int], num_objectives: int, num_experts: int,
               seed: int = 0) -> keras.Model:
    """``{features} -> [B, S, D]``: ``tower``'s input block, ``num_experts`` MLP experts, one softmax
    gate and one linear head per objective."""
    if num_experts < 1 or not hidden_units:
        raise ValueError("MMoE needs at least one expert and at least one hidden layer per expert")
    name = tower.model.name
    block = tower.dense[0].input            # concatenated embeddings + numeric features, [B, F]
    experts = []
    for k in range(num_experts):
        hidden = block
        for depth, units in enumerate(hidden_units):
            hidden = keras.layers.Dense(
                units, activation="relu", name=f"{name}_expert_{k}_{depth}",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100 * k + depth))(hidden)
        experts.append(hidden)
    expert_stack = keras.layers.Lambda(lambda xs: tf.stack(xs, axis=1), name=f"{name}_experts")(experts)
    heads = []
    for t in range(num_objectives):
        gate = keras.layers.Dense(num_experts, activation="softmax", name=f"{name}_gate_{t}",
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 7 + t))(block)
        # sum_k g_tk e_k: [B, E, 1] * [B, E, H] summed over E.
        mixed = keras.layers.Lambda(lambda xs: tf.reduce_sum(xs[0][:, :, None] * xs[1], axis=1),
                                    name=f"{name}_mix_{t}")([gate, expert_stack])
        heads.append(keras.layers.Dense(
            tower.output_layer.units, name=f"{name}_head_{t}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 50 + t))(mixed))
    return _stack_heads(f"{name}_mmoe", tower.model.input, heads)


def build_multitask_towers(architecture: str, users: Catalog, items: Catalog, feature_kinds: Mapping[str, str],
                           config: TowerConfig, num_objectives: int, num_experts: int = 3,
                           seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """User and item multi-vector towers of ``architecture`` (``"shared_bottom"`` or ``"mmoe"``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    towers = []
    for offset, (name, key, catalog) in enumerate((("user", USER_ID, users), ("item", ITEM_ID, items))):
        base = build_tower(name, key, catalog, feature_kinds, config, seed=seed + offset)
        if architecture == SHARED_BOTTOM:
            towers.append(shared_bottom_tower(base, num_objectives, seed=seed + 1000 * (offset + 1)))
        else:
            towers.append(mmoe_tower(base, config.hidden_units, num_objectives, num_experts,
                                     seed=seed + 1000 * (offset + 1)))
    return towers[0], towers[1]


def head_loss_weights(objectives: Sequence[str], later: float) -> tuple[float, ...]:
    """``w_t``: 1 for the first objective, ``later`` for every later one (see the module docstring)."""
    if not later >= 0:
        raise ValueError(f"the later objectives' loss weight must be >= 0, got {later!r}")
    return (1.0,) + (float(later),) * (len(objectives) - 1)


def prefixed(objective: str, key: str) -> str:
    return f"{objective}/{key}"


def multitask_dataset(train: InteractionTable, objectives: Sequence[str], batch_size: int, items: Catalog,
                      seed: int = 0) -> tf.data.Dataset:
    """One element per step: a batch of every objective's positives, keys ``"<objective>/<key>"``.

    Each objective's batches come from :func:`~csmf_tf.data.tfdata.make_objective_dataset` (shuffled,
    log-Q sampling probabilities of that objective). An epoch is one pass over the objective with the
    most positives; the others repeat (they are smaller: a cascade thins out).
    """
    sizes = [int(train.positives(o).sum()) for o in objectives]
    driver = int(np.argmax(sizes))
    datasets = []
    for t, objective in enumerate(objectives):
        ds = make_objective_dataset(train, objective, batch_size, shuffle=True, seed=seed + t,
                                    item_catalog=items, hard_negatives=False)
        datasets.append(ds if t == driver else ds.repeat())

    def flatten(*batches):
        return {prefixed(o, k): v for o, batch in zip(objectives, batches) for k, v in batch.items()}

    return tf.data.Dataset.zip(tuple(datasets)).map(flatten)


class MultiVectorTwoTower(tfrs.Model):
    """Two towers producing ``S`` vectors each, one retrieval task per objective.

    Args:
      user_model, item_model: ``{features} -> [B, S, D]`` (:func:`build_multitask_towers`).
      objectives: the ``S`` objective names, in the order of the towers' output vectors.
      temperature, remove_accidental_hits: of every ``tfrs.tasks.Retrieval``.
      loss_weights: ``w_t`` per objective (default all 1).

    ``compute_loss`` expects :func:`multitask_dataset` batches and returns ``sum_t w_t L_t`` where ``L_t``
    is objective ``t``'s in-batch softmax loss on its own batch, scored with output vector ``t``.
    """

    def __init__(self, user_model: keras.Model, item_model: keras.Model, objectives: Sequence[str],
                 temperature: float = 0.05, remove_accidental_hits: bool = True,
                 loss_weights: Sequence[float] | None = None):
        super().__init__()
        self.loss_weights = tuple(float(w) for w in ((1.0,) * len(objectives) if loss_weights is None
                                                     else loss_weights))
        if len(self.loss_weights) != len(objectives) or min(self.loss_weights) < 0:
            raise ValueError(f"loss_weights must be {len(objectives)} non-negative numbers (one per objective "
                             f"{tuple(objectives)}), got {loss_weights}")
        self.user_model, self.item_model = user_model, item_model
        self.objectives = tuple(objectives)
        if user_model.output_shape[1] != len(self.objectives) or item_model.output_shape[1] != len(self.objectives):
            raise ValueError(f"towers must output one vector per objective ({len(self.objectives)})")
        self.user_inputs = list(user_model.input.keys())
        self.item_inputs = list(item_model.input.keys())
        self.tasks = [tfrs.tasks.Retrieval(temperature=temperature, remove_accidental_hits=remove_accidental_hits,
                                           name=f"{o}_retrieval") for o in self.objectives]

    @property
    def output_dim(self) -> int:
        return int(self.user_model.output_shape[-1])

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        losses = []
        for t, objective in enumerate(self.objectives):
            query = self.user_model({k: features[prefixed(objective, k)] for k in self.user_inputs},
                                    training=training)[:, t]
            candidates = self.item_model({k: features[prefixed(objective, k)] for k in self.item_inputs},
                                         training=training)[:, t]
            losses.append(self.loss_weights[t] * self.tasks[t](
                query, candidates,
                candidate_sampling_probability=features[prefixed(objective, SAMPLING_PROBABILITY)],
                candidate_ids=hit_keys(features[prefixed(objective, ITEM_ID)]), compute_metrics=False))
        return tf.add_n(losses)

    def user_vectors(self, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """``[N, S, D]`` float32: every objective's user vector."""
        return _predict(self.user_model, {k: inputs[k] for k in self.user_inputs}, batch_size)

    def item_vectors(self, inputs: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
        """``[N, S, D]`` float32: every objective's item vector."""
        return _predict(self.item_model, {k: inputs[k] for k in self.item_inputs}, batch_size)


__all__ = ["SHARED_BOTTOM", "MMOE", "ARCHITECTURES", "HEAD_WEIGHTINGS",
           "build_multitask_towers", "shared_bottom_tower", "mmoe_tower", "head_loss_weights", "multitask_dataset",
           "MultiVectorTwoTower"]
