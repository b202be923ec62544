"""The quality protocol: who is ranked against what, the popularity prior, and early stopping from the start."""
import dataclasses

import numpy as np
import pytest

from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.metrics.prior import PRIOR_GRID, log_popularity, tune_prior, with_prior
from csmf_tf.metrics.protocol import OBJECTIVE, SEEN, build_evaluation
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training.evaluation import current_vectors
from csmf_tf.training.stages import TrainingConfig, build_model, fit_objective

TOWER = TowerConfig(8, 4, (16,), 8)


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(150, 90, 5000, seed=7))


def _excluded(eval_set, user_row) -> set:
    row = int(np.flatnonzero(eval_set.user_rows == user_row)[0])
    return set(eval_set.excluded(row).tolist()) | set(eval_set.positives(row).tolist())


def test_seen_rule_excludes_every_training_pair_for_every_objective(data):
    seen = build_evaluation(data.train, data.val, data.users, data.items, exclusion=SEEN)
    old = build_evaluation(data.train, data.val, data.users, data.items, exclusion=OBJECTIVE)
    assert seen.exclusion == SEEN and old.exclusion == OBJECTIVE
    eval_set, old_set = seen.eval_sets["click"], old.eval_sets["click"]
    user_row = int(eval_set.user_rows[0])
    user = data.users.ids[user_row]
    item_row = {str(i): r for r, i in enumerate(data.items.ids)}
    mine = data.train.user_id == user
    exposed = {item_row[str(i)] for i in data.train.item_id[mine]}
    clicked = {item_row[str(i)] for i in data.train.item_id[mine & data.train.positives("click")]}
    positives = set(eval_set.positives(int(np.flatnonzero(eval_set.user_rows == user_row)[0])).tolist())
    # (a validation positive that was also a training pair stays a positive: it is not excluded)
    assert _excluded(eval_set, user_row) == exposed | positives       # every training pair of the user
    assert _excluded(old_set, user_row) == clicked | positives        # only the objective's positives
    assert clicked < exposed


def test_prior_is_one_inner_product_for_stage_and_fused_scores(data):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(len(data.users), 6)), rng.normal(size=(len(data.items), 6))
    objectives = data.table.objectives
    vectors = ScoringVectors(objectives, [users * (rng.random(6) > 0.3) for _ in objectives], [items] * 3)
    log_pop = log_popularity(data.train, objectives, data.items.ids)
    alphas, weights = [0.5, 1.5, 3.0], [1.0, 2.0, 0.5]
    scored = with_prior(vectors, log_pop, alphas)
    assert scored.shared_items and scored.serving()["vector_dim"] == 6 + 3
    for t in range(3):
        expected = vectors.queries[t] @ items.T + alphas[t] * log_pop[:, t][None, :]
        np.testing.assert_allclose(scored.queries[t] @ scored.items[t].T, expected, rtol=1e-4, atol=1e-4)
    query, fused_items = scored.fused(weights)
    expected = sum(k * (vectors.queries[t] @ items.T + alphas[t] * log_pop[:, t][None, :])
                   for t, k in enumerate(weights))
    np.testing.assert_allclose(query @ fused_items.T, expected, rtol=1e-4, atol=1e-3)


def test_tuned_prior_is_the_best_grid_point_on_validation(data):
    rng = np.random.default_rng(1)
    objectives = data.table.objectives
    items = rng.normal(size=(len(data.items), 4)).astype(np.float32)
    vectors = ScoringVectors(objectives, [rng.normal(size=(len(data.users), 4)).astype(np.float32)] * 3, [items] * 3)
    log_pop = log_popularity(data.train, objectives, data.items.ids)
    scored, alphas = tune_prior(vectors, log_pop, data.validation)
    tuned = evaluate_vectors(scored, data.validation, ks=(50,))["stage"]
    for t, objective in enumerate(objectives):
        eval_set = data.validation.eval_sets[objective]
        ratio = np.std(vectors.queries[t][eval_set.user_rows][:256] @ items.T) / np.std(log_pop[:, t])
        for multiple in PRIOR_GRID:
            alternative = with_prior(vectors, log_pop, [multiple * ratio if s == t else 0.0 for s in range(3)])
            value = evaluate_vectors(alternative, data.validation, ks=(50,))["stage"][f"{objective}/recall@50"]
            assert tuned[f"{objective}/recall@50"] >= value - 1e-12
    # Random vectors carry no signal: popularity decides, so the prior must beat alpha = 0 here.
    raw = evaluate_vectors(vectors, data.validation, ks=(50,))["stage"]
    assert tuned["click/recall@50"] > raw["click/recall@50"]
    assert max(alphas) > 0


def test_start_point_is_an_early_stopping_candidate(data):
    # A trained tower, then a fit whose learning rate is far too large: every epoch ruins the towers,
    # so the fit must hand back the weights it started from, bit for bit, and report them as the best.
    config = TrainingConfig(objectives=("exposure",), tau=(), tower=TOWER, max_epochs=3, patience=2,
                            learning_rate=3e-3, batch_size=256)
    model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
    fit_objective(model, data.train, "exposure", data.items, data.validation, config, 3, verbose=0)
    before = [w.copy() for w in model.get_weights()]
    start = evaluate_vectors(current_vectors(model, data.validation, ("exposure",)), data.validation,
                             ks=(50,))["stage"]["exposure/recall@50"]
    ruinous = dataclasses.replace(config, learning_rate=50.0)
    log = fit_objective(model, data.train, "exposure", data.items, data.validation, ruinous, 2, verbose=0)
    assert log["start_val_recall@50"] == pytest.approx(start)
    assert max(log["val_recall@50"]) < start          # the epochs were worse ...
    assert log["best_epoch"] == 0                     # ... so the start won
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert log["best_val_recall@50"] == pytest.approx(start)
    # Keras' own rule (start not a candidate) keeps the best *epoch*, which is worse than the start.
    model.set_weights(before)
    keras_rule = dataclasses.replace(ruinous, start_is_candidate=False)
    log = fit_objective(model, data.train, "exposure", data.items, data.validation, keras_rule, 2, verbose=0)
    after = evaluate_vectors(current_vectors(model, data.validation, ("exposure",)), data.validation,
                             ks=(50,))["stage"]["exposure/recall@50"]
    assert after < start and after == pytest.approx(max(log["val_recall@50"]))


@pytest.mark.parametrize("field,value,message", [
    ("tau", (1.2, 0.3), "tau must be in [0, 1)"),
    ("tau", (0.3,) * 3, "tau needs 2 values"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("fusion_weights", (1.0, float("inf"), 1.0), "fusion_weights must be finite"),
])
def test_config_is_checked_when_built(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainingConfig(**{field: value})


def test_weight_level_refuses_aml():
    with pytest.raises(ValueError, match="eta must be 0 with granularity 'weight'"):
        TrainingConfig(granularity="weight", eta=0.5)
    assert TrainingConfig(granularity="weight", eta=0.0).granularity == "weight"
    with pytest.raises(ValueError):
        dataclasses.replace(TrainingConfig(eta=0.5), granularity="weight")
