"""Inference copies of the towers: pruning masks folded into the weights, tfmot wrappers stripped.

tfmot's ``PruneLowMagnitude`` wrapper runs ``weight.assign(weight * mask)`` on *every* call, training or
not (:meth:`pruning_impl.Pruning.weight_mask_op`). Saved as it is, each masked layer puts an
``AssignVariableOp`` into ``serving_default``: every request would rewrite the user embedding table
(impossible at 10^8 users) and concurrent requests would race on that write. :func:`inference_tower`
returns a functional copy of a tower in which every wrapped layer is a plain layer holding
``weight * mask``, the exact values the masked forward pass multiplies by (float32 ``weight * mask``,
as tfmot computes it), so the copy computes the same outputs with read-only variables:

- a :class:`~csmf_tf.layers.masked.MaskedDense` becomes a ``Dense`` and a
  :class:`~csmf_tf.layers.masked.MaskedEmbedding` an ``Embedding``: their ownership and gradient-mask
  variables (two more tables the size of the weight) are training state and stay behind;
- any other wrapped layer becomes a fresh instance of its own class, its pruned weights folded.

Layers that are not wrapped (``StringLookup`` tables, ``Normalization``, plain ``Dense``) are shared with
the original tower, as ``tfmot.sparsity.keras.strip_pruning`` shares them. Nothing here calls or changes
the original tower: its variables are only read.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

from csmf_tf.layers.masked import MaskedDense, MaskedEmbedding

keras = tf.keras


def pruning_wrappers(model: keras.Model) -> list[PruneLowMagnitude]:
    """Every tfmot pruning wrapper in ``model`` (nested models included)."""
    return [m for m in model.submodules if isinstance(m, PruneLowMagnitude)]


def folded_weights(wrapper: PruneLowMagnitude) -> list[np.ndarray]:
    """The wrapped layer's weights in ``layer.weights`` order, each pruned one as ``weight * mask``."""
    masks = {id(weight): mask for weight, mask, _ in wrapper.pruning_vars}
    out = []
    for weight in wrapper.layer.weights:
        value = weight.numpy()
        if id(weight) in masks:
            # tfmot's own product: tf.math.multiply(weight, mask), cast to the weight's dtype.
            value = (value * masks[id(weight)].numpy()).astype(value.dtype)
        out.append(value)
    return out


def _plain_layer(wrapper: PruneLowMagnitude) -> tuple[keras.layers.Layer, list[np.ndarray]]:
    """A read-only replacement for ``wrapper`` and the values to give it once it is built."""
    layer = wrapper.layer
    values = folded_weights(wrapper)

    def value_of(variable: tf.Variable) -> np.ndarray:
        return next(v for w, v in zip(layer.weights, values) if w is variable)

    if isinstance(layer, MaskedDense):
        return (keras.layers.Dense(layer.units, activation=layer.activation, name=layer.name),
                [value_of(layer.kernel), value_of(layer.bias)])
    if isinstance(layer, MaskedEmbedding):
        return (keras.layers.Embedding(layer.input_dim, layer.output_dim, name=layer.name),
                [value_of(layer.embeddings)])
    return layer.__class__.from_config(layer.get_config()), values


def inference_tower(model: keras.Model) -> keras.Model:
    """``model`` itself when it holds no pruning wrapper, else its folded, wrapper-free copy (see module
    docstring). Raises ``ValueError`` for a subclassed model with wrappers (it cannot be cloned)."""
    if not pruning_wrappers(model):
        return model
    replaced: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, PruneLowMagnitude):
            plain, values = _plain_layer(layer)
            replaced.append((plain, values))
            return plain
        if isinstance(layer, keras.Model):
            return inference_tower(layer)
        return layer   # shared: lookup tables and statistics are read-only at inference

    try:
        folded = keras.models.clone_model(model, clone_function=clone)
    except ValueError as e:   # clone_model's message for a subclassed model
        raise ValueError(f"cannot fold the pruning masks of {model.name!r}: {e} Build the tower as a "
                         "functional or Sequential tf.keras model to export it") from e
    for plain, values in replaced:   # built by the clone's call on the new inputs
        plain.set_weights(values)
    return folded
