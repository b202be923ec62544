"""Masked layers whose variables are partitioned row-wise (``ShardedVariable``, ParameterServerStrategy).

Under ``tf.distribute.ParameterServerStrategy`` with a ``variable_partitioner`` every large variable of
a masked layer is a :class:`~tensorflow.python.distribute.sharded_variable.ShardedVariable`: an
embedding table ``[V, d]`` becomes ``k`` row blocks on ``k`` parameter servers, and so do its
same-shaped ``weight_owner``, ``weight_gradient_mask`` and the tfmot wrapper's ``mask`` (same shape and
byte size, so the partitioner cuts them at the same rows; the project's partitioner also puts shard ``i``
of each on the same parameter server, :mod:`csmf_tf.training.parameter_servers`). What has to change for
that, and where it is done:

- **the wrapper's masking op** (``weight <- weight * mask``, run by tfmot's wrapper on every forward
  pass and by ``UpdatePruningStep`` every epoch): tfmot writes it as a ``merge_call`` with a
  cross-replica reduction, and its mask update as ``distribution.extended.update(mask, ...)``, which a
  ``ShardedVariable`` refuses ("doesn't support being used as a reference") even though the
  :class:`~csmf_tf.layers.masked.NeverPrune` schedule never runs it. :class:`ShardwisePruning` replaces
  the wrapper's ``pruning_obj``: the masking op is one assign per shard, placed on the shard's own
  parameter server (with aligned shards no table crosses the network), and the mask update is no op
  at all (CSMF assigns masks itself);
- **gradient masks**: ``tf.custom_gradient`` cannot take a ``ShardedVariable`` argument, so
  :func:`~csmf_tf.layers.masked.gradient_masked` reads a partitioned argument as one tensor first (the
  gradient flows back through the concatenation to each shard); embedding lookups go through
  TensorFlow's ``embedding_lookup`` dispatch for sharded tables, so their gradients stay per-shard
  ``IndexedSlices``;
- **stage transitions** (``apply_stage``, re-initialisation of freed units, CPP) run on the
  coordinator: ``ShardedVariable.assign`` writes each shard its own slice, and the column-owned tables
  of ``--sparse-embeddings``, read and written block by block, write each block as a row scatter
  (``MaskedEmbedding._write_rows``), which a ``ShardedVariable`` splits by shard.
"""
from __future__ import annotations

from typing import Iterator

import tensorflow as tf
from tensorflow.python.distribute.sharded_variable import ShardedVariable
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl


def is_partitioned(variable) -> bool:
    """Whether ``variable`` is split row-wise over several variables (a ``ShardedVariable``)."""
    return isinstance(variable, ShardedVariable)


def row_shards(variable) -> list[tuple[tf.Variable, int]]:
    """``[(shard, first row)]``: the variables holding ``variable``'s rows (itself when not partitioned)."""
    if not is_partitioned(variable):
        return [(variable, 0)]
    shards, offset = [], 0
    for shard in variable.variables:
        shards.append((shard, offset))
        offset += int(shard.shape[0])
    return shards


def _same_partition(a, b) -> bool:
    """Whether ``a`` and ``b`` are cut at the same rows (so shard ``i`` of each can be combined)."""
    return ([int(s.shape[0]) for s, _ in row_shards(a)] == [int(s.shape[0]) for s, _ in row_shards(b)]
            and a.shape == b.shape)


class ShardwisePruning(pruning_impl.Pruning):
    """tfmot's ``Pruning`` object of a CSMF wrapper, for partitioned weights (see the module docstring).

    ``weight_mask_op`` assigns ``w_i * m_i`` shard by shard on the shard's device, or ``w_i * m`` when
    the mask is one ``[d]`` row (column-owned tables); ``conditional_mask_update`` is no op, which is
    exactly what tfmot does with a schedule that never prunes (checked when built).
    """

    @classmethod
    def replacing(cls, pruning: pruning_impl.Pruning) -> "ShardwisePruning":
        from csmf_tf.layers.masked import NeverPrune  # masked imports this module
        if not isinstance(pruning._pruning_schedule, NeverPrune):
            raise ValueError(f"ShardwisePruning never updates masks; the wrapper's schedule is "
                             f"{type(pruning._pruning_schedule).__name__}, not NeverPrune")
        return cls(pruning_vars=pruning._pruning_vars, pruning_schedule=pruning._pruning_schedule,
                   block_size=pruning._block_size, block_pooling_type=pruning._block_pooling_type,
                   training_step_fn=pruning._step_fn, sparsity_m_by_n=pruning._sparsity_m_by_n)

    def _masked_shards(self) -> Iterator[tuple[tf.Variable, object]]:
        for weight, mask, _ in self._pruning_vars:
            if mask.shape == weight.shape and _same_partition(weight, mask):
                yield from ((w, m) for (w, _), (m, _) in zip(row_shards(weight), row_shards(mask)))
            elif mask.shape == weight.shape:   # cut at other rows: the shard's rows of the whole mask
                whole = tf.convert_to_tensor(mask)
                yield from ((w, whole[first:first + int(w.shape[0])]) for w, first in row_shards(weight))
            else:                              # one [d] row, broadcast over the table's rows
                whole = tf.convert_to_tensor(mask)
                yield from ((w, whole) for w, _ in row_shards(weight))

    def weight_mask_op(self):
        ops = []
        for shard, mask in self._masked_shards():
            with tf.device(shard.device):
                ops.append(shard.assign(shard * mask))
        return tf.group(ops)

    def conditional_mask_update(self):
        return tf.no_op()


def mask_per_shard(wrappers) -> None:
    """Give every wrapper in ``wrappers`` a :class:`ShardwisePruning` (before any training step is
    traced: the wrapper's ``call`` reads ``pruning_obj`` when it is traced)."""
    for wrapper in wrappers:
        wrapper.pruning_obj = ShardwisePruning.replacing(wrapper.pruning_obj)
