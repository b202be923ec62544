"""Masked towers: functional tf-keras models whose every parameter has an owner stage.

A tower maps a dict of per-example features to a ``[B, D]`` vector::

    id --StringLookup--> MaskedEmbedding (id_embedding_dim) --+
    each categorical feature --StringLookup--> MaskedEmbedding -+--concat--> MaskedDense(h1, relu)
    each numeric feature --Normalization-------------------------+           ... MaskedDense(D, linear)

Every masked layer sits in a tfmot pruning wrapper (:mod:`csmf_tf.layers.masked`). Units are
embedding columns and Dense neurons; numeric inputs belong to stage 1 (they are data, not
parameters). :class:`MaskedTower` knows the wiring, so it can turn unit owners into weight owners
(``s(i) <= s(j)``) for every layer.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.table import CATEGORICAL, NUMERIC, Catalog
from csmf_tf.layers import masked
from csmf_tf.layers.lookup import string_lookup
from csmf_tf.masks import ownership

keras = tf.keras


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Layer sizes of one tower (defaults: docs/method.md section 9)."""

    id_embedding_dim: int = 64
    feature_embedding_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    output_dim: int = 64


class MaskedTower:
    """A functional tower plus the wiring needed to derive weight owners from unit owners.

    Attributes:
      model: ``tf.keras.Model``, ``{name: [B]} -> [B, output_dim]``.
      embeddings: wrapped :class:`MaskedEmbedding` layers, in concat order.
      numeric_width: number of numeric input columns (after the embeddings in the concat).
      dense: wrapped :class:`MaskedDense` layers, input to output.
    """

    def __init__(self, model: keras.Model, embeddings: Sequence[masked.Wrapper], numeric_width: int,
                 dense: Sequence[masked.Wrapper]):
        self.model = model
        self.embeddings = list(embeddings)
        self.numeric_width = numeric_width
        self.dense = list(dense)

    @property
    def wrappers(self) -> list[masked.Wrapper]:
        return self.embeddings + self.dense

    @property
    def output_layer(self) -> masked.MaskedDense:
        return self.dense[-1].layer

    def dense_input_owner(self, index: int) -> np.ndarray:
        """Owner of each input unit of ``dense[index]``."""
        if index > 0:
            return self.dense[index - 1].layer.unit_owner.numpy()
        parts = [w.layer.unit_owner.numpy() for w in self.embeddings]
        parts.append(np.ones(self.numeric_width, np.int32))
        return np.concatenate(parts)

    def sync_weight_owners(self) -> None:
        """Unit level: set every weight owner from the unit owners (``o(W[i,j]) = s(j)`` if allowed)."""
        for wrapper in self.embeddings:
            layer = wrapper.layer
            if layer.column_owners:  # its owners are the unit owners
                continue
            layer.weight_owner.assign(
                ownership.embedding_weight_owner(layer.unit_owner.numpy(), layer.input_dim))
        for index, wrapper in enumerate(self.dense):
            wrapper.layer.weight_owner.assign(ownership.dense_weight_owner(
                self.dense_input_owner(index), wrapper.layer.unit_owner.numpy()))

    def apply_stage(self, stage: int) -> None:
        for wrapper in self.wrappers:
            masked.apply_stage(wrapper, stage)

    def reinitialise(self, stage: int, seed: int) -> None:
        for offset, wrapper in enumerate(self.wrappers):
            masked.reinitialise_stage_units(wrapper, stage, seed + 7919 * offset)


def _vocabulary(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values})


def build_tower(name: str, id_key: str, catalog: Catalog, feature_kinds: Mapping[str, str],
                config: TowerConfig, seed: int = 0, sparse_embeddings: bool = False,
                weight_level: bool = False) -> MaskedTower:
    """Build a masked tower for the entities of ``catalog`` (vocabularies and statistics from it).

    Unknown ids and categories at serving time go to one out-of-vocabulary bucket (index 0).
    ``sparse_embeddings``: the embeddings are row-masked (:class:`~csmf_tf.layers.masked.RowMaskedPruneLowMagnitude`)
    with owners per column, or per weight when ``weight_level`` (weight-level CPP gives every weight its
    own owner); a training step then costs O(batch), not O(vocabulary), in the embedding tables.
    """
    inputs: dict[str, keras.Input] = {id_key: keras.Input(shape=(), dtype=tf.string, name=id_key)}
    embeddings, parts = [], []

    def embed(key: str, values: np.ndarray, dim: int) -> None:
        vocabulary = _vocabulary(values)
        index = string_lookup(vocabulary, name=f"{name}_{key}_lookup")(inputs[key])
        wrapper = masked.wrap(masked.MaskedEmbedding(
            len(vocabulary) + 1, dim, embeddings_initializer=keras.initializers.RandomUniform(
                -0.05, 0.05, seed=seed + len(embeddings)), name=f"{name}_{key}_embedding",
            column_owners=sparse_embeddings and not weight_level), row_masks=sparse_embeddings)
        embeddings.append(wrapper)
        parts.append(wrapper(index))

    embed(id_key, catalog.ids, config.id_embedding_dim)
    numeric: list[str] = []
    for feature, values in catalog.features.items():
        kind = feature_kinds[feature]
        if kind == CATEGORICAL:
            inputs[feature] = keras.Input(shape=(), dtype=tf.string, name=feature)
            embed(feature, values, config.feature_embedding_dim)
        elif kind == NUMERIC:
            inputs[feature] = keras.Input(shape=(), dtype=tf.float32, name=feature)
            numeric.append(feature)
        else:
            raise ValueError(f"{name}: feature {feature!r} has unknown kind {kind!r}")
    for feature in numeric:
        values = np.asarray(catalog.features[feature], np.float32)
        column = keras.layers.Reshape((1,), name=f"{name}_{feature}_column")(inputs[feature])
        parts.append(keras.layers.Normalization(
            mean=float(values.mean()), variance=float(values.var()) or 1.0,
            name=f"{name}_{feature}_normalization")(column))

    hidden = keras.layers.Concatenate(name=f"{name}_concat")(parts) if len(parts) > 1 else parts[0]
    dense = []
    sizes = [*config.hidden_units, config.output_dim]
    for depth, units in enumerate(sizes):
        last = depth == len(sizes) - 1
        wrapper = masked.wrap(masked.MaskedDense(
            units, activation=None if last else "relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100 + depth),
            name=f"{name}_dense_{depth}" if not last else f"{name}_output"))
        dense.append(wrapper)
        hidden = wrapper(hidden)
    model = keras.Model(inputs=inputs, outputs=hidden, name=name)
    return MaskedTower(model, embeddings, len(numeric), dense)
