"""Adding an objective later (training/extend.py): the stages a run had are bit-identical afterwards, the
objectives it served score the same for every (user, item) in the new export, and the new version is
served next to the old one, picked up while the server runs."""
import json
import time

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.models.towers import TowerConfig
from csmf_tf.scoring import stage_query_masks
from csmf_tf.serving.bundle import load_tower_bundle
from csmf_tf.serving.client import GrpcRetrievalClient, ServingClientError
from csmf_tf.serving.export import export_retrieval_model
from csmf_tf.serving.server import ModelServer
from csmf_tf.training.extend import extend_csmf, extended_config
from csmf_tf.training.run import load_run, train_csmf
from csmf_tf.training.stages import TrainingConfig

SIZE = (400, 150, 12_000)
DATA_FLAGS = ["--num-users", str(SIZE[0]), "--num-items", str(SIZE[1]), "--num-exposures", str(SIZE[2])]
BASE = TrainingConfig(objectives=("exposure", "click"), tau=(0.3,), reserve_tau=0.3, fusion_weights=(1.0, 1.0),
                      tower=TowerConfig(8, 4, (16,), 12), max_epochs=2, recovery_max_epochs=1, batch_size=512,
                      later_stage_batch_size=128, min_output_units=2,
                      start_is_candidate=False)   # tiny data: keep a trained epoch, so s_3 differs from s_2


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(*SIZE, seed=0), seed=0)  # what DATA_FLAGS load


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    base = train_csmf(data, BASE, root / "base", verbose=0)
    extended = extend_csmf(data, root / "base", "conversion", root / "extended", verbose=0)
    return base, extended


def _layers(model):
    return [w.layer for tower in model.towers for w in tower.wrappers]


def test_every_existing_stage_parameter_is_bit_identical(runs, data):
    base, extended = runs
    before = load_run(base.out_dir, data).model                 # the base run as its checkpoint holds it
    assert before.num_stages == 2 and extended.model.num_stages == 3
    reserved = 0
    for old, new in zip(_layers(before), _layers(extended.model)):
        np.testing.assert_array_equal(old.unit_owner.numpy(), new.unit_owner.numpy())   # owners as they were
        owner = old.weight_owner.numpy()
        kept = owner <= 2
        np.testing.assert_array_equal(old.owned_weight.numpy()[kept], new.owned_weight.numpy()[kept],
                                      err_msg=f"{new.name}: a weight of stages 1..2 changed")
        if hasattr(new, "bias"):
            units = old.unit_owner.numpy() <= 2
            np.testing.assert_array_equal(old.bias.numpy()[units], new.bias.numpy()[units])
        # The reserved units were inactive (exactly zero) before; the new stage trained exactly those.
        assert not old.owned_weight.numpy()[owner == 3].any(), new.name
        reserved += int((owner == 3).sum())
        assert new.owned_weight.numpy()[owner == 3].any(), f"{new.name}: the reserved units were not trained"
    assert reserved > 0
    record = json.loads((extended.out_dir / "extension.json").read_text())
    assert record["frozen_parameters_identical"] and record["base_objectives"] == ["exposure", "click"]
    assert extended.results["prior_alphas"][:2] == base.results["prior_alphas"][:2]


def _export(run, base_path):
    b = load_tower_bundle(run.out_dir / "bundle")
    return export_retrieval_model(b.user_model, b.item_model, b.item_catalog, b.owner_stage, b.objectives, base_path,
                                  "csmf", default_weights=b.default_weights, k_max=len(b.item_catalog),
                                  use_scann=False, popularity_prior=b.popularity_prior)


def _stage_scores(version, data):
    """``s_t`` of every (user, item) from an export's own signatures and its recorded ownership: ``[S, U, I]``."""
    signatures = tf.saved_model.load(str(version)).signatures
    names = set(signatures["user_embedding"].structured_input_signature[1])
    users = signatures["user_embedding"](**{n: tf.constant(v) for n, v in data.users.as_inputs(USER_ID).items()
                                            if n in names})["user_embedding"].numpy()
    names = set(signatures["item_embedding"].structured_input_signature[1])
    items = signatures["item_embedding"](**{n: tf.constant(v) for n, v in data.items.as_inputs(ITEM_ID).items()
                                            if n in names})["item_embedding"].numpy()
    config = json.loads((version / "assets" / "config.json").read_text())
    masks = stage_query_masks(np.asarray(config["ownership"]["owner_stage"]), config["num_objectives"])
    return np.stack([(users.astype(np.float64) * m) @ items.astype(np.float64).T for m in masks]), config


def _until(answer, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return answer()
        except ServingClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_existing_scores_are_unchanged_in_the_new_export_served_next_to_the_old_one(runs, data, tmp_path):
    base, extended = runs
    old = _export(base, tmp_path)
    old_scores, old_config = _stage_scores(old, data)
    assert old_config["num_objectives"] == 2 and old_config["ownership"]["reserved_dimensions_dropped"] > 0
    assert old_config["tower_dim"] == BASE.tower.output_dim - old_config["ownership"]["reserved_dimensions_dropped"]

    users = {n: v[:4] for n, v in data.users.as_inputs(USER_ID).items() if n in old_config["user_inputs"]}
    server = ModelServer(tmp_path / "csmf", "csmf", port=0, rest_api_port=None, poll_interval_s=0.1, num_versions=2,
                         batching=None)
    server.start()
    try:
        with GrpcRetrievalClient(server.grpc_target, "csmf", timeout_s=30) as client:
            before = _until(lambda: client.retrieve(users, k=SIZE[1], version=1))
            new = _export(extended, tmp_path)                       # version 2 appears while serving
            after = _until(lambda: client.retrieve(users, k=SIZE[1], version=2))
            still = client.retrieve(users, k=SIZE[1], version=1)    # the old version keeps serving
        with GrpcRetrievalClient(server.grpc_target, "csmf", timeout_s=30) as client:
            latest = client.retrieve(users, k=5)
    finally:
        server.stop()
    assert new.name == "2" and latest.version == 2 and latest.objectives == ("exposure", "click", "conversion")
    assert before.version == still.version == 1 and before.item_ids == still.item_ids
    assert before.objective_scores.shape[-1] == 2 and after.objective_scores.shape[-1] == 3

    # Every (user, item): s_1 and s_2 of the new export equal the old export's (tower scores, all pairs).
    new_scores, new_config = _stage_scores(new, data)
    assert new_config["num_objectives"] == 3
    np.testing.assert_allclose(new_scores[:2], old_scores, rtol=0, atol=1e-5 * np.abs(old_scores).max())
    assert not np.allclose(new_scores[2], new_scores[1])           # the new objective does score differently
    # Served scores with the popularity prior: the same for every returned item, by id.
    for row in range(len(before.item_ids)):
        served_old = dict(zip(before.item_ids[row], before.objective_scores[row]))
        served_new = dict(zip(after.item_ids[row], after.objective_scores[row]))
        assert set(served_old) == set(served_new) and len(served_old) == SIZE[1]   # every item
        for item, scores in served_old.items():
            np.testing.assert_allclose(served_new[item][:2], scores, rtol=1e-5, atol=1e-5)


def test_the_train_command_extends_and_refuses_what_it_cannot(runs, capsys, tmp_path):
    from pipelines import train_cascade

    base, extended = runs
    # A finished extension is loaded, not trained again; the command prints the three objectives.
    train_cascade.main([*DATA_FLAGS, "--extend-from", str(base.out_dir), "--add-objective", "conversion",
                        "--out", str(extended.out_dir), "--no-tensorboard"])
    out = capsys.readouterr().out
    assert "conversion already added" in out and "conversion/recall@50" in out
    with pytest.raises(SystemExit, match="'click' is already stage 2"):
        train_cascade.main([*DATA_FLAGS, "--extend-from", str(base.out_dir), "--add-objective", "click",
                            "--out", str(tmp_path / "again")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        train_cascade.main([*DATA_FLAGS, "--extend-from", str(base.out_dir), "--add-objective", "conversion",
                            "--out", str(tmp_path / "busy")])
    with pytest.raises(SystemExit):
        train_cascade.main([*DATA_FLAGS, "--add-objective", "conversion"])        # needs --extend-from
    with pytest.raises(ValueError, match="reserved no capacity.*--reserve-tau"):
        extended_config(TrainingConfig(), "add_to_cart")                  # trained without a reserve
    with pytest.raises(ValueError, match="reserve_tau must be in"):
        TrainingConfig(reserve_tau=1.0)
