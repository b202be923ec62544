"""String id -> row index lookup for towers with large vocabularies."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


def string_lookup(vocabulary: Sequence[str] | np.ndarray, name: str) -> tf.keras.layers.StringLookup:
    """A ``StringLookup`` (one OOV bucket at index 0, ids at ``1..len(vocabulary)``) for ``vocabulary``.

    The vocabulary is *set* on the layer rather than passed to its constructor. A constructor
    vocabulary is part of the layer's config, and ``tf.saved_model.save`` serialises and deep-copies
    the towers' configs on every walk of the object graph, so exporting a tower with 1M item ids took
    minutes; a set vocabulary is table content (stored as an asset in ``.keras`` files) and the
    config stays small.
    """
    layer = tf.keras.layers.StringLookup(num_oov_indices=1, name=name)
    layer.set_vocabulary(np.asarray(vocabulary).astype(str))
    return layer
