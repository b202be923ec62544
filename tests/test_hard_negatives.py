"""Cascade hard negatives reach the loss: the batch contract from the data pipelines to the model.

The data pipelines (in memory and streamed from TFRecord shards) write the keys of
:mod:`csmf_tf.data.features`; the model at stage 2 must score ``2B`` candidates (in-batch positives,
then hard negatives), drop the hard-negative column of every row without one, and give a loss that
differs from the in-batch-only loss. The reference loss is computed here in numpy from the model's
own towers.
"""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data import features
from csmf_tf.data.streaming import TFRecordSource
from csmf_tf.data.files import write_tfrecord
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.data.tfdata import make_objective_dataset
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training.stages import TrainingConfig, build_model

CONFIG = TrainingConfig(tower=TowerConfig(8, 4, (16,), 8), min_output_units=2, temperature=0.2, eta=0.5)


@pytest.fixture(scope="module")
def table():
    table = generate_cascade(120, 80, 4000, seed=5)
    # The users of the first click rows clicked everything they saw: they have no cascade hard negative
    # for click, so the first batch mixes rows with and without one.
    first_users = np.unique(table.user_id[np.flatnonzero(table.positives("click"))[:6]])
    rows = np.isin(table.user_id, first_users) & (table.positives("exposure"))
    table.labels[rows, table.objective_index("click")] = 1
    return table


@pytest.fixture(scope="module")
def model(table):
    model = build_model(CONFIG, table.user_catalog(), table.item_catalog(), table.feature_kinds,
                        factorized_metrics=False)
    model.set_stage(2, reinitialise=True, seed=1)
    return model


def _batches(table, tmp_path_factory):
    memory = make_objective_dataset(table, "click", 64, shuffle=False, item_catalog=table.item_catalog(),
                                    hard_negatives=True)
    root = tmp_path_factory.mktemp("hn_shards")
    write_tfrecord(table, root / "cascade", num_shards=2)
    source = TFRecordSource(str(root / "cascade-*.tfrecord"), shuffle_buffer=256)
    streamed = source.objective_dataset("click", 64, shuffle=False, item_catalog=table.item_catalog(),
                                        hard_negatives=True)
    return {"memory": memory, "streaming": streamed}


def _reference_loss(model, batch, drop_hard_negatives=False, in_batch_correction=False):
    """Stage-2 AML loss in numpy: softmax over kept candidates with temperature, margin, log-Q, hits.
    ``in_batch_correction``: the hard negatives take their item's share for log-Q (else ``p = 1``)."""
    user = model.user_model({k: batch[k] for k in model.user_inputs}).numpy()
    items = model.item_model({k: batch[k] for k in model.item_inputs}).numpy()
    ids = batch[features.ITEM_ID].numpy()
    probability = batch[features.SAMPLING_PROBABILITY].numpy()
    keep = np.ones(len(ids), bool)
    if not drop_hard_negatives:
        negatives = model.item_model({k: batch[features.hard_negative(k)] for k in model.item_inputs}).numpy()
        items = np.concatenate([items, negatives])
        ids = np.concatenate([ids, batch[features.HARD_NEGATIVE_ITEM_ID].numpy()])
        negative_probability = (batch[features.HARD_NEGATIVE_SAMPLING_PROBABILITY].numpy() if in_batch_correction
                                else np.ones_like(probability))
        probability = np.concatenate([probability, negative_probability])
        keep = np.concatenate([keep, batch[features.HARD_NEGATIVE_MASK].numpy() == 1.0])
    b = len(user)
    eye = np.eye(b, len(items), dtype=bool)

    def logits(query):
        z = query @ items.T / CONFIG.temperature - np.log(probability)[None, :]
        z[(ids[None, :] == ids[:b, None]) & ~eye] = -np.inf      # accidental hits
        z[:, ~keep] = -np.inf                                      # rows without a hard negative
        return z

    upstream = logits(user * model.upstream_query_mask.numpy())
    p_up = np.exp(upstream - upstream.max(1, keepdims=True))
    p_up = np.diag(p_up / p_up.sum(1, keepdims=True))
    z = logits(user)
    z[np.arange(b), np.arange(b)] -= CONFIG.eta * (1.0 - p_up)
    top = z.max(1, keepdims=True)
    return float(np.sum(np.log(np.exp(z - top).sum(1)) + top[:, 0] - np.diag(z)))


@pytest.mark.parametrize("pipeline", ["memory", "streaming"])
def test_hard_negatives_reach_the_loss(table, model, tmp_path_factory, pipeline):
    batch = next(iter(_batches(table, tmp_path_factory)[pipeline]))
    mask = batch[features.HARD_NEGATIVE_MASK].numpy()
    assert 0 < mask.sum() < len(mask), "the batch needs rows with and without a hard negative"
    loss = float(model.compute_loss(batch))
    # 2B candidates with the masked columns removed, exactly as the numpy reference computes it.
    assert loss == pytest.approx(_reference_loss(model, batch), rel=1e-4)
    # Different from the in-batch-only loss (the hard negatives are in the softmax).
    in_batch_only = {k: v for k, v in batch.items() if not k.startswith(features.HARD_NEGATIVE_PREFIX)
                     and k != features.HARD_NEGATIVE_MASK}
    assert features.HARD_NEGATIVE_SAMPLING_PROBABILITY not in in_batch_only
    plain = float(model.compute_loss(in_batch_only))
    assert plain == pytest.approx(_reference_loss(model, batch, drop_hard_negatives=True), rel=1e-4)
    assert abs(loss - plain) > 1e-3
    # A masked row contributes nothing: changing its hard negative (to another item) leaves the loss.
    masked = np.flatnonzero(mask == 0.0)
    changed = dict(batch)
    for key in [features.hard_negative(k) for k in model.item_inputs]:
        values = batch[key].numpy().copy()
        values[masked] = values[np.flatnonzero(mask == 1.0)[0]]
        changed[key] = tf.constant(values)
    assert float(model.compute_loss(changed)) == pytest.approx(loss, rel=1e-6)


def test_stage_one_ignores_hard_negatives(table, tmp_path_factory):
    stage_one = build_model(CONFIG, table.user_catalog(), table.item_catalog(), table.feature_kinds,
                            factorized_metrics=False)
    batch = next(iter(_batches(table, tmp_path_factory)["memory"]))
    in_batch_only = {k: v for k, v in batch.items() if not k.startswith(features.HARD_NEGATIVE_PREFIX)
                     and k != features.HARD_NEGATIVE_MASK}
    assert float(stage_one.compute_loss(batch)) == pytest.approx(float(stage_one.compute_loss(in_batch_only)))


@pytest.mark.parametrize("pipeline", ["memory", "streaming"])
def test_in_batch_correction_of_hard_negatives_reads_their_items_share(table, model, tmp_path_factory, pipeline):
    """``hard_negative_correction="in_batch"``: both pipelines write each hard negative's item share of the
    click positives (the smallest share for an item without a click), and the loss corrects the hard
    negatives' logits by it; the default ignores the column (p = 1)."""
    from csmf_tf.data.tfdata import item_sampling_probabilities

    # Many items, few clicks: most hard negatives are items nobody clicked (the smallest share).
    sparse = generate_cascade(60, 1500, 2000, seed=2)
    shares = item_sampling_probabilities(sparse, "click")
    written, seen = [], []
    for rows in _batches(sparse, tmp_path_factory)[pipeline]:
        seen += rows[features.HARD_NEGATIVE_ITEM_ID].numpy().astype(str).tolist()
        written += rows[features.HARD_NEGATIVE_SAMPLING_PROBABILITY].numpy().tolist()
    assert any(i not in shares for i in seen) and any(i in shares for i in seen)
    np.testing.assert_allclose(written, [shares.get(i, min(shares.values())) for i in seen], rtol=1e-6)

    batch = next(iter(_batches(table, tmp_path_factory)[pipeline]))
    corrected = build_model(dataclasses.replace(CONFIG, hard_negative_correction="in_batch"), table.user_catalog(),
                            table.item_catalog(), table.feature_kinds, factorized_metrics=False)
    corrected.set_stage(2, reinitialise=True, seed=1)
    corrected.set_weights(model.get_weights())
    loss = float(corrected.compute_loss(batch))
    assert loss == pytest.approx(_reference_loss(corrected, batch, in_batch_correction=True), rel=1e-4)
    assert abs(loss - float(model.compute_loss(batch))) > 1e-3
    # The key reaches the loss: changing the shares changes it under "in_batch" and not by default.
    changed = dict(batch, **{features.HARD_NEGATIVE_SAMPLING_PROBABILITY:
                             batch[features.HARD_NEGATIVE_SAMPLING_PROBABILITY] * 0.5})
    assert abs(float(corrected.compute_loss(changed)) - loss) > 1e-3
    assert float(model.compute_loss(changed)) == pytest.approx(float(model.compute_loss(batch)), rel=1e-6)


def test_an_unknown_hard_negative_correction_is_refused():
    with pytest.raises(ValueError, match="hard_negative_correction must be one of"):
        dataclasses.replace(CONFIG, hard_negative_correction="uniform")
