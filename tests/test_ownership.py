"""The ownership rules (csmf_tf.masks.ownership) on hand-made owners, and the layers that ask them."""
import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.layers import masked
from csmf_tf.masks.ownership import (NEVER, active_mask, dense_weight_owner, embedding_weight_owner, hand_off,
                                     owned_by, trainable_mask, upstream_mask)

# Dense weight owners of units s(i) = [1, 2, 3] -> s(j) = [1, 2, 3].
OWNER = np.array([[1, 2, 3], [NEVER, 2, 3], [NEVER, NEVER, 3]], np.int32)


def test_unit_level_weight_owners():
    np.testing.assert_array_equal(dense_weight_owner(np.array([1, 2, 3]), np.array([1, 2, 3])), OWNER)
    np.testing.assert_array_equal(embedding_weight_owner(np.array([2, 1]), 3), [[2, 1]] * 3)


def test_active_trainable_and_upstream_masks_in_stage_two():
    np.testing.assert_array_equal(active_mask(OWNER, 2), [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(trainable_mask(OWNER, 2), [[0, 1, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(upstream_mask(OWNER, 2), [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(owned_by(OWNER, 2), trainable_mask(OWNER, 2).astype(bool))
    assert active_mask(OWNER, 2).dtype == trainable_mask(OWNER, 2).dtype == np.float32
    # Stage 1 has no upstream; NEVER is never active.
    assert not upstream_mask(OWNER, 1).any()
    assert not active_mask(np.array([NEVER]), 3).any()


def test_active_mask_broadcasts_over_stages():
    stages = np.arange(1, 4)[:, None]
    np.testing.assert_array_equal(active_mask(np.array([[2, 1, 3]]), stages),
                                  [[0, 1, 0], [1, 1, 0], [1, 1, 1]])


def test_hand_off_moves_freed_units_to_the_next_stage():
    owner = np.array([1, 2, 2, 3, 2], np.int32)
    new = hand_off(owner, np.array([1, 4]), stage=2)
    np.testing.assert_array_equal(new, [1, 3, 2, 3, 3])
    np.testing.assert_array_equal(owner, [1, 2, 2, 3, 2])  # a copy
    assert new.dtype == np.int32


def test_hand_off_takes_flat_indices_of_weight_owners():
    new = hand_off(OWNER, np.array([4]), stage=2)  # W[1, 1]
    np.testing.assert_array_equal(new, [[1, 2, 3], [NEVER, 3, 3], [NEVER, NEVER, 3]])


def test_hand_off_refuses_parameters_of_another_stage():
    with pytest.raises(ValueError, match="owned by stage 2"):
        hand_off(np.array([1, 2]), np.array([0]), stage=2)


def test_layer_units_and_weights_of_agree_with_ownership():
    layer = masked.MaskedDense(3)
    layer(tf.ones([1, 3]))
    layer.unit_owner.assign([1, 2, 3])
    layer.weight_owner.assign(OWNER)
    for stage in (1, 2, 3):
        np.testing.assert_array_equal(layer.units_of(stage), owned_by(np.array([1, 2, 3]), stage))
        np.testing.assert_array_equal(layer.weights_of(stage), owned_by(OWNER, stage))


def test_zero_units_zeroes_kernel_columns_and_biases_of_a_stage():
    layer = masked.MaskedDense(3, kernel_initializer="ones")
    layer(tf.ones([1, 2]))
    layer.bias.assign([1.0, 1.0, 1.0])
    layer.unit_owner.assign([1, 2, 2])
    layer.zero_units(layer.units_of(2))
    np.testing.assert_array_equal(layer.kernel.numpy(), [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(layer.bias.numpy(), [1, 0, 0])
