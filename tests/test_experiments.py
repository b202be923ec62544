"""Experiments: scoring vectors, multi-vector towers, the tuning protocol, and the quick-mode report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.experiments.methods import BASELINE, Context, HyperParams, Method, Trained, mixture_table, run_csmf
from csmf_tf.experiments.runner import Budget, Progress, Runner, summarise
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors
from csmf_tf.training.evaluation import cascade_vectors, count_parameters
from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.models.multitask import (HEAD_WEIGHTINGS, MMOE, SHARED_BOTTOM, MultiVectorTwoTower,
                                      build_multitask_towers, head_loss_weights, multitask_dataset)
from csmf_tf.models.towers import TowerConfig, build_tower
from csmf_tf.training import checkpoints
from csmf_tf.training.selective_mask import selective_mask
from csmf_tf.training.stages import TrainingConfig, build_model
from csmf_tf.data.prepared import prepare
from pipelines.experiments import MODES, load, parse_args, subsample_users

REPO = Path(__file__).resolve().parents[1]
TOWER = TowerConfig(8, 4, (16,), 8)


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(200, 120, 3000, seed=5))


# ----- scoring vectors ------------------------------------------------------------------------------

def test_fused_vectors_equal_the_weighted_sum_of_objective_scores():
    rng = np.random.default_rng(0)
    queries = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    shared = rng.normal(size=(7, 4)).astype(np.float32)
    separate = [rng.normal(size=(7, 4)).astype(np.float32) for _ in range(3)]
    weights = (0.5, 2.0, 3.0)
    for items in ([shared] * 3, separate):
        vectors = ScoringVectors(("a", "b", "c"), queries, items)
        q, v = vectors.fused(weights)
        expected = sum(k * (qt @ vt.T) for k, qt, vt in zip(weights, queries, items))
        np.testing.assert_allclose(q @ v.T, expected, rtol=1e-5, atol=1e-5)
    assert ScoringVectors(("a", "b", "c"), queries, [shared] * 3).serving() == {
        "vector_dim": 4, "ann_queries": 1, "per_objective_dim": 4}
    assert ScoringVectors(("a", "b", "c"), queries, separate).serving() == {
        "vector_dim": 12, "ann_queries": 3, "per_objective_dim": 4}


def test_summarise_uses_the_sample_standard_deviation():
    assert summarise([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarise([0.25]) == {"mean": 0.25, "std": 0.0, "n": 1}


def test_mixture_table_stacks_every_objectives_positives(data):
    mixed = mixture_table(data.train, data.table.objectives)
    assert len(mixed) == sum(int(data.train.positives(o).sum()) for o in data.table.objectives)
    assert mixed.positives("exposure").all() and not mixed.positives("click").any()
    clicked = data.train.item_id[data.train.positives("click")]
    # a clicked row appears once as an exposure row and once as a click row
    assert np.isin(clicked, mixed.item_id).all()


def test_csmf_vectors_share_one_index_and_match_the_models_fused_query(data):
    config = TrainingConfig(tower=TOWER, min_output_units=2)
    model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
    selective_mask(model, 1, 0.3, "unit", 2)   # untrained but with real owners: blocks of stage 1 and 2
    vectors = cascade_vectors(model, data.validation, data.table.objectives)
    assert vectors.shared_items and vectors.serving()["vector_dim"] == TOWER.output_dim
    u = model.user_vectors(data.users.as_inputs(USER_ID))
    q, v = vectors.fused((1.0, 2.0, 0.5))
    np.testing.assert_allclose(q, model.fused_query(u, (1.0, 2.0, 0.5)), rtol=1e-6)
    np.testing.assert_allclose(vectors.queries[0], model.stage_query(u, 1))


# ----- multi-vector towers --------------------------------------------------------------------------

def test_shared_bottom_is_the_plain_tower_plus_one_head_per_extra_objective(data):
    user, item = build_multitask_towers(SHARED_BOTTOM, data.users, data.items, data.table.feature_kinds, TOWER, 3)
    plain = [build_tower(n, k, c, data.table.feature_kinds, TOWER) for n, k, c in
             (("user", USER_ID, data.users), ("item", ITEM_ID, data.items))]
    head = (TOWER.hidden_units[-1] + 1) * TOWER.output_dim
    for multi, tower in zip((user, item), plain):
        assert count_parameters(multi) == count_parameters(tower.model) + 2 * head
    out = user({k: tf.constant(v[:4]) for k, v in data.users.as_inputs(USER_ID).items()})
    assert out.shape == (4, 3, TOWER.output_dim)


def test_mmoe_gates_are_distributions_over_the_experts(data):
    user, _ = build_multitask_towers(MMOE, data.users, data.items, data.table.feature_kinds, TOWER, 3, num_experts=4)
    inputs = {k: tf.constant(v[:6]) for k, v in data.users.as_inputs(USER_ID).items()}
    assert user(inputs).shape == (6, 3, TOWER.output_dim)
    for t in range(3):
        gate = tf.keras.Model(user.input, user.get_layer(f"user_gate_{t}").output)(inputs).numpy()
        assert gate.shape == (6, 4)
        np.testing.assert_allclose(gate.sum(axis=1), 1.0, rtol=1e-5)


def test_multi_head_loss_is_the_weighted_sum_of_the_objectives_losses(data):
    objectives = data.table.objectives
    assert head_loss_weights(objectives, 0.1) == (1.0, 0.1, 0.1)
    assert head_loss_weights(objectives, 1.0) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="loss weight must be >= 0"):
        head_loss_weights(objectives, float("nan"))
    user, item = build_multitask_towers(SHARED_BOTTOM, data.users, data.items, data.table.feature_kinds, TOWER, 3)
    batch = next(iter(multitask_dataset(data.train, objectives, 64, data.items, seed=1)))

    def loss(weights):
        return float(MultiVectorTwoTower(user, item, objectives, loss_weights=weights).compute_loss(batch))

    parts = [loss(np.eye(3)[t]) for t in range(3)]    # each objective's loss alone, same towers and batch
    assert min(parts) > 0
    for weights in ((1.0, 1.0, 1.0), head_loss_weights(objectives, 0.01), (0.5, 2.0, 0.0)):
        assert loss(weights) == pytest.approx(float(np.dot(weights, parts)), rel=1e-5)
    with pytest.raises(ValueError, match="loss_weights must be 3 non-negative"):
        MultiVectorTwoTower(user, item, objectives, loss_weights=(1.0, -1.0, 1.0))


# ----- stage re-runs from a checkpoint (the sweeps' path) --------------------------------------------

def test_rerunning_later_stages_from_a_checkpoint_keeps_earlier_stages_frozen(data):
    """A fresh model resumed from stage 1's checkpoint must not inherit that stage's Adam state."""
    config = TrainingConfig(objectives=("exposure", "click"), tau=(0.3,), fusion_weights=(1.0, 1.0), tower=TOWER,
                            batch_size=512, max_epochs=1, patience=1, recovery_max_epochs=1, min_output_units=2)
    context = Context(data, config)
    hp = HyperParams(3e-3, 0.1)
    eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)   # tiny fits: tracing would cost more than training
    try:
        first = run_csmf(context, hp, 0, "csmf", keep=True)
        again = run_csmf(context, hp, 0, "again", from_stage=2, source=context.kept_runs[("csmf", hp, 0)])
    finally:
        tf.config.run_functions_eagerly(eager)
    reference = context.build(context.config(hp, 0))
    checkpoints.load_stage(reference, context.kept_runs[("csmf", hp, 0)], 1)
    stage_one = cascade_vectors(reference, data.validation, config.objectives)
    for trained in (first, again):
        np.testing.assert_array_equal(trained.vectors.queries[0] @ trained.vectors.items[0].T,
                                      stage_one.queries[0] @ stage_one.items[0].T)
    context.cleanup()


# ----- the protocol, with fake methods (no training) ------------------------------------------------

def _oracle(data, split, objectives) -> ScoringVectors:
    """Vectors that rank each user's ``split`` positives first for every objective."""
    users = {u: r for r, u in enumerate(data.users.ids)}
    items = {i: r for r, i in enumerate(data.items.ids)}
    queries, item_vectors = [], []
    for t, objective in enumerate(objectives):
        q = np.zeros((len(users), len(items)), np.float32)
        rows = split.positives(objective)
        q[[users[u] for u in split.user_id[rows]], [items[i] for i in split.item_id[rows]]] = 1.0
        queries.append(q)
        item_vectors.append((t + 1) * np.eye(len(items), dtype=np.float32))   # one index per objective
    return ScoringVectors(tuple(objectives), queries, item_vectors)


def test_runner_tunes_on_validation_then_tests_the_chosen_point_over_seeds(data):
    objectives = data.table.objectives
    good, bad = HyperParams(1e-3, 0.1), HyperParams(1e-2, 0.05)
    calls = []

    def fake(ctx, hp, seed):
        calls.append((hp, seed))
        split = data.val if hp == good else data.train   # "good" knows the validation positives
        vectors = _oracle(data, split, objectives)
        return Trained(vectors, 10 + seed, float(seed))

    def single(objective):
        def train(ctx, hp, seed):
            vectors = _oracle(data, data.val if (hp == good) == (objective != "click") else data.train, objectives)
            return Trained(vectors, 1, 1.0)
        return train

    singles = [Method(f"two_tower[{o}]", o, BASELINE, single(o), select_on=(o,)) for o in objectives]
    methods = [Method("oracle", "oracle", BASELINE, fake), *singles,
               Method("separate", "separate", BASELINE, parts=tuple(m.name for m in singles))]
    context = Context(data, TrainingConfig(tower=TOWER))
    result = Runner(context, methods, Budget(grid=(bad, good), seeds=(3, 4, 5)), Progress(lambda _: None)).run()
    # tuning: every grid point on the first seed; later seeds only at the chosen point
    assert calls == [(bad, 3), (good, 3), (good, 4), (good, 5)]
    oracle = result["methods"]["oracle"]
    assert oracle["chosen"] == good.key and oracle["tuning"][good.key] == 1.0 > oracle["tuning"][bad.key]
    assert [r["seed"] for r in oracle["runs"]] == [3, 4, 5] and oracle["summary"]["seconds"]["mean"] == 4.0
    values = [r["test"]["stage"]["click/recall@50"] for r in oracle["runs"]]
    assert oracle["summary"]["stage"]["click/recall@50"] == summarise(values)
    # separate: each part at its own chosen point, objective t taken from part t
    separate = result["methods"]["separate"]
    assert separate["chosen"] == {"two_tower[exposure]": good.key, "two_tower[click]": bad.key,
                                  "two_tower[conversion]": good.key}
    for objective in objectives:
        part = result["methods"][f"two_tower[{objective}]"]["runs"][0]["test"]["stage"]
        assert separate["runs"][0]["test"]["stage"][f"{objective}/recall@50"] == part[f"{objective}/recall@50"]
    assert separate["parameters"] == 3 and separate["serving"]["ann_queries"] == 3
    context.cleanup()


# ----- data loading of the command --------------------------------------------------------------------

def test_csv_dataset_and_user_subsampling(tmp_path):
    path = tmp_path / "log.csv"
    rows = [f"u{u},i{i},{(u + i) % 3}" for u in range(30) for i in range(8)]
    path.write_text("user,item,label\n" + "\n".join(rows) + "\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"column_mapping": {"user_id": "user", "item_id": "item"},
                                "labels": {"exposure": "1", "click": "label>=1", "conversion": "label>=2"}}))
    args = parse_args(["--dataset", "csv", "--data-path", str(path), "--csv-spec", str(spec), "--mode", "full",
                       "--out", str(tmp_path / "out")])
    table = load(args, MODES["full"])
    assert len(table) == 240 and table.objectives == ("exposure", "click", "conversion")
    assert int(table.positives("conversion").sum()) == sum((u + i) % 3 == 2 for u in range(30) for i in range(8))
    small = subsample_users(table, 10, seed=1)
    assert len(np.unique(small.user_id)) == 10 and len(small) == 80


# ----- the quick-mode report ------------------------------------------------------------------------

QUICK_FLAGS = ["--mode", "quick", "--split", "user_time"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # --split user_time (not the default) proves the flag reaches the data the report is made from.
    done = subprocess.run([sys.executable, "-m", "pipelines.experiments", *QUICK_FLAGS, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


EXPECTED_METHODS = ["popularity", "popularity_exposure", "two_tower[exposure]", "two_tower[click]",
                    "two_tower[conversion]", "separate", "unified", "shared_bottom", "mmoe", "sequential",
                    "finetuned_copies", "csmf", "csmf_no_prior", "csmf_no_cpp", "csmf_aml", "csmf_no_recovery",
                    "csmf_weight_level"]


def test_quick_report_has_every_method_metric_and_file(quick):
    out, result = quick
    assert list(result["methods"]) == EXPECTED_METHODS
    report = (out / "report.md").read_text()
    for method in result["methods"].values():
        assert f"| {method['label']} |" in report
        for part in ("stage", "fused"):
            for objective in ("exposure", "click", "conversion"):
                for metric in ("recall", "ndcg"):
                    for k in (20, 50, 100):
                        assert f"{objective}/{metric}@{k}" in method["summary"][part]
    for name in ("recall50.png", "sensitivity_tau.png", "sensitivity_eta.png", "fusion_weights.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "python -m pipelines.experiments --mode quick" in report
    assert result["data"]["split_method"] == "user_time" and "Split (each user's own latest pairs)" in report


def test_quick_report_sizes_and_serving_costs(quick):
    _, result = quick
    methods = result["methods"]
    d, s = result["base_config"]["tower"]["output_dim"], len(result["objectives"])
    plain = methods["two_tower[exposure]"]["parameters"]
    for name in ("csmf", "csmf_no_prior", "csmf_no_cpp", "csmf_aml", "csmf_no_recovery", "csmf_weight_level",
                 "unified", "sequential", "two_tower[click]"):
        assert methods[name]["parameters"] == plain, name
    assert methods["separate"]["parameters"] == methods["finetuned_copies"]["parameters"] == s * plain
    assert methods["shared_bottom"]["parameters"] > plain and methods["mmoe"]["parameters"] > plain
    # The popularity prior adds S item columns to a shared index, one column to each per-objective index.
    single = {"vector_dim": d + s, "ann_queries": 1, "per_objective_dim": d + s}
    multi = {"vector_dim": s * (d + 1), "ann_queries": s, "per_objective_dim": d + 1}
    for name in ("csmf", "csmf_no_cpp", "csmf_aml", "csmf_no_recovery", "unified", "sequential"):
        assert methods[name]["serving"] == single, name
    assert methods["csmf_no_prior"]["serving"] == {"vector_dim": d, "ann_queries": 1, "per_objective_dim": d}
    for name in ("separate", "shared_bottom", "mmoe", "csmf_weight_level", "finetuned_copies"):
        assert methods[name]["serving"] == multi, name


def test_quick_report_statistics_are_over_seeds(quick):
    _, result = quick
    seeds = result["budget"]["seeds"]
    grid = {f"lr={h['learning_rate']:g},T={h['temperature']:g}" for h in result["budget"]["grid"]}
    assert len(seeds) >= 2
    for name, method in result["methods"].items():
        assert [r["seed"] for r in method["runs"]] == seeds, name
        for key, summary in method["summary"]["stage"].items():
            values = [r["test"]["stage"][key] for r in method["runs"]]
            assert summary["n"] == len(seeds)
            # the JSON rounds to 6 decimals
            assert summary["mean"] == pytest.approx(np.mean(values), abs=2e-6)
            assert summary["std"] == pytest.approx(np.std(values, ddof=1), abs=2e-6)
        if method["chosen"] and not isinstance(method["chosen"], dict):
            # the multi-head baselines try every head loss weighting at every grid point, the rest the grid
            points = ({f"{g},heads={w:g}" for g in grid for w in HEAD_WEIGHTINGS}
                      if name in ("shared_bottom", "mmoe") else grid)
            assert method["chosen"] in points and set(method["tuning"]) == points, name
            if name in ("shared_bottom", "mmoe"):
                expected = head_loss_weights(result["objectives"], float(method["chosen"].split("heads=")[1]))
                for run in method["runs"]:
                    assert run["logs"]["fit"] and run["logs"]["loss_weights"] == pytest.approx(expected)


def test_quick_report_invariants_between_methods(quick):
    _, result = quick
    m = result["methods"]
    for seed_index in range(len(result["budget"]["seeds"])):
        run = {name: m[name]["runs"][seed_index]["test"] for name in m}
        # separate towers: objective t is the t-th single tower's own ranking
        for objective in result["objectives"]:
            key = f"{objective}/ndcg@50"
            assert run["separate"]["stage"][key] == run[f"two_tower[{objective}]"]["stage"][key]
        # exposure is scored by the frozen stage 1: AML (stages > 1) cannot change it
        assert run["csmf_aml"]["stage"]["exposure/recall@100"] == run["csmf"]["stage"]["exposure/recall@100"]
        assert run["popularity_exposure"]["stage"]["exposure/ndcg@20"] == run["popularity"]["stage"]["exposure/ndcg@20"]
    sens = result["sensitivity"]
    main = m["csmf"]["runs"][0]["test"]
    for transition, points in sens["tau"].items():
        default = [p for p in points if p["value"] == sens["base_tau"][int(transition) - 1]][0]
        assert default["test"]["stage"] == main["stage"]
        if transition != "1":   # later transitions re-run from stage 1's checkpoint: exposure unchanged
            for p in points:
                assert p["test"]["stage"]["exposure/recall@50"] == main["stage"]["exposure/recall@50"]
    at_base = [r for r in sens["fusion"]["click"] if r["weights"] == result["fusion_weights"]][0]
    assert at_base["csmf"]["click/recall@50"] == pytest.approx(main["fused"]["click/recall@50"], abs=2e-6)


def test_the_optimizer_flag_reaches_every_methods_fits(data, monkeypatch):
    """``--optimizer lazy_adam --sparse-embeddings`` lands in the base config, and every fit of every
    trained method (single towers, unified, multi-head, sequential, fine-tuned copies, CSMF's stages)
    runs with that optimizer, so an optimizer comparison changes the optimizer and nothing else."""
    from csmf_tf.experiments import methods as methods_module
    from csmf_tf.training import stages as stages_module
    from pipelines.experiments import configure

    args = parse_args(["--mode", "quick", "--optimizer", "lazy_adam", "--sparse-embeddings", "--out", "unused"])
    _, config, _ = configure(args, data.table)
    assert config.optimizer == "lazy_adam" and config.sparse_embeddings
    used = []
    for module in (methods_module, stages_module):
        real = module.fit_until_best

        def spy(*a, real=real, **kw):
            used.append(kw.get("optimizer"))
            return real(*a, **kw)
        monkeypatch.setattr(module, "fit_until_best", spy)
    base = TrainingConfig(tower=TOWER, batch_size=256, max_epochs=1, patience=1, recovery_max_epochs=1,
                          min_output_units=2, optimizer=config.optimizer, sparse_embeddings=config.sparse_embeddings)
    context = Context(data, base, num_experts=2)
    by_name = {m.name: m for m in methods_module.registry(base.objectives)}
    for name in ("two_tower[click]", "unified", "mmoe", "sequential", "finetuned_copies", "csmf"):
        before = len(used)
        by_name[name].train(context, HyperParams(3e-3, 0.1), 0)
        assert len(used) > before, name
    context.cleanup()
    assert set(used) == {"lazy_adam"}
