"""Output dimensions reserved for a later objective leave the served vectors.

A model trained with ``TrainingConfig.reserve_tau`` (:mod:`csmf_tf.training.extend`) has output dimensions
owned by stage ``S + 1`` (the reserve): no objective it serves uses them, and both towers output exactly zero there (their
weights and biases are inactive). They would only widen the index and the query, so the export keeps the
dimensions owned by stages ``1..S``: the towers it serves end in a fixed column selection.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def drop_reserved_dimensions(user_model: tf.keras.Model, item_model: tf.keras.Model, owner_stage: np.ndarray,
                             num_stages: int) -> tuple[tf.keras.Model, tf.keras.Model, np.ndarray]:
    """``(user_model, item_model, owner_stage)`` without the output dimensions owned by stage
    ``num_stages + 1`` (the reserve); the arguments themselves when there are none, or when nothing else
    would be left (the caller's own checks then name what is wrong with ``owner_stage``). The towers
    returned are functional models over the same layers (nothing is copied or changed)."""
    owner_stage = np.asarray(owner_stage)
    served = owner_stage != num_stages + 1
    if served.all() or not served.any() or owner_stage.ndim != 1:
        return user_model, item_model, owner_stage
    columns = tf.constant(np.flatnonzero(served), tf.int32)

    def select(model: tf.keras.Model) -> tf.keras.Model:
        picked = tf.keras.layers.Lambda(lambda v: tf.gather(v, columns, axis=1), name="served_dimensions")
        return tf.keras.Model(model.input, picked(model.output), name=model.name)

    return select(user_model), select(item_model), owner_stage[served]
