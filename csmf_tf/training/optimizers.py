"""The optimizers a fit can use: tf-keras Adam (the default) and a row-wise lazy Adam.

tf-keras' ``Adam`` applies an ``IndexedSlices`` gradient (an embedding lookup's) by decaying *every*
row's moments and then updating every row of the table: a step costs O(vocabulary) although a batch
touches at most a few thousand rows. :class:`LazyAdam` updates only the rows in the gradient (the
lazy Adam of TF-Addons, which is no longer maintained): their moments are decayed and updated and
their weights moved; the other rows, and their moments, are left as they are. Dense gradients (the
Dense layers') get tf-keras' Adam unchanged.

Trade-off: a row's moments decay only in the steps that touch it, so a rarely seen id keeps a larger
momentum than dense Adam would give it; this is the usual behaviour of sparse Adam variants
(TF-Addons ``LazyAdam``, PyTorch ``SparseAdam``) and mostly changes how rare ids are updated.

Gradient masks stay exact: a weight whose gradient is always zero keeps zero moments, so its update
is ``0 / (sqrt(0) + eps) = 0`` and it stays bit-identical, in a touched row as in an untouched one.
"""
from __future__ import annotations

import tensorflow as tf

ADAM, LAZY_ADAM = "adam", "lazy_adam"
OPTIMIZERS = (ADAM, LAZY_ADAM)


@tf.keras.utils.register_keras_serializable(package="csmf_tf")
class LazyAdam(tf.keras.optimizers.Adam):
    """tf-keras ``Adam`` whose sparse (``IndexedSlices``) updates touch only the gradient's rows.

    tf-keras sums duplicate indices before :meth:`update_step` (``_deduplicate_sparse_grad``), so
    every row here is unique and one scatter per variable suffices.
    """

    def __init__(self, learning_rate: float = 1e-3, **kwargs):
        for option in ("amsgrad", "weight_decay"):  # both would touch every row again
            if kwargs.get(option):
                raise ValueError(f"LazyAdam does not support {option}={kwargs[option]!r}")
        super().__init__(learning_rate=learning_rate, **kwargs)

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_2_power = tf.pow(beta_2, local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - tf.pow(beta_1, local_step))
        epsilon = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon else self.epsilon
        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]
        rows = gradient.indices
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * gradient.values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(gradient.values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(m_rows * alpha / (tf.sqrt(v_rows) + epsilon), rows))


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """A fresh optimizer: ``"adam"`` (tf-keras Adam) or ``"lazy_adam"`` (:class:`LazyAdam`)."""
    if name == ADAM:
        return tf.keras.optimizers.Adam(learning_rate)
    if name == LAZY_ADAM:
        return LazyAdam(learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
