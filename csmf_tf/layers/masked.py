"""Masked Dense and Embedding layers: ownership-driven masks in tfmot pruning wrappers.

Each layer is a tf-keras layer implementing tfmot's :class:`PrunableLayer`, and is used wrapped by
``tfmot.sparsity.keras.prune_low_magnitude`` (see :func:`wrap`). The two masks of a stage ``t``
(rules in :mod:`csmf_tf.masks.ownership`):

- the **active-connection mask** ``1[o(w) <= t]`` lives in the wrapper's ``mask`` variable; the
  wrapper multiplies the weight by it on every forward pass, so inactive weights are exactly zero. Its
  schedule is :class:`NeverPrune`, so tfmot never replaces it with a magnitude mask;
- the **gradient mask** ``1[o(w) == t]`` lives in the layer (``kernel_gradient_mask``, ...) and is
  applied by :func:`gradient_masked` inside ``call``: frozen and unborn weights receive an exactly zero
  gradient, whatever the training loop or distribution strategy. With a fresh optimizer per stage, a
  zero gradient from the first step keeps Adam's moments at zero, so frozen weights stay bit-identical.

Ownership itself is stored in non-trainable int32 variables (``unit_owner``, ``weight_owner``), so it
is saved and restored with the weights in every checkpoint. Which units or weights a stage owns is
asked of the layer (:meth:`_OwnedLayer.units_of`, :meth:`_OwnedLayer.weights_of`), which asks
:mod:`~csmf_tf.masks.ownership`.

The stage is never a Python value here: ``call`` (and the wrapper's) reads only the mask variables,
which :func:`apply_stage` assigns, so a traced forward or training step stays correct across stages
without being retraced.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude as Wrapper

from csmf_tf.layers import sharding
from csmf_tf.masks import ownership

keras = tf.keras


@tf.custom_gradient
def _masked_identity(value: tf.Tensor, mask: tf.Tensor):
    def grad(upstream):
        return upstream * mask, tf.zeros_like(mask)

    return tf.identity(value), grad


def gradient_masked(value: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Identity in the forward pass; the backward pass multiplies the gradient by ``mask``.

    A partitioned variable (parameter servers, :mod:`~csmf_tf.layers.sharding`) is read as one tensor
    first: ``tf.custom_gradient`` takes no ``ShardedVariable``."""
    return _masked_identity(*(tf.convert_to_tensor(x) if sharding.is_partitioned(x) else x for x in (value, mask)))


@keras.utils.register_keras_serializable(package="csmf_tf")
class NeverPrune(tfmot.sparsity.keras.PruningSchedule):
    """A pruning schedule that never updates the mask: CSMF assigns masks itself."""

    def __call__(self, step):
        return tf.constant(False), tf.constant(0.0, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {"class_name": self.__class__.__name__, "config": {}}


class _OwnedLayer(keras.layers.Layer, tfmot.sparsity.keras.PrunableLayer):
    """Shared ownership variables of :class:`MaskedDense` and :class:`MaskedEmbedding`."""

    def _add_ownership(self, weight_shape: tuple[int, ...], units: int) -> None:
        def add(name, shape, dtype, value):
            return self.add_weight(name=name, shape=shape, dtype=dtype, trainable=False,
                                   initializer=keras.initializers.Constant(value))

        # Everything starts owned by stage 1 and trainable in stage 1.
        self.unit_owner = add("unit_owner", (units,), tf.int32, 1)
        self.weight_owner = add("weight_owner", weight_shape, tf.int32, 1)
        self.weight_gradient_mask = add("weight_gradient_mask", weight_shape, tf.float32, 1.0)

    @property
    def owned_weight(self) -> tf.Variable:
        """The weight whose entries carry owners (kernel or embedding table)."""
        raise NotImplementedError

    def units_of(self, stage: int) -> np.ndarray:
        """Bool ``[units]``: the units ``stage`` owns (``s(j) == stage``)."""
        return ownership.owned_by(self.unit_owner.numpy(), stage)

    def weights_of(self, stage: int) -> np.ndarray:
        """Bool, shaped like :attr:`owned_weight`: the weights ``stage`` owns (``o(w) == stage``)."""
        return ownership.owned_by(self.weight_owner.numpy(), stage)

    def get_prunable_weights(self) -> list[tf.Variable]:
        return [self.owned_weight]


@keras.utils.register_keras_serializable(package="csmf_tf")
class MaskedDense(_OwnedLayer):
    """Dense layer ``y = act(x @ W + b)`` with per-weight owner stages.

    Shapes: ``x`` ``[B, in]``, ``W`` ``[in, units]``, ``b`` ``[units]``, ``y`` ``[B, units]``.
    The bias follows its unit: its gradient mask is ``1[s(j) == t]``.
    """

    def __init__(self, units: int, activation: str | None = None,
                 kernel_initializer: str = "glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(in_dim, self.units),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_ownership((in_dim, self.units), self.units)
        self.bias_gradient_mask = self.add_weight(
            name="bias_gradient_mask", shape=(self.units,), dtype=tf.float32, trainable=False,
            initializer="ones")
        super().build(input_shape)

    @property
    def owned_weight(self) -> tf.Variable:
        return self.kernel

    def zero_units(self, units: np.ndarray) -> None:
        """Set the kernel columns and biases of ``units`` (bool ``[units]``) to zero."""
        self.kernel.assign(np.where(units[None, :], 0.0, self.kernel.numpy()).astype(np.float32))
        self.bias.assign(np.where(units, 0.0, self.bias.numpy()).astype(np.float32))

    def call(self, inputs):
        kernel = gradient_masked(self.kernel, self.weight_gradient_mask)
        bias = gradient_masked(self.bias, self.bias_gradient_mask)
        return self.activation(tf.matmul(inputs, kernel) + bias)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.utils.register_keras_serializable(package="csmf_tf")
class MaskedEmbedding(_OwnedLayer):
    """Embedding lookup ``y = E[ids]`` with per-weight owner stages; a unit is one column.

    Shapes: ``ids`` ``[B]`` int, ``E`` ``[input_dim, output_dim]``, ``y`` ``[B, output_dim]``.
    The gradient mask is gathered with the rows, so the update stays sparse (``IndexedSlices``).
    """

    def __init__(self, input_dim: int, output_dim: int,
                 embeddings_initializer: str = "uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=(self.input_dim, self.output_dim),
                                          initializer=self.embeddings_initializer)
        self._add_ownership((self.input_dim, self.output_dim), self.output_dim)
        super().build(input_shape)

    @property
    def owned_weight(self) -> tf.Variable:
        return self.embeddings

    def call(self, inputs):
        ids = tf.cast(inputs, tf.int64)
        rows = tf.nn.embedding_lookup(self.embeddings, ids)
        return gradient_masked(rows, tf.nn.embedding_lookup(self.weight_gradient_mask, ids))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)}


MaskedLayer = MaskedDense | MaskedEmbedding


def wrap(layer: MaskedLayer) -> Wrapper:
    """Wrap a masked layer in tfmot's pruning wrapper with a schedule that never prunes."""
    return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=NeverPrune(),
                                                    name=f"prune_{layer.name}")


def wrapper_mask(wrapper: Wrapper) -> tf.Variable:
    """The wrapper's active-connection mask variable (one prunable weight per masked layer)."""
    (_, mask, _), = wrapper.pruning_vars
    return mask


def apply_stage(wrapper: Wrapper, stage: int) -> None:
    """Point a wrapped layer at ``stage``: active mask into tfmot, gradient masks into the layer.

    Also zeroes the weights and biases that are not active yet, so a unit whose stage has not begun
    outputs exactly ``act(0)``.
    """
    layer: MaskedLayer = wrapper.layer
    owner = layer.weight_owner.numpy()
    active = ownership.active_mask(owner, stage)
    wrapper_mask(wrapper).assign(active)
    layer.weight_gradient_mask.assign(ownership.trainable_mask(owner, stage))
    layer.owned_weight.assign(layer.owned_weight.numpy() * active)
    if isinstance(layer, MaskedDense):
        unit_owner = layer.unit_owner.numpy()
        layer.bias_gradient_mask.assign(ownership.trainable_mask(unit_owner, stage))
        layer.bias.assign(layer.bias.numpy() * ownership.active_mask(unit_owner, stage))


def reinitialise_stage_units(wrapper: Wrapper, stage: int, seed: int) -> None:
    """Fresh initial values for the weights owned by ``stage`` (called when that stage begins)."""
    layer: MaskedLayer = wrapper.layer
    weight = layer.owned_weight
    initializer = (layer.kernel_initializer if isinstance(layer, MaskedDense)
                   else layer.embeddings_initializer)
    fresh = initializer.__class__.from_config({**initializer.get_config(), "seed": seed})(
        weight.shape, dtype=weight.dtype).numpy()
    weight.assign(np.where(layer.weights_of(stage), fresh, weight.numpy()))
    if isinstance(layer, MaskedDense):
        layer.bias.assign(np.where(layer.units_of(stage), 0.0, layer.bias.numpy()).astype(np.float32))
