import numpy as np
import pytest

from csmf_tf.masks.cpp import apply_guard_rails, cpp_prune


def test_uniform_layer_prunes_a_fraction_tau():
    # c = 1..10; prune c_j <= 0.3 * 10 = 3 -> the first three.
    pruned = cpp_prune(np.ones(10), 0.3)
    assert pruned.sum() == 3
    assert pruned[:3].all() and not pruned[3:].any()  # stable order on ties


def test_skewed_layer_prunes_every_near_zero_unit():
    values = np.array([5.0, 0.01, 4.0, 0.02, 0.03, 6.0, 0.01, 5.0])
    # ascending: .01 .01 .02 .03 4 5 5 6 ; cumsum .01 .02 .04 .07 4.07 ...; total 20.07; tau .2 -> 4.014
    pruned = cpp_prune(values, 0.2)
    np.testing.assert_array_equal(np.flatnonzero(pruned), [1, 3, 4, 6])


def test_cut_includes_equality():
    # ascending 1,1,2 ; cumsum 1,2,4 ; tau*c_n = 0.5*4 = 2 -> c_j <= 2 prunes two.
    np.testing.assert_array_equal(cpp_prune(np.array([2.0, 1.0, 1.0]), 0.5), [False, True, True])


def test_all_zero_layer_prunes_everything_then_guard_rails_keep_one():
    values = np.zeros(6)
    pruned = cpp_prune(values, 0.3)
    assert pruned.all()
    kept = apply_guard_rails(pruned, values, min_keep=1, min_free=2)
    assert (~kept).sum() == 1 and kept.sum() == 5


def test_guard_rails_free_the_least_informative_when_cpp_frees_too_few():
    values = np.array([3.0, 1.0, 2.0, 10.0])
    pruned = apply_guard_rails(cpp_prune(values, 0.0), values, min_keep=1, min_free=2)
    np.testing.assert_array_equal(pruned, [False, True, True, False])


def test_guard_rails_reject_impossible_requests():
    with pytest.raises(ValueError, match="cannot keep"):
        apply_guard_rails(np.zeros(3, bool), np.ones(3), min_keep=2, min_free=2)


def test_bad_tau_and_values_are_refused():
    with pytest.raises(ValueError, match="tau"):
        cpp_prune(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        cpp_prune(np.array([1.0, -1.0]), 0.3)

