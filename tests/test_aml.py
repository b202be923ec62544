import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from csmf_tf.tasks.aml import AdaptiveMarginRetrieval, hit_keys


def _batch(seed=0, b=6, d=5):
    rng = np.random.default_rng(seed)
    q = tf.constant(rng.normal(size=(b, d)), tf.float32)
    c = tf.constant(rng.normal(size=(b + 3, d)), tf.float32)
    up = tf.constant(rng.normal(size=(b, d)), tf.float32)
    p = tf.constant(rng.uniform(0.01, 0.3, size=b + 3), tf.float32)
    ids = tf.constant([f"i{k % 7}" for k in range(b + 3)])
    return q, c, up, p, ids


@pytest.mark.parametrize("accidental", [False, True])
def test_eta_zero_equals_tfrs_retrieval(accidental):
    q, c, up, p, ids = _batch()
    ours = AdaptiveMarginRetrieval(eta=0.0, temperature=0.1, remove_accidental_hits=accidental)
    ref = tfrs.tasks.Retrieval(temperature=0.1, remove_accidental_hits=accidental)
    a = ours(q, c, candidate_sampling_probability=p, candidate_ids=ids, upstream_query_embeddings=up)
    b = ref(q, c, candidate_sampling_probability=p, candidate_ids=ids)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_hit_keys_are_equal_exactly_where_ids_are_equal():
    rng = np.random.default_rng(3)
    ids = np.array([f"item{k}" for k in rng.integers(0, 40, size=300)])
    keys = hit_keys(tf.constant(ids)).numpy()
    assert keys.dtype.kind == "i"
    np.testing.assert_array_equal(keys[:, None] == keys[None, :], ids[:, None] == ids[None, :])
    integers = tf.constant([5, 3, 5], tf.int64)
    assert hit_keys(integers) is integers


def _reference_loss(q, c, up, temperature, margin_of_p, keep=None):
    """The AML formula in numpy: margin in logit units, removed candidates (keep = 0) left out."""
    qn, cn, un = q.numpy(), c.numpy(), up.numpy()
    if keep is not None:
        cn = cn[np.asarray(keep, bool)]
    upstream = un @ cn.T / temperature
    p_up = np.exp(upstream - upstream.max(1, keepdims=True))
    p_up = p_up / p_up.sum(1, keepdims=True)
    margin = margin_of_p(np.diag(p_up[:, :len(qn)]))
    logits = qn @ cn.T / temperature
    logits[np.arange(len(qn)), np.arange(len(qn))] -= margin
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float((logz - np.diag(logits[:, :len(qn)])).sum())


def test_margin_follows_the_formula():
    q, c, up, _, _ = _batch(1)
    eta, temperature = 0.8, 0.5
    loss = float(AdaptiveMarginRetrieval(eta=eta, temperature=temperature)(q, c, upstream_query_embeddings=up))
    assert loss == pytest.approx(_reference_loss(q, c, up, temperature, lambda p: eta * (1 - p)), rel=1e-5)
    # A positive margin makes the positive harder: the loss grows.
    assert loss > float(AdaptiveMarginRetrieval(eta=0.0, temperature=temperature)(q, c))


def test_margin_gets_no_gradient_through_the_upstream_query():
    q, c, up, _, _ = _batch(2)
    task = AdaptiveMarginRetrieval(eta=1.0)
    up = tf.Variable(up)
    with tf.GradientTape() as tape:
        loss = task(q, c, upstream_query_embeddings=up)
    assert tape.gradient(loss, up) is None


def test_pluggable_margin_function():
    q, c, up, _, _ = _batch(3)
    task = AdaptiveMarginRetrieval(eta=1.0, temperature=0.2, margin_fn=lambda p: 2.0 * p ** 2)
    loss = float(task(q, c, upstream_query_embeddings=up))
    assert loss == pytest.approx(_reference_loss(q, c, up, 0.2, lambda p: 2.0 * p ** 2), rel=1e-5)


def test_margin_is_in_logit_units_at_any_temperature():
    # The same eta lowers the positive logit by the same number of nats at T = 0.05 and T = 0.5.
    q, c, up, _, _ = _batch(4)
    for temperature in (0.05, 0.5):
        loss = float(AdaptiveMarginRetrieval(eta=0.5, temperature=temperature)(q, c, upstream_query_embeddings=up))
        assert loss == pytest.approx(_reference_loss(q, c, up, temperature, lambda p: 0.5 * (1 - p)), rel=1e-5)


def test_masked_candidates_leave_both_softmaxes():
    q, c, up, _, _ = _batch(5)
    keep = np.ones(c.shape[0], np.float32)
    keep[[7, 8]] = 0.0     # two of the three extra candidates removed
    task = AdaptiveMarginRetrieval(eta=1.0, temperature=0.2, remove_accidental_hits=False)
    masked = float(task(q, c, upstream_query_embeddings=up, candidate_mask=tf.constant(keep)))
    assert masked == pytest.approx(_reference_loss(q, c, up, 0.2, lambda p: 1.0 * (1 - p), keep), rel=1e-5)
    assert masked != pytest.approx(float(task(q, c, upstream_query_embeddings=up)), rel=1e-3)
