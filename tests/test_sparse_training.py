"""Training at scale: LazyAdam and row-masked embeddings keep CSMF's invariants while touching only batch rows."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from csmf_tf.data.features import HARD_NEGATIVE_ITEM_ID, ITEM_ID, hard_negative
from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.layers.masked import MaskedDense, RowMaskedPruneLowMagnitude
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training import checkpoints
from csmf_tf.training.optimizers import LazyAdam, make_optimizer
from csmf_tf.training.selective_mask import selective_mask
from csmf_tf.training.stages import TrainingConfig, build_model, objective_dataset, run_cascade

SPARSE = TrainingConfig(tower=TowerConfig(16, 4, (32,), 16), objectives=("exposure", "click"), tau=(0.3,),
                        batch_size=128, later_stage_batch_size=64, max_epochs=1, recovery_max_epochs=1,
                        patience=1, min_output_units=2, learning_rate=1e-2, optimizer="lazy_adam",
                        sparse_embeddings=True)


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(300, 200, 8000, seed=5))


def _model(config, data):
    return build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)


def _fit(model, batches, optimizer: str, epochs: int = 1) -> list[float]:
    """Compile a fresh optimizer and take one step per batch per epoch (with UpdatePruningStep, as every
    fit has it); the loss of each epoch."""
    model.compile(optimizer=make_optimizer(optimizer, 1e-2))
    return model.fit(_dataset(batches), epochs=epochs, verbose=0,
                     callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]).history["loss"]


def _dataset(batches: list[dict]) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(lambda: iter(batches), output_signature={
        k: tf.TensorSpec([None], v.dtype) for k, v in batches[0].items()})


def _batches(data, config, stage: int, objective: str, count: int) -> list[dict]:
    return list(objective_dataset(data.train, objective, data.items, config, stage).take(count))


def _stage_two(config, data):
    model = _model(config, data)
    selective_mask(model, 1, config.tau[0], config.granularity, config.min_output_units)
    model.set_stage(2, reinitialise=True, seed=11, zero_item_block=True)
    return model


def _wrappers(model):
    return [w for tower in model.towers for w in tower.wrappers]


def _looked_up_rows(model, wrapper, batch) -> np.ndarray:
    """Rows of ``wrapper``'s table that ``batch`` looks up (positives and, in stage 2, hard negatives)."""
    tower = model.user_tower if wrapper in model.user_tower.wrappers else model.item_tower
    name = wrapper.layer.name
    key = name[len(tower.model.name) + 1:-len("_embedding")]
    lookup = tower.model.get_layer(f"{tower.model.name}_{key}_lookup")
    keys = [key] + ([hard_negative(key)] if hard_negative(key) in batch and tower is model.item_tower else [])
    return np.unique(np.concatenate([lookup(batch[k]).numpy() for k in keys]))


def test_lazy_adam_matches_adam_when_every_row_is_touched():
    """Touching every row every step (duplicates included), lazy Adam is Adam: the formula is right."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 3)).astype(np.float32)
    variables = [tf.Variable(start) for _ in range(2)]
    optimizers = [tf.keras.optimizers.Adam(0.05), LazyAdam(0.05)]
    for _ in range(5):
        rows = np.concatenate([np.arange(6), rng.integers(0, 6, 4)])   # every row, some twice
        grad = tf.IndexedSlices(tf.constant(rng.normal(size=(10, 3)), tf.float32), tf.constant(rows),
                                tf.constant([6, 3]))
        for optimizer, variable in zip(optimizers, variables):
            optimizer.apply_gradients([(grad, variable)])
    np.testing.assert_allclose(variables[1].numpy(), variables[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(variables[0].numpy(), start)
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(amsgrad=True)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainingConfig(optimizer="sgd")


def test_sparse_stage_two_steps_touch_only_batch_rows_and_owned_weights(data):
    """Stage-2 steps after CPP with LazyAdam (batches A, A, B): frozen weights (earlier stages, inactive
    ones) stay bit-identical, rows no batch looks up stay bit-identical, and rows of A that B does not
    look up are not moved by the B step (dense Adam's momentum would move them). Two steps on A because
    the first one cannot move the user side: stage 2's item block starts at zero."""
    model = _stage_two(SPARSE, data)
    a, b = _batches(data, SPARSE, 2, "click", 2)
    assert HARD_NEGATIVE_ITEM_ID in a
    model.compile(optimizer=make_optimizer("lazy_adam", 1e-2))
    callback = tfmot.sparsity.keras.UpdatePruningStep()
    callback.set_model(model)
    callback.on_train_begin()
    step = model.make_train_function()

    def weights():
        return [w.layer.owned_weight.numpy() for w in _wrappers(model)]

    start = weights()
    step(iter(_dataset([a])))
    step(iter(_dataset([a])))
    after_a = weights()
    step(iter(_dataset([b])))
    end = weights()
    embeddings = 0
    for wrapper, w0, wa, wb in zip(_wrappers(model), start, after_a, end):
        layer = wrapper.layer
        owned = np.broadcast_to(layer.weights_of(2), w0.shape)
        np.testing.assert_array_equal(wb[~owned], w0[~owned], err_msg=f"{layer.name}: a frozen weight moved")
        assert (wb[owned] != w0[owned]).any(), f"{layer.name}: stage 2 did not train"
        if isinstance(layer, MaskedDense):
            continue
        assert isinstance(wrapper, RowMaskedPruneLowMagnitude) and layer.column_owners
        rows_a, rows_b = _looked_up_rows(model, wrapper, a), _looked_up_rows(model, wrapper, b)
        unseen = np.setdiff1d(np.arange(len(w0)), np.union1d(rows_a, rows_b))
        np.testing.assert_array_equal(wb[unseen], w0[unseen], err_msg=f"{layer.name}: an unseen row moved")
        only_a = np.setdiff1d(rows_a, rows_b)
        np.testing.assert_array_equal(wb[only_a], wa[only_a], err_msg=f"{layer.name}: B moved a row it did not look up")
        if len(unseen) and (wa[only_a] != w0[only_a]).any():  # id tables (small feature tables: all rows seen)
            embeddings += 1
    assert embeddings >= 2, "the user and item id tables should have unseen rows and rows only A moved"


def test_sparse_path_loss_decreases(data):
    losses = _fit(_model(SPARSE, data), _batches(data, SPARSE, 1, "exposure", 20), "lazy_adam", epochs=3)
    assert losses[-1] < losses[0] - 0.1, losses


def _layouts(config, data):
    """The same model with tfmot's whole-table masks and with row masks."""
    table = dataclasses.replace(config, sparse_embeddings=False)
    return _model(table, data), _model(dataclasses.replace(table, sparse_embeddings=True), data)


def _assert_same_weights(models):
    for table, rows in zip(*[_wrappers(m) for m in models]):
        np.testing.assert_array_equal(table.layer.unit_owner.numpy(), rows.layer.unit_owner.numpy())
        np.testing.assert_array_equal(table.layer.owned_weight.numpy(), rows.layer.owned_weight.numpy())


def test_column_owners_cpp_and_masks_match_table_masks(data):
    """Unit level: CPP on per-column owners frees the same units, zeroes the same weights and the
    row-masked towers compute the same vectors as tfmot's whole-table masks."""
    models = _layouts(SPARSE, data)
    inputs = {k: tf.constant(v) for k, v in data.items.as_inputs(ITEM_ID).items()}
    for model in models:
        selective_mask(model, 1, SPARSE.tau[0], "unit", SPARSE.min_output_units)
    _assert_same_weights(models)
    assert (models[1].item_tower.embeddings[0].layer.unit_owner.numpy() == 2).any()
    np.testing.assert_array_equal(models[0].item_model(inputs).numpy(), models[1].item_model(inputs).numpy())


def test_row_masks_train_exactly_like_table_masks(data):
    """Weight level (owners per weight in both layouts): after weight-level CPP, stage-2 steps with the
    same (dense) optimizer give bit-identical weights with row masks and with whole-table masks."""
    models = _layouts(dataclasses.replace(SPARSE, granularity="weight", optimizer="adam"), data)
    stage_two = _batches(data, SPARSE, 2, "click", 3)
    for model in models:
        selective_mask(model, 1, SPARSE.tau[0], "weight", SPARSE.min_output_units)
        model.set_stage(2, reinitialise=True, seed=11, zero_item_block=True)
        _fit(model, stage_two, "adam")
    _assert_same_weights(models)
    assert not (models[1].item_tower.embeddings[0].layer.weight_owner.numpy() == 2).all()


def test_sparse_cascade_freezes_stages_and_round_trips(data, tmp_path):
    """The stage loop (train, CPP, checkpoints, next stage) with the sparse options: stage 1's
    weights are bit-identical in the final model, and a saved tower loads back to the same vectors."""
    config = dataclasses.replace(SPARSE, recovery=False)
    model = _model(config, data)
    run_cascade(model, data.train, data.items, data.validation, config, tmp_path, verbose=0)
    frozen = _model(config, data)
    checkpoints.load_stage(frozen, tmp_path, 1)
    for before, after in zip(_wrappers(frozen), _wrappers(model)):
        kept = np.broadcast_to(after.layer.weight_owners() <= 1, after.layer.owned_weight.shape)
        assert kept.any() and not kept.all(), after.layer.name
        np.testing.assert_array_equal(before.layer.owned_weight.numpy()[kept], after.layer.owned_weight.numpy()[kept])
        inactive = ~np.broadcast_to(after.layer.weight_owners() <= 2, kept.shape)
        assert not after.layer.owned_weight.numpy()[inactive].any()
    model.item_model.save(tmp_path / "item.keras")
    with tfmot.sparsity.keras.prune_scope():
        loaded = tf.keras.models.load_model(tmp_path / "item.keras")
    inputs = {k: tf.constant(v) for k, v in data.items.as_inputs(ITEM_ID).items()}
    np.testing.assert_array_equal(loaded(inputs).numpy(), model.item_model(inputs).numpy())


def test_options_default_to_todays_training_and_old_runs_still_resume(tmp_path):
    """Defaults stay dense Adam with whole-table masks; the flags select the sparse path; a run recorded
    before these fields existed resumes under the defaults and is refused under other values."""
    import argparse
    import json

    from pipelines.train_cascade import add_training_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    default = config_from_args(parser.parse_args([]))
    assert (default.optimizer, default.sparse_embeddings) == ("adam", False) == (
        TrainingConfig().optimizer, TrainingConfig().sparse_embeddings)
    chosen = config_from_args(parser.parse_args(["--optimizer", "lazy_adam", "--sparse-embeddings"]))
    assert (chosen.optimizer, chosen.sparse_embeddings) == ("lazy_adam", True)
    recorded = default.to_json()
    del recorded["optimizer"], recorded["sparse_embeddings"]
    checkpoints.stage_dir(tmp_path, 1).mkdir()
    (checkpoints.stage_dir(tmp_path, 1) / "config.json").write_text(json.dumps(recorded))
    checkpoints.check_same_config(tmp_path, 1, default)
    with pytest.raises(ValueError, match="optimizer"):
        checkpoints.check_same_config(tmp_path, 1, chosen)
