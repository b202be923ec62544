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

**Row-sparse embeddings** (``wrap(layer, row_masks=True)``, ``TrainingConfig.sparse_embeddings``). tfmot's
wrapper rewrites the whole table (``weight <- weight * mask``) on every forward pass, and the masks and
owners above are three more tables of the same size: a step costs O(vocabulary) and the table's memory
is four-fold. :class:`RowMaskedPruneLowMagnitude` keeps the active mask in the tfmot wrapper but
multiplies it into the looked-up rows instead (``E[ids] * M[ids]``: the same values, an O(batch)
cost), and a :class:`MaskedEmbedding` with ``column_owners`` stores its owners and masks per column
(``[d]``: with unit-level ownership an embedding's units are its columns, and ``E[r, c]`` is owned by
``s(c)``). Inactive weights are still exactly zero in the table: :func:`apply_stage` zeroes them and
their gradient is always zero. Weight-level ownership with row masks keeps ``[V, d]`` owners and masks
(gathered per batch row): O(batch) time, four tables of memory. With a sparse optimizer
(:class:`~csmf_tf.training.optimizers.LazyAdam`) a training step then reads and writes only the
batch's rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.keras import compat as tf_compat
from tensorflow_model_optimization.python.core.keras import utils as tfmot_utils
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude as Wrapper

from csmf_tf.layers import sharding
from csmf_tf.masks import ownership

keras = tf.keras
#: Rows per block when a column-owned table is read or rewritten whole (stage changes, CPP): the
#: temporary memory stays one block, not one more table.
ROW_BLOCK = 1 << 16


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

    def _add_ownership(self, weight_shape: tuple[int, ...], units: int, per_weight: bool = True) -> None:
        """Owner and gradient-mask variables; ``per_weight=False``: one owner per unit (column), no
        ``weight_owner``, and a ``[units]`` gradient mask that broadcasts over the weight's rows."""
        def add(name, shape, dtype, value):
            return self.add_weight(name=name, shape=shape, dtype=dtype, trainable=False,
                                   initializer=keras.initializers.Constant(value))

        # Everything starts owned by stage 1 and trainable in stage 1.
        self.unit_owner = add("unit_owner", (units,), tf.int32, 1)
        if per_weight:
            self.weight_owner = add("weight_owner", weight_shape, tf.int32, 1)
        self.weight_gradient_mask = add("weight_gradient_mask", weight_shape if per_weight else (units,),
                                        tf.float32, 1.0)

    @property
    def owned_weight(self) -> tf.Variable:
        """The weight whose entries carry owners (kernel or embedding table)."""
        raise NotImplementedError

    def weight_owners(self) -> np.ndarray:
        """``o(w)`` of every weight, broadcastable to :attr:`owned_weight` (``[units]`` when owners are
        per column)."""
        return self.weight_owner.numpy()

    def units_of(self, stage: int) -> np.ndarray:
        """Bool ``[units]``: the units ``stage`` owns (``s(j) == stage``)."""
        return ownership.owned_by(self.unit_owner.numpy(), stage)

    def weights_of(self, stage: int) -> np.ndarray:
        """Bool, broadcastable to :attr:`owned_weight`: the weights ``stage`` owns (``o(w) == stage``)."""
        return ownership.owned_by(self.weight_owners(), stage)

    def active_column_l1(self, stage: int) -> np.ndarray:
        """``[units]``: L1 norm of each column's weights that are active in ``stage``."""
        weight = np.abs(self.owned_weight.numpy())
        return (weight * ownership.active_mask(self.weight_owners(), stage)).sum(axis=0)

    def keep_active(self, active: np.ndarray) -> None:
        """Zero the weights whose ``active`` entry (broadcastable to the weight) is 0."""
        self.owned_weight.assign(self.owned_weight.numpy() * active)

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
    ``column_owners``: owners and masks per column (``[output_dim]``) instead of per weight (unit-level
    ownership only; see the module docstring).
    """

    def __init__(self, input_dim: int, output_dim: int,
                 embeddings_initializer: str = "uniform", column_owners: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.column_owners = bool(column_owners)

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=(self.input_dim, self.output_dim),
                                          initializer=self.embeddings_initializer)
        self._add_ownership((self.input_dim, self.output_dim), self.output_dim,
                            per_weight=not self.column_owners)
        super().build(input_shape)

    @property
    def owned_weight(self) -> tf.Variable:
        return self.embeddings

    def weight_owners(self) -> np.ndarray:
        return self.unit_owner.numpy() if self.column_owners else super().weight_owners()

    def _rows(self, mask: tf.Variable, ids: tf.Tensor) -> tf.Tensor:
        """The rows ``ids`` of a table-shaped mask, or a per-column mask as it is (it broadcasts)."""
        return mask if self.column_owners else tf.nn.embedding_lookup(mask, ids)

    def call(self, inputs, active_mask: tf.Variable | None = None):
        """``active_mask``: the wrapper's mask, multiplied into the rows (:class:`RowMaskedPruneLowMagnitude`)."""
        ids = tf.cast(inputs, tf.int64)
        rows = tf.nn.embedding_lookup(self.embeddings, ids)
        if active_mask is not None:
            rows = rows * self._rows(active_mask, ids)
        return gradient_masked(rows, self._rows(self.weight_gradient_mask, ids))

    def _write_rows(self, start: int, stop: int, rows: tf.Tensor) -> None:
        """``embeddings[start:stop] = rows`` as a scatter: plain, mirrored (multi-worker) and row-sharded
        (parameter-server) variables all take it, where a slice assignment works only on the first."""
        self.embeddings.scatter_update(tf.IndexedSlices(rows, tf.range(start, stop, dtype=tf.int64)))

    def _row_blocks(self):
        for start in range(0, self.input_dim, ROW_BLOCK):
            yield start, min(start + ROW_BLOCK, self.input_dim)

    def active_column_l1(self, stage: int) -> np.ndarray:
        if not self.column_owners:
            return super().active_column_l1(stage)
        total = np.zeros(self.output_dim, np.float64)
        for start, stop in self._row_blocks():
            total += tf.reduce_sum(tf.abs(self.embeddings[start:stop]), axis=0).numpy()
        return (total * ownership.active_mask(self.unit_owner.numpy(), stage)).astype(np.float32)

    def keep_active(self, active: np.ndarray) -> None:
        if not self.column_owners:
            return super().keep_active(active)
        if active.all():
            return
        for start, stop in self._row_blocks():
            self._write_rows(start, stop, self.embeddings[start:stop] * active)

    def reinitialise_columns(self, columns: np.ndarray, seed: int) -> None:
        """Column-owned table: fresh initial values in ``columns`` (bool ``[output_dim]``), drawn per
        block of rows (seed ``seed + block``), so no second table is ever held."""
        if not columns.any():
            return
        config = self.embeddings_initializer.get_config()
        for block, (start, stop) in enumerate(self._row_blocks()):
            fresh = self.embeddings_initializer.__class__.from_config({**config, "seed": seed + block})(
                (stop - start, self.output_dim), dtype=self.embeddings.dtype)
            self._write_rows(start, stop, tf.where(columns, fresh, self.embeddings[start:stop]))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "column_owners": self.column_owners}


@keras.utils.register_keras_serializable(package="csmf_tf")
class RowMaskedPruneLowMagnitude(Wrapper):
    """tfmot's pruning wrapper for a :class:`MaskedEmbedding` that masks the looked-up rows.

    The active mask is the wrapper's ``mask`` variable as in :class:`PruneLowMagnitude` (``pruning_vars``,
    ``UpdatePruningStep``, ``PruningSummaries`` and folding see it as usual), shaped like the layer's
    gradient mask (``[d]`` for column owners). ``call`` multiplies it into the rows the batch looks up
    instead of rewriting the whole table, and skips tfmot's mask update (the schedule is
    :class:`NeverPrune`: CSMF assigns masks itself). ``UpdatePruningStep`` still re-masks the whole table
    once per epoch (``weight_mask_op``), which is a no-op on a correctly masked table.
    """

    def build(self, input_shape):
        keras.layers.Wrapper.build(self, input_shape)   # builds the embedding layer
        weight = self.layer.embeddings
        self.prunable_weights = [weight]
        mask = self.add_weight("mask", shape=self.layer.weight_gradient_mask.shape, initializer="ones",
                               dtype=weight.dtype, trainable=False, aggregation=tf.VariableAggregation.MEAN)
        threshold = self.add_weight("threshold", shape=[], initializer="zeros", dtype=weight.dtype,
                                    trainable=False, aggregation=tf.VariableAggregation.MEAN)
        self.pruning_vars = [(weight, mask, threshold)]
        self.pruning_step = self.add_weight("pruning_step", shape=[], dtype=tf.int64, trainable=False,
                                            initializer=keras.initializers.Constant(-1))
        self.pruning_obj = pruning_impl.Pruning(
            training_step_fn=lambda: self.pruning_step, pruning_vars=self.pruning_vars,
            pruning_schedule=self.pruning_schedule, block_size=self.block_size,
            sparsity_m_by_n=self.sparsity_m_by_n, block_pooling_type=self.block_pooling_type)

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()

        def increment_step():
            with tf.control_dependencies([tf_compat.assign(self.pruning_step, self.pruning_step + 1)]):
                return tf.no_op("update")

        # tfmot's step counter, kept exactly as PruneLowMagnitude keeps it (PruningSummaries logs against it).
        self.add_update(tfmot_utils.smart_cond(training, increment_step, lambda: tf.no_op("no_update")))
        return self.layer.call(inputs, active_mask=wrapper_mask(self))


MaskedLayer = MaskedDense | MaskedEmbedding


def wrap(layer: MaskedLayer, row_masks: bool = False) -> Wrapper:
    """Wrap a masked layer in tfmot's pruning wrapper with a schedule that never prunes.

    ``row_masks`` (embeddings only): :class:`RowMaskedPruneLowMagnitude`, whose mask multiplies the
    looked-up rows instead of the whole table (see the module docstring).
    """
    if not row_masks:
        return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=NeverPrune(),
                                                        name=f"prune_{layer.name}")
    if not isinstance(layer, MaskedEmbedding):
        raise ValueError(f"row masks apply to embedding lookups; {layer.name} is a {type(layer).__name__}")
    return RowMaskedPruneLowMagnitude(layer, pruning_schedule=NeverPrune(), name=f"prune_{layer.name}")


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
    owner = layer.weight_owners()
    active = ownership.active_mask(owner, stage)
    wrapper_mask(wrapper).assign(active)
    layer.weight_gradient_mask.assign(ownership.trainable_mask(owner, stage))
    layer.keep_active(active)
    if isinstance(layer, MaskedDense):
        unit_owner = layer.unit_owner.numpy()
        layer.bias_gradient_mask.assign(ownership.trainable_mask(unit_owner, stage))
        layer.bias.assign(layer.bias.numpy() * ownership.active_mask(unit_owner, stage))


def reinitialise_stage_units(wrapper: Wrapper, stage: int, seed: int) -> None:
    """Fresh initial values for the weights owned by ``stage`` (called when that stage begins)."""
    layer: MaskedLayer = wrapper.layer
    if isinstance(layer, MaskedEmbedding) and layer.column_owners:
        layer.reinitialise_columns(layer.units_of(stage), seed)
        return
    weight = layer.owned_weight
    initializer = (layer.kernel_initializer if isinstance(layer, MaskedDense)
                   else layer.embeddings_initializer)
    fresh = initializer.__class__.from_config({**initializer.get_config(), "seed": seed})(
        weight.shape, dtype=weight.dtype).numpy()
    weight.assign(np.where(layer.weights_of(stage), fresh, weight.numpy()))
    if isinstance(layer, MaskedDense):
        layer.bias.assign(np.where(layer.units_of(stage), 0.0, layer.bias.numpy()).astype(np.float32))
