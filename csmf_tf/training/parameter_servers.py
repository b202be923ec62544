"""Training every CSMF stage under ``tf.distribute.ParameterServerStrategy``.

One cluster from ``TF_CONFIG``: ``ps`` tasks hold the variables, ``worker`` tasks run training steps,
one ``chief`` (the coordinator) runs the stage loop. Every task runs the same command
(``csmf train --parameter-servers``); :func:`serve_task` turns a ``ps`` or ``worker`` task into a
``tf.distribute.Server`` that serves until it is stopped, and the chief builds the strategy
(:func:`parameter_server_strategy`) and trains through it:

- **sharded tables**: a ``MinSizePartitioner`` splits every variable of at least ``min_shard_bytes``
  row-wise over the parameter servers, so an embedding table and its same-shaped ``weight_owner``,
  ``weight_gradient_mask`` and tfmot ``mask`` are ``ShardedVariable``s cut at the same rows, shard ``i``
  of each on the same server (:class:`AlignedMinSizePartitioner`); :mod:`csmf_tf.layers.sharding`
  makes the masked layers work on them and :func:`placement` records where each shard lives;
- **Keras fit with a dataset function**: each stage's ``fit`` reads a
  ``tf.keras.utils.experimental.DatasetCreator`` (:func:`per_worker_input`) that every worker runs for
  itself, repeated, with ``steps_per_epoch`` = the batches of one pass over the stage's data;
- **stage transitions, CPP, validation and checkpoints** run on the coordinator, reading and writing
  the shards (``ShardedVariable.assign`` writes each shard its slice);
- **a lost worker**: ``ClusterCoordinator`` puts the training steps a failed worker was running back
  in its queue and the other workers run them, so the fit goes on; a worker that comes back (same
  address) is used again. A lost parameter server or chief is not recoverable by the strategy: run
  the command again and the run resumes from its stage checkpoints and epoch backups;
- **lookup tables without shared names**: the towers' ``StringLookup`` tables are copied onto every
  worker, and rebuilt there after a worker failure. TensorFlow names an eager table after a counter
  of the coordinator process, so a later coordinator on the same (long-lived) workers, or a rebuild
  after a loss, met a table of that name from an earlier run holding other ids ("Table was already
  initialized with different data"). Under this strategy every ``StaticHashTable`` is anonymous
  (:func:`anonymous_lookup_tables`): each copy is its own resource, freed with its handle.

Training is asynchronous (each worker applies its own steps), so a run is not bit-identical to
another; frozen parameters are, since their gradient is exactly zero on every worker.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import tensorflow as tf
from tensorflow.python.framework.ops import resource_creator_scope  # no public API for it

from csmf_tf.layers import masked
from csmf_tf.layers.sharding import is_partitioned, mask_per_shard, row_shards

#: ``TF_CONFIG`` task types that only serve (the chief is the coordinator).
SERVER_TASKS = ("ps", "worker")
#: TensorFlow's own ``MinSizePartitioner`` default: variables under 256 KiB stay whole.
DEFAULT_MIN_SHARD_BYTES = 256 << 10
#: Batches a worker shuffles its copy of the stage's data by (see :func:`per_worker_input`).
WORKER_SHUFFLE_BATCHES = 256


def cluster_resolver() -> tf.distribute.cluster_resolver.TFConfigClusterResolver:
    """The cluster of ``TF_CONFIG``, checked: ``ps``, ``worker`` and one ``chief`` task, this task one of
    them. ``ValueError`` naming what is missing."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().as_dict()
    missing = [job for job in ("ps", "worker", "chief") if not jobs.get(job)]
    if missing:
        raise ValueError(f"TF_CONFIG needs ps, worker and chief tasks for parameter-server training; "
                         f"its cluster {sorted(jobs)} lacks {missing}")
    if len(jobs["chief"]) != 1:
        raise ValueError(f"TF_CONFIG must name one chief task, got {len(jobs['chief'])}")
    if resolver.task_type not in (*SERVER_TASKS, "chief"):
        raise ValueError(f"TF_CONFIG task type must be ps, worker or chief, got {resolver.task_type!r}")
    return resolver


def serve_task(resolver: tf.distribute.cluster_resolver.ClusterResolver) -> None:
    """Run this ``ps`` or ``worker`` task's ``tf.distribute.Server``; returns only if the server stops."""
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol=resolver.rpc_layer or "grpc",
                                  start=True)
    print(f"{resolver.task_type} {resolver.task_id} serving at {server.target}", flush=True)
    server.join()


class AlignedMinSizePartitioner(tf.distribute.experimental.partitioners.MinSizePartitioner):
    """TensorFlow's ``MinSizePartitioner`` that also puts shard ``i`` of every partitioned variable on
    parameter server ``i mod k``.

    The strategy places shards round-robin from a running count of all the variables it created, so
    shard 0 of a table and shard 0 of its mask would land on whichever servers the count gives. Aligned,
    the shards a masking op or a gathered gradient mask combine (same shape, same rows) sit on the same
    server, and a table's per-step ``w_i <- w_i * m_i`` never crosses the network. The strategy asks the
    partitioner just before it creates the shards, so this is where the count is reset.
    """

    def __init__(self, min_shard_bytes: int, max_shards: int):
        super().__init__(min_shard_bytes=min_shard_bytes, max_shards=max_shards)
        self.strategy: tf.distribute.ParameterServerStrategy | None = None

    def __call__(self, shape, dtype, axis=0):
        partitions = super().__call__(shape, dtype, axis)
        if partitions[axis] > 1 and self.strategy is not None:
            self.strategy.extended._variable_count = 0  # the next shard goes to ps task 0
        return partitions


def parameter_server_strategy(resolver: tf.distribute.cluster_resolver.ClusterResolver,
                              min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES,
                              max_shards: int | None = None) -> tf.distribute.ParameterServerStrategy:
    """The coordinator's strategy: variables of at least ``min_shard_bytes`` split row-wise into shards of
    at least that size, over at most ``max_shards`` (default: every parameter server) shards, shard ``i``
    on parameter server ``i mod k`` (:class:`AlignedMinSizePartitioner`)."""
    num_ps = len(resolver.cluster_spec().as_dict()["ps"])
    max_shards = num_ps if max_shards is None else max_shards
    if min_shard_bytes < 1 or max_shards < 1:
        raise ValueError(f"min_shard_bytes and max_shards must be >= 1, got {min_shard_bytes}, {max_shards}")
    partitioner = AlignedMinSizePartitioner(min_shard_bytes, max_shards)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    if not hasattr(strategy.extended, "_variable_count"):
        raise RuntimeError("this TensorFlow's ParameterServerStrategy places variables without the round-robin "
                           "count AlignedMinSizePartitioner aligns shards by (csmf_tf/training/parameter_servers.py)")
    partitioner.strategy = strategy
    anonymous_lookup_tables(strategy)
    return strategy


def _anonymous_table(next_creator, *args, **kwargs):
    kwargs["experimental_is_anonymous"] = True
    return next_creator(*args, **kwargs)


def anonymous_lookup_tables(strategy: tf.distribute.ParameterServerStrategy) -> None:
    """Make every ``tf.lookup.StaticHashTable`` created in ``strategy.scope()`` anonymous.

    The strategy turns such a table (a ``StringLookup``'s) into a ``DistributedTable`` whose copy on
    each worker a resource closure creates, again whenever the coordinator rebuilds a worker's
    resources after a failure. A named table's name is ``str(ops.uid())``, a counter of the
    coordinator process, and a worker's tables outlive the coordinator: a rebuild (a new number) or
    another coordinator on the same workers (the same numbers) could name a table that an earlier
    coordinator had filled with other ids, and its import failed with "Table was already initialized
    with different data". An anonymous table has no name to meet: every copy is its own resource,
    freed with its handle. Our creator sits under the strategy's, so the per-worker copies, which call
    the creator below the strategy's again, are anonymous too. Lookups are unchanged.
    """
    extended = strategy.extended
    strategy_scopes = extended._resource_creator_scope  # what ``strategy.scope()`` enters, one or a list

    def scopes() -> list:
        theirs = strategy_scopes()
        # Entered first, so innermost: the strategy's table creator wraps this one.
        return [resource_creator_scope("StaticHashTable", _anonymous_table),
                *(theirs if isinstance(theirs, list) else [theirs] if theirs is not None else [])]

    extended._resource_creator_scope = scopes


def in_use() -> bool:
    """Whether the current ``tf.distribute`` strategy (``strategy.scope()``) is a parameter-server one."""
    return isinstance(tf.distribute.get_strategy(), tf.distribute.ParameterServerStrategy)


def prepare_model(towers) -> None:
    """Make the masked layers of ``towers`` work on partitioned variables (:mod:`csmf_tf.layers.sharding`)."""
    mask_per_shard([wrapper for tower in towers for wrapper in tower.wrappers])


def per_worker_input(make_dataset: Callable[[], tf.data.Dataset], one_pass: tf.data.Dataset,
                     ) -> tuple[tf.keras.utils.experimental.DatasetCreator, int]:
    """``(dataset creator, steps per epoch)`` for a ``fit`` under the strategy.

    Every worker builds ``make_dataset()`` (one pass over the stage's batches, like ``one_pass``, which
    gives the number of steps) for itself, repeats it and shuffles its batches with an unseeded shuffle:
    the dataset function is traced once and run on every worker with the same input context, so only a
    runtime seed gives each worker its own order (with the pass's seeded order alone, every worker
    would apply the same batches). An epoch is one pass's worth of steps, shared by the workers.
    """
    steps = int(one_pass.cardinality())
    if steps < 1:
        raise ValueError("parameter-server training needs training batches of known, non-zero number "
                         f"(in-memory training rows, not streamed shards); got cardinality {steps}")

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        del input_context  # one input pipeline per worker, all with the same context
        return make_dataset().repeat().shuffle(min(steps, WORKER_SHUFFLE_BATCHES), seed=None)

    return tf.keras.utils.experimental.DatasetCreator(dataset_fn), steps


def placement(model) -> dict:
    """Where every variable of the masked layers lives: ``{"<layer>/<variable>": {"shape", "shards":
    [{"device", "rows"}]}}``, for tables, owners, gradient masks and tfmot masks."""
    report = {}
    for tower in model.towers:
        for wrapper in tower.wrappers:
            layer = wrapper.layer
            named = {"weight": layer.owned_weight, "weight_gradient_mask": layer.weight_gradient_mask,
                     "mask": masked.wrapper_mask(wrapper)}
            if hasattr(layer, "weight_owner"):
                named["weight_owner"] = layer.weight_owner
            for name, variable in named.items():
                report[f"{layer.name}/{name}"] = {
                    "shape": [int(d) for d in variable.shape], "partitioned": is_partitioned(variable),
                    "shards": [{"device": shard.device, "rows": int(shard.shape[0]) if shard.shape.rank else 1}
                               for shard, _ in row_shards(variable)]}
    return report


def write_placement(model, out_dir: Path) -> Path:
    """:func:`placement` as ``<out_dir>/parameter_servers.json``."""
    path = Path(out_dir) / "parameter_servers.json"
    path.write_text(json.dumps(placement(model), indent=2))
    return path
