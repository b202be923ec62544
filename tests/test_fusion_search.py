"""Fusion weights chosen on validation (metrics/fusion_search.py, pipelines/tune_fusion.py): the chosen point
is the best feasible one of the grid, recomputed point by point here; the export serves it by default."""
import json

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.metrics.fusion_search import (NoFeasiblePointError, parse_target, search_fusion_weights,
                                           simplex_grid)
from csmf_tf.metrics.retrieval import evaluate_retrieval
from csmf_tf.models.towers import TowerConfig
from csmf_tf.scoring import fused_query, stage_queries
from csmf_tf.serving.client import GrpcRetrievalClient
from csmf_tf.serving.server import ModelServer
from csmf_tf.training.run import load_run, scoring_vectors, train_csmf
from csmf_tf.training.stages import TrainingConfig

SIZE = (400, 150, 12_000)
DATA_FLAGS = ["--num-users", str(SIZE[0]), "--num-items", str(SIZE[1]), "--num-exposures", str(SIZE[2])]
CONFIG = TrainingConfig(tower=TowerConfig(8, 4, (16,), 12), max_epochs=2, recovery_max_epochs=1, batch_size=512,
                        later_stage_batch_size=128, min_output_units=2)
CONSTRAINED = ("conversion/recall@50", ("exposure/recall@50>=0.95*stage",))
WEIGHTED = ("1*exposure/ndcg@50 + click/ndcg@50 + 2*conversion/ndcg@50", ())


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(*SIZE, seed=0), seed=0)  # what DATA_FLAGS load


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return train_csmf(data, CONFIG, tmp_path_factory.mktemp("fusion") / "run", verbose=0)


def _independent_metrics(run, data, weights, keys):
    """The fused ranking's metrics from the towers, the owner stages and the prior, without the search's code:
    query ``[u * w, k * alpha]`` (w from scoring.fused_query), items ``[v, L]``, exact evaluation."""
    model, split = run.model, data.validation
    users = model.user_vectors(split.users.as_inputs(USER_ID))
    items = np.concatenate([model.item_vectors(split.items.as_inputs(ITEM_ID)), run.prior.log_popularity], 1)
    query = np.concatenate([fused_query(users, model.owner_stage, weights),
                            np.broadcast_to(np.float32(weights) * run.prior.alphas, (len(users), len(weights)))], 1)
    out = {}
    for key in keys:
        objective, metric = key.split("/")
        eval_set = split.eval_sets[objective]
        out[key] = evaluate_retrieval(query[eval_set.user_rows], items, eval_set, ks=(50,))[metric]
    return out


def _independent_stage_metric(run, data, key):
    model, split = run.model, data.validation
    objective, metric = key.split("/")
    t = model.objectives.index(objective)
    users = stage_queries(model.user_vectors(split.users.as_inputs(USER_ID)), model.owner_stage, t + 1)
    column = np.zeros((len(users), model.num_stages), np.float32)
    column[:, t] = run.prior.alphas[t]
    items = np.concatenate([model.item_vectors(split.items.as_inputs(ITEM_ID)), run.prior.log_popularity], 1)
    eval_set = split.eval_sets[objective]
    return evaluate_retrieval(np.concatenate([users, column], 1)[eval_set.user_rows], items, eval_set,
                              ks=(50,))[metric]


def test_simplex_grid_covers_the_simplex_once():
    grid = simplex_grid(3, 4)
    assert grid.shape == (15, 3)                         # C(4 + 2, 2)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert (grid >= 0).all() and len({tuple(p) for p in grid}) == 15
    np.testing.assert_array_equal(grid[0], [1, 0, 0])


@pytest.mark.parametrize("target", [CONSTRAINED, WEIGHTED], ids=["constrained", "weighted-sum"])
def test_chosen_weights_are_the_best_feasible_point_recomputed_independently(run, data, target):
    maximise, constraints = target
    parsed = parse_target(maximise, constraints, run.model.objectives)
    search = search_fusion_weights(scoring_vectors(run, data.validation), data.validation, parsed, steps=4)
    assert len(search.weights) == 15
    thresholds = {c.key: c.bound * _independent_stage_metric(run, data, c.key) if c.relative else c.bound
                  for c in parsed.constraints}
    values, feasible = [], []
    for weights, reported in zip(search.weights, search.fused):
        metrics = _independent_metrics(run, data, weights, parsed.keys)
        for key in parsed.keys:
            assert metrics[key] == pytest.approx(reported[key], abs=1e-9), (weights, key)
        values.append(sum(t.coefficient * metrics[t.key] for t in parsed.terms))
        feasible.append(all(metrics[k] >= bound for k, bound in thresholds.items()))
    values, feasible = np.array(values), np.array(feasible)
    assert feasible[search.chosen]
    assert values[search.chosen] == max(values[feasible])
    assert search.chosen == int(np.flatnonzero(feasible & (values == values[feasible].max()))[0])  # first of ties
    if constraints:
        assert not feasible.all(), "the constraint should bind somewhere on the grid, or the test proves little"


def test_the_command_writes_the_export_defaults_and_a_request_without_weights_uses_them(run, data, tmp_path):
    from pipelines import export as export_cli
    from pipelines import tune_fusion

    maximise, constraints = CONSTRAINED
    record = tune_fusion.main([*DATA_FLAGS, "--run", str(run.out_dir), "--maximise", maximise, "--steps", "4",
                               *[f"--constraint={c}" for c in constraints]])
    chosen = record["chosen_weights"]
    assert (run.out_dir / "fusion_tradeoff.png").stat().st_size > 10_000
    assert json.loads((run.out_dir / "fusion_search.json").read_text())["chosen_weights"] == chosen
    meta = json.loads((run.out_dir / "bundle" / "meta.json").read_text())
    assert meta["default_weights"] == chosen and meta["default_weights_source"]["target"].startswith("maximise")

    version = export_cli.main(["--bundle", str(run.out_dir / "bundle"), "--base_path", str(tmp_path),
                               "--model_name", "tuned", "--brute_force"])
    signatures = tf.saved_model.load(str(version)).signatures
    np.testing.assert_array_equal(signatures["model_info"]()["default_weights"].numpy(), np.float32(chosen))
    names = set(signatures["serving_default"].structured_input_signature[1]) - {"objective_weights", "k"}
    users = {n: v[:5] for n, v in data.users.as_inputs(USER_ID).items() if n in names}
    server = ModelServer(tmp_path / "tuned", "tuned", port=0, rest_api_port=None, poll_interval_s=0, batching=None)
    server.start()
    try:
        with GrpcRetrievalClient(server.grpc_target, "tuned") as client:
            default = client.retrieve(users, weights=None, k=10)          # no objective_weights in the request
            explicit = client.retrieve(users, weights=chosen, k=10)
            ones = client.retrieve(users, weights=[1.0, 1.0, 1.0], k=10)
    finally:
        server.stop()
    assert default.item_ids == explicit.item_ids
    np.testing.assert_array_equal(default.scores, explicit.scores)
    assert not np.allclose(default.scores, ones.scores)                  # still overridable per request


def test_bad_targets_are_refused_with_the_expected_syntax(run):
    with pytest.raises(ValueError, match="cannot read 'conversion/recal@50'.*recall@K or ndcg@K"):
        parse_target("conversion/recal@50")
    with pytest.raises(ValueError, match="cannot read the constraint 'exposure/recall@50>0.9'.*fraction"):
        parse_target("conversion/recall@50", ["exposure/recall@50>0.9"])
    with pytest.raises(ValueError, match=r"objective\(s\) \['purchase'\].*exposure, click, conversion"):
        parse_target("purchase/recall@50", (), run.model.objectives)
    with pytest.raises(ValueError, match="only zero coefficients"):
        parse_target("0*conversion/recall@50")
    target = parse_target(" 2 * click/ndcg@20+conversion/recall@50 ", ["exposure/recall@50 >= 0.3"])
    assert target.ks == (20, 50) and target.keys == ("click/ndcg@20", "conversion/recall@50", "exposure/recall@50")
    assert target.value({"click/ndcg@20": 0.5, "conversion/recall@50": 0.25}) == 1.25


def test_no_feasible_point_is_an_error_that_keeps_every_point(run, data):
    target = parse_target("conversion/recall@50", ["exposure/recall@50>=1.5*stage"], run.model.objectives)
    with pytest.raises(NoFeasiblePointError, match="no point of the 6-point grid meets the constraints") as caught:
        search_fusion_weights(scoring_vectors(run, data.validation), data.validation, target, steps=2)
    record = caught.value.search.to_json()
    assert record["chosen_weights"] is None and len(record["points"]) == 6
    assert not any(point["feasible"] for point in record["points"])


def test_load_run_refuses_other_data(run, tmp_path):
    other = prepare(generate_cascade(SIZE[0], SIZE[1] + 10, SIZE[2], seed=0), seed=0)
    with pytest.raises(ValueError, match="another item catalog"):
        load_run(run.out_dir, other)
    with pytest.raises(FileNotFoundError, match="no finished run"):
        load_run(tmp_path, other)
