"""CSMF invariants on a real (small) cascade: frozen stages, exact stage scores, fusion, size."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training import checkpoints
from csmf_tf.training.evaluation import evaluate_model
from csmf_tf.training.stages import TrainingConfig, build_model, run_cascade
from csmf_tf.data.prepared import prepare

CONFIG = TrainingConfig(tower=TowerConfig(16, 4, (32,), 16), max_epochs=4, patience=2,
                        recovery_max_epochs=2, batch_size=256, min_output_units=2, tau=(0.3, 0.3),
                        eta=0.5, learning_rate=3e-3, later_stage_batch_size=64)


@pytest.fixture(scope="module")
def data():
    # Big enough that the later stages have a few thousand clicks and ~1k conversions to learn from:
    # at 500 users x 30k exposures the click/conversion comparison with exposure-only was within noise.
    return prepare(generate_cascade(1000, 400, 60000, seed=3))


@pytest.fixture(scope="module")
def cascade(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    model = build_model(CONFIG, data.users, data.items, data.table.feature_kinds)
    run_cascade(model, data.train, data.items, data.validation, CONFIG, out, verbose=0)
    return model, out


def _masked_layers(model):
    return [w.layer for tower in model.towers for w in tower.wrappers]


def _vectors(model, data):
    return (model.user_vectors(data.users.as_inputs(USER_ID)), model.item_vectors(data.items.as_inputs(ITEM_ID)))


def test_earlier_stage_parameters_are_bit_identical(cascade, data):
    """Every weight and bias a stage kept is bit-identical in the final model to its frozen value."""
    model, out = cascade
    frozen = build_model(CONFIG, data.users, data.items, data.table.feature_kinds)
    for stage in (1, 2):
        checkpoints.load_stage(frozen, out, stage)
        for before, after in zip(_masked_layers(frozen), _masked_layers(model)):
            kept = after.weight_owner.numpy() <= stage
            assert kept.any(), after.name
            np.testing.assert_array_equal(before.owned_weight.numpy()[kept], after.owned_weight.numpy()[kept],
                                          err_msg=f"{after.name} changed after stage {stage} froze it")
            if hasattr(after, "bias"):
                unit = after.unit_owner.numpy() <= stage
                np.testing.assert_array_equal(before.bias.numpy()[unit], after.bias.numpy()[unit])


def test_final_stage_one_scores_equal_the_stage_one_checkpoint(cascade, data):
    model, out = cascade
    fresh = build_model(CONFIG, data.users, data.items, data.table.feature_kinds)
    checkpoints.load_stage(fresh, out, 1)
    u1, v1 = _vectors(fresh, data)
    u, v = _vectors(model, data)
    stage_one = model.stage_query(u, 1) @ v.T
    assert np.abs(stage_one - u1 @ v1.T).max() <= 1e-6
    # and the cumulative stage-2 score equals the stage-2 checkpoint's score
    checkpoints.load_stage(fresh, out, 2)
    u2, v2 = _vectors(fresh, data)
    assert np.abs(model.stage_query(u, 2) @ v.T - u2 @ v2.T).max() <= 1e-5


def test_every_stage_owns_output_dimensions(cascade):
    model, _ = cascade
    owners = model.owner_stage
    assert set(np.unique(owners)) == {1, 2, 3}
    assert (owners == 3).sum() >= CONFIG.min_output_units
    np.testing.assert_array_equal(model.user_tower.output_layer.unit_owner.numpy(),
                                  model.item_tower.output_layer.unit_owner.numpy())


def test_fused_score_equals_weighted_sum_of_stage_scores(cascade, data):
    model, _ = cascade
    u, v = _vectors(model, data)
    rng = np.random.default_rng(0)
    for _ in range(5):
        weights = rng.uniform(-1, 3, size=3)
        fused = model.fused_query(u, weights) @ v.T
        by_stage = sum(k * (model.stage_query(u, t + 1) @ v.T) for t, k in enumerate(weights))
        rel = np.abs(fused - by_stage).max() / np.abs(by_stage).max()
        assert rel <= 1e-5


def test_parameter_count_equals_plain_two_tower(cascade, data):
    model, _ = cascade
    keras = tf.keras

    def plain(catalog, key):
        inputs = {key: keras.Input((), dtype=tf.string, name=key)}
        parts = []
        def embed(name, values, dim):
            lookup = keras.layers.StringLookup(vocabulary=sorted({str(v) for v in values}))
            parts.append(keras.layers.Embedding(lookup.vocabulary_size(), dim)(lookup(inputs[name])))
        embed(key, catalog.ids, CONFIG.tower.id_embedding_dim)
        for name, values in catalog.features.items():
            if data.table.feature_kinds[name] == "categorical":
                inputs[name] = keras.Input((), dtype=tf.string, name=name)
                embed(name, values, CONFIG.tower.feature_embedding_dim)
            else:
                inputs[name] = keras.Input((), dtype=tf.float32, name=name)
                parts.append(keras.layers.Reshape((1,))(inputs[name]))
        x = keras.layers.Concatenate()(parts)
        for units in CONFIG.tower.hidden_units:
            x = keras.layers.Dense(units, activation="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(CONFIG.tower.output_dim)(x))

    expected = plain(data.users, USER_ID).count_params() + plain(data.items, ITEM_ID).count_params()
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == expected


def test_cascade_beats_exposure_only_on_click_and_conversion(cascade, data, tmp_path):
    model, _ = cascade
    baseline_config = dataclasses.replace(CONFIG, objectives=("exposure",), tau=(), fusion_weights=(1.0,))
    baseline = build_model(baseline_config, data.users, data.items, data.table.feature_kinds)
    run_cascade(baseline, data.train, data.items, data.validation, baseline_config, tmp_path, verbose=0)
    objectives = data.table.objectives
    csmf = evaluate_model(model, data.testing, objectives)["stage"]
    exposure_only = evaluate_model(baseline, data.testing, objectives)["stage"]
    for objective in ("click", "conversion"):
        assert csmf[f"{objective}/recall@50"] > exposure_only[f"{objective}/recall@50"], (csmf, exposure_only)


def test_keras_evaluate_reports_tfrs_factorized_top_k(cascade, data):
    """The TFRS path users know: model.evaluate gives FactorizedTopK over the corpus for the current stage."""
    from csmf_tf.data.tfdata import make_objective_dataset
    model, _ = cascade
    dataset = make_objective_dataset(data.test, "conversion", 256, shuffle=False, item_catalog=data.items)
    metrics = model.evaluate(dataset, return_dict=True, verbose=0)
    hit_rates = [metrics[f"conversion_factorized_top_k/top_{k}_categorical_accuracy"] for k in (20, 50, 100, 200)]
    assert all(0.0 <= h <= 1.0 for h in hit_rates)
    assert hit_rates == sorted(hit_rates) and hit_rates[-1] > hit_rates[0]
