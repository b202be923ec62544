"""Data layer: the cascade table, validating readers and adapters, synthetic data, splits, tf.data pipelines.

Modules: ``table`` (InteractionTable, Catalog), ``validation`` (row-checked CSV/TSV reading),
``adapters`` (generic CSV/TSV, Beibei, MovieLens, AliExpress, Ali-CCP), ``synthetic`` (cascade generator),
``files`` (CSV and TFRecord writers/readers), ``splits`` (train/val/test), ``features`` (the batch
contract: every key a training batch carries), ``tfdata`` (per-objective ``tf.data`` pipelines),
``streaming`` (the same pipelines streamed from TFRecord shards), ``example_encoding`` (fast Example
writer), ``prepared`` (splits, catalogs and evaluation sets of a run).
TensorFlow is imported lazily (only by the TFRecord and tf.data functions).
"""
from csmf_tf.data.adapters import read_ali_ccp, read_aliexpress, read_beibei, read_generic, read_movielens
from csmf_tf.data.splits import Splits, pair_hash_unit, split_table
from csmf_tf.data.files import read_csv, read_tfrecord, write_csv, write_positive_shards, write_tfrecord
from csmf_tf.data.synthetic import (DEFAULT_NUM_EXPOSURES, DEFAULT_NUM_ITEMS, DEFAULT_NUM_USERS, CascadeConfig,
                                    CascadeFiles, CascadeTruth, default_dataset, generate_cascade,
                                    generate_cascade_with_truth, write_cascade_tfrecord)
from csmf_tf.data.streaming import HardNegativeIndex, TFRecordSource
from csmf_tf.data.table import CATEGORICAL, DEFAULT_OBJECTIVES, NUMERIC, Catalog, InteractionTable
from csmf_tf.data import features
from csmf_tf.data.tfdata import (cascade_hard_negatives, item_sampling_probabilities,
                                 make_objective_dataset, objective_columns)
from csmf_tf.data.validation import (REASONS, BadRow, BadRowsError, LabelRule, TableSpec, ValidationReport,
                                     hash_id, read_delimited, validate_delimited)

__all__ = [
    "CATEGORICAL", "NUMERIC", "DEFAULT_OBJECTIVES", "Catalog", "InteractionTable",
    "REASONS", "BadRow", "BadRowsError", "LabelRule", "TableSpec", "ValidationReport", "hash_id",
    "read_delimited", "validate_delimited",
    "read_generic", "read_beibei", "read_aliexpress", "read_ali_ccp", "read_movielens",
    "CascadeConfig", "CascadeTruth", "generate_cascade", "generate_cascade_with_truth", "default_dataset",
    "DEFAULT_NUM_USERS", "DEFAULT_NUM_ITEMS", "DEFAULT_NUM_EXPOSURES",
    "write_csv", "read_csv", "write_tfrecord", "read_tfrecord", "write_cascade_tfrecord", "CascadeFiles",
    "write_positive_shards",
    "TFRecordSource", "HardNegativeIndex",
    "Splits", "split_table", "pair_hash_unit",
    "features", "item_sampling_probabilities", "cascade_hard_negatives", "objective_columns",
    "make_objective_dataset",
]
