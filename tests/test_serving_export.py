"""Export of CSMF towers to a TF Serving SavedModel: round trip, scores, index, assets, atomicity."""
import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from scann import scann_ops  # noqa: F401  (registers the Scann ops for loading)
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from csmf_tf.data.table import Catalog
from csmf_tf.testing.demo import build_demo_towers, numpy_retrieval
from csmf_tf.serving.export import ScannOptions, export_retrieval_model
from csmf_tf.serving.layout import version_dirs
from csmf_tf.serving.publish import rename_to_next_version

OBJECTIVES = ("exposure", "click", "conversion")


@pytest.fixture(scope="module")
def towers():
    """Plain towers and towers whose user tower holds a tfmot prune_low_magnitude(Dense) wrapper."""
    return {"plain": build_demo_towers(num_users=40, num_items=300, dim=16, seed=1),
            "pruned": build_demo_towers(num_users=40, num_items=2000, dim=16, num_clusters=45, seed=2,
                                        prune_wrapper=True)}


@pytest.fixture(scope="module")
def exported(towers, tmp_path_factory):
    """One brute-force export per tower kind plus a ScaNN export of the pruned towers."""
    base = tmp_path_factory.mktemp("models")
    out = {}
    for kind, d in towers.items():
        out[kind] = export_retrieval_model(
            d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, base, f"m_{kind}",
            default_weights=[1.0, 0.5, 2.0], k_max=50, default_k=10, use_scann=False,
            extra_assets={"training_config.json": {"eta": 0.3}, "vocab_city.txt": ["paris", "lyon"]})
    d = towers["pruned"]
    out["scann"] = export_retrieval_model(
        d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, base, "m_scann",
        default_weights=[1.0, 0.5, 2.0], k_max=50, default_k=10, use_scann=True,
        scann_options=ScannOptions(num_leaves=45, num_leaves_to_search=15, num_reordering_candidates=200))
    return out


def user_batch(d, rows=slice(0, 12)):
    c = d.user_catalog
    return {"user_id": tf.constant(c.ids[rows].astype(str)),
            "age": tf.constant(c.features["age"][rows], tf.float32),
            "city": tf.constant(c.features["city"][rows].astype(str))}


def item_vectors_of(d):
    c = d.item_catalog
    return d.item_model({"item_id": tf.constant(c.ids.astype(str)),
                         "category": tf.constant(c.features["category"].astype(str))}, training=False).numpy()


def load(path):
    return tf.saved_model.load(str(path))


@pytest.mark.parametrize("kind", ["plain", "pruned"])
def test_round_trip_vectors_match_in_memory_towers(towers, exported, kind):
    d = towers[kind]
    sigs = load(exported[kind]).signatures
    users = user_batch(d)
    got_u = sigs["user_embedding"](**users)["user_embedding"].numpy()
    np.testing.assert_allclose(got_u, d.user_model(users, training=False).numpy(), atol=1e-5, rtol=0)
    items = {"item_id": tf.constant(d.item_catalog.ids[:20].astype(str)),
             "category": tf.constant(d.item_catalog.features["category"][:20].astype(str))}
    got_v = sigs["item_embedding"](**items)["item_embedding"].numpy()
    np.testing.assert_allclose(got_v, d.item_model(items, training=False).numpy(), atol=1e-5, rtol=0)
    assert got_u.shape == (12, 16) and got_v.shape == (20, 16)


def test_pruned_tower_mask_is_in_effect(towers, exported):
    # The half-zeroed mask must shape the exported user vectors (weight * mask in the serving graph).
    d = towers["pruned"]
    wrapper = next(l for l in d.user_model.layers if "prune" in type(l).__name__.lower())
    kernel, mask, _ = wrapper.pruning_vars[0]
    assert float(tf.reduce_mean(mask)) < 0.9
    assert np.all(kernel.numpy()[mask.numpy() == 0] == 0)


@pytest.mark.parametrize("kind", ["plain", "pruned"])
def test_exact_retrieval_matches_numpy_for_any_weights(towers, exported, kind):
    d = towers[kind]
    retrieve = load(exported[kind]).signatures["serving_default"]
    users = user_batch(d)
    u = d.user_model(users, training=False).numpy()
    v = item_vectors_of(d)
    rankings = []
    for weights in ([1.0, 0.0, 0.0], [1.0, 0.5, 2.0], [0.2, 3.0, -1.0]):
        out = retrieve(**users, objective_weights=tf.constant(weights), k=tf.constant(15))
        rows, fused, stage = numpy_retrieval(u, v, d.owner_stage, np.array(weights), 15)
        np.testing.assert_array_equal(out["item_ids"].numpy().astype(str), d.item_catalog.ids[rows].astype(str))
        np.testing.assert_allclose(out["scores"].numpy(), fused, atol=1e-5)
        np.testing.assert_allclose(out["objective_scores"].numpy(), stage, atol=1e-5)
        # the fused score is exactly sum_t k_t s_t of the returned items
        np.testing.assert_allclose(out["scores"].numpy(),
                                   np.einsum("bkt,t->bk", out["objective_scores"].numpy(), weights), atol=1e-5)
        rankings.append(out["item_ids"].numpy())
    assert not np.array_equal(rankings[0], rankings[1]) and not np.array_equal(rankings[1], rankings[2])


def test_per_row_weights_equal_single_row_requests(towers, exported):
    d = towers["plain"]
    retrieve = load(exported["plain"]).signatures["serving_default"]
    users = user_batch(d, slice(0, 3))
    w = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0.5, 3]], np.float32)
    batched = retrieve(**users, objective_weights=tf.constant(w), k=tf.constant(5))
    for i in range(3):
        one = retrieve(**user_batch(d, slice(i, i + 1)), objective_weights=tf.constant(w[i]), k=tf.constant(5))
        np.testing.assert_array_equal(batched["item_ids"].numpy()[i], one["item_ids"].numpy()[0])
        np.testing.assert_allclose(batched["scores"].numpy()[i], one["scores"].numpy()[0], atol=1e-6)


def test_scann_top_k_overlaps_exact_and_scores_are_exact(towers, exported):
    d = towers["pruned"]
    retrieve = load(exported["scann"]).signatures["serving_default"]
    users = user_batch(d, slice(0, 40))
    u = d.user_model(users, training=False).numpy()
    v = item_vectors_of(d)
    weights = np.array([1.0, 0.5, 2.0], np.float32)
    out = retrieve(**users, objective_weights=tf.constant(weights), k=tf.constant(10))
    rows, _, _ = numpy_retrieval(u, v, d.owner_stage, weights, 10)
    got = out["item_ids"].numpy().astype(str)
    want = d.item_catalog.ids[rows].astype(str)
    overlap = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert overlap >= 0.95, overlap
    # whatever ScaNN returns is re-scored exactly: scores / s_t equal numpy for those very items
    index_of = {i: r for r, i in enumerate(d.item_catalog.ids.astype(str))}
    got_rows = np.vectorize(index_of.get)(got)
    stage = np.stack([(u * (d.owner_stage <= t + 1)) @ v.T for t in range(3)], -1)
    want_stage = np.stack([np.take_along_axis(stage[..., t], got_rows, 1) for t in range(3)], -1)
    np.testing.assert_allclose(out["objective_scores"].numpy(), want_stage, atol=1e-5)
    np.testing.assert_allclose(out["scores"].numpy(), want_stage @ weights, atol=1e-5)
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 1e-6)   # sorted best first


def test_scann_falls_back_to_exact_when_too_few_candidates(towers, tmp_path):
    # 1 of 30 leaves holds ~10 items < k: the graph must not return ScaNN's padding.
    d = towers["plain"]
    path = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                                  tmp_path, "tiny", k_max=40, use_scann=True,
                                  scann_options=ScannOptions(num_leaves=30, num_leaves_to_search=1,
                                                             num_reordering_candidates=40),
                                  min_ann_recall=None)   # a deliberately poor index: no recall floor
    users = user_batch(d, slice(0, 4))
    out = load(path).signatures["serving_default"](**users, objective_weights=tf.constant([1., 1., 1.]),
                                                   k=tf.constant(40))
    rows, fused, _ = numpy_retrieval(d.user_model(users, training=False).numpy(), item_vectors_of(d),
                                     d.owner_stage, np.ones(3), 40)
    np.testing.assert_array_equal(out["item_ids"].numpy().astype(str), d.item_catalog.ids[rows].astype(str))
    np.testing.assert_allclose(out["scores"].numpy(), fused, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "scann"])
def test_invalid_requests_raise_invalid_argument(towers, exported, kind):
    d = towers["plain" if kind == "plain" else "pruned"]
    retrieve = load(exported[kind]).signatures["serving_default"]
    users = user_batch(d, slice(0, 2))
    good = {"objective_weights": tf.constant([1., 1., 1.]), "k": tf.constant(5)}
    cases = {
        "finite": {"objective_weights": tf.constant([1., np.nan, 1.])},
        "k_max=50": {"k": tf.constant(51)},
        "in [1": {"k": tf.constant(0)},
        "3 values": {"objective_weights": tf.constant([1., 1.])},
        "one row per query": {"objective_weights": tf.constant(np.ones((3, 3), np.float32))},
        "shape [3] or [batch, 3]": {"objective_weights": tf.constant(1.0)},
    }
    for needle, bad in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=needle.replace("[", r"\[")):
            retrieve(**users, **{**good, **bad})
    inf = {"objective_weights": tf.constant([1., np.inf, 1.])}
    with pytest.raises(tf.errors.InvalidArgumentError, match="finite"):
        retrieve(**users, **{**good, **inf})


def test_signature_defs_defaults_assets_and_warmup(towers, exported):
    path = Path(exported["pruned"])
    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    sigs = proto.meta_graphs[0].signature_def
    assert {"serving_default", "user_embedding", "item_embedding", "model_info"} <= set(sigs)
    sd = sigs["serving_default"]
    assert set(sd.inputs) == {"user_id", "age", "city", "objective_weights", "k"}
    assert set(sd.outputs) == {"item_ids", "scores", "objective_scores"}
    assert tf.make_ndarray(sd.defaults["objective_weights"]).tolist() == [1.0, 0.5, 2.0]
    assert int(tf.make_ndarray(sd.defaults["k"])) == 10
    assert set(sigs["item_embedding"].inputs) == {"item_id", "category"}

    d = towers["pruned"]
    config = json.loads((path / "assets" / "config.json").read_text())
    assert config["k_max"] == 50 and config["default_k"] == 10 and config["dim"] == 16
    assert config["num_items"] == 2000 and config["index"] == {"type": "brute_force"}
    assert config["objectives"] == list(OBJECTIVES) and config["default_weights"] == [1.0, 0.5, 2.0]
    assert config["user_inputs"]["age"] == {"dtype": "float32", "shape": [None]}
    ownership = json.loads((path / "assets" / "ownership.json").read_text())
    assert ownership["owner_stage"] == d.owner_stage.tolist()
    assert ownership["blocks"]["click"] == np.flatnonzero(d.owner_stage == 2).tolist()
    assert sum(ownership["dims_per_stage"].values()) == 16
    assert json.loads((path / "assets" / "objectives.json").read_text())["objectives"] == list(OBJECTIVES)
    vocab = (path / "assets" / "item_vocab.txt").read_text().splitlines()
    assert vocab == d.item_catalog.ids.astype(str).tolist()
    assert json.loads((path / "assets" / "training_config.json").read_text()) == {"eta": 0.3}
    assert (path / "assets" / "vocab_city.txt").read_text().splitlines() == ["paris", "lyon"]
    records = list(tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) == 1
    request = prediction_log_pb2.PredictionLog.FromString(records[0].numpy()).predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    assert set(request.inputs) == {"user_id", "age", "city", "objective_weights", "k"}

    scann_config = json.loads((Path(exported["scann"]) / "assets" / "config.json").read_text())
    assert scann_config["index"]["type"] == "scann"
    assert scann_config["index"]["num_leaves"] == 45 and scann_config["index"]["num_leaves_to_search"] == 15
    assert scann_config["index"]["spherical"] is True
    info = load(path).signatures["model_info"]()
    assert [x.decode() for x in info["objectives"].numpy()] == list(OBJECTIVES)
    assert int(info["k_max"]) == 50 and int(info["default_k"]) == 10


def test_versions_are_numbered_and_export_is_atomic(towers, tmp_path):
    d = towers["plain"]
    model_dir = tmp_path / "csmf"
    (model_dir / "7").mkdir(parents=True)                  # an existing version
    (model_dir / "notes").mkdir()                          # ignored: not numeric
    (model_dir / ".tmp-old").mkdir()                       # ignored: another export's scratch dir
    seen_incomplete: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Every numeric directory that ever becomes visible must already be complete.
        while not stop.is_set():
            for v, p in version_dirs(model_dir).items():
                if v != 7 and not ((p / "saved_model.pb").is_file() and (p / "assets" / "config.json").is_file()
                                   and (p / "variables").is_dir()):
                    seen_incomplete.append(p.name)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                                       tmp_path, "csmf", k_max=10, use_scann=False)
    finally:
        stop.set()
        watcher.join()
    assert first.name == "8" and not seen_incomplete
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-old", "7", "8", "notes"]

    # A failing export leaves neither a version nor its scratch directory behind.
    with pytest.raises(ValueError, match="reserved"):
        export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                               tmp_path, "csmf", k_max=10, use_scann=False, extra_assets={"config.json": {}})
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-old", "7", "8", "notes"]

    # Two publishers racing for the same number end up with distinct versions.
    a, b = model_dir / ".tmp-a", model_dir / ".tmp-b"
    for p in (a, b):
        p.mkdir()
        (p / "saved_model.pb").write_bytes(b"x")
    results = []
    threads = [threading.Thread(target=lambda p=p: results.append(rename_to_next_version(p, model_dir))) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in results) == ["10", "9"]


def test_dimensions_of_a_stage_without_objective_are_left_out_with_a_warning(towers, tmp_path, caplog):
    """A stage-3 model exported for two objectives serves s_1 and s_2 without stage 3's dimensions, and
    says so (a forgotten objective must not vanish silently)."""
    d = towers["plain"]
    stage_3 = int((d.owner_stage == 3).sum())
    assert 0 < stage_3 < d.owner_stage.size
    with caplog.at_level(logging.WARNING, logger="csmf_tf.serving.export"):
        path = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, OBJECTIVES[:2],
                                      tmp_path, "m", use_scann=False)
    assert f"left out {stage_3} of {d.owner_stage.size} output dimensions owned by stage 3" in caplog.text
    config = json.loads((Path(path) / "assets" / "config.json").read_text())
    assert config["ownership"]["reserved_dimensions_dropped"] == stage_3


def test_export_rejects_bad_arguments(towers, tmp_path):
    d = towers["plain"]
    args = (d.user_model, d.item_model, d.item_catalog)
    with pytest.raises(ValueError, match="owner_stage values"):
        export_retrieval_model(*args, np.full(16, 4), OBJECTIVES, tmp_path, "m", use_scann=False)
    with pytest.raises(ValueError, match="owner_stage has"):
        export_retrieval_model(*args, np.ones(8, int), OBJECTIVES, tmp_path, "m", use_scann=False)
    with pytest.raises(ValueError, match="default_weights"):
        export_retrieval_model(*args, d.owner_stage, OBJECTIVES, tmp_path, "m", default_weights=[1, np.nan, 1],
                               use_scann=False)
    with pytest.raises(ValueError, match="default_k"):
        export_retrieval_model(*args, d.owner_stage, OBJECTIVES, tmp_path, "m", k_max=5, default_k=6,
                               use_scann=False)
    with pytest.raises(ValueError, match="num_leaves must be"):
        export_retrieval_model(*args, d.owner_stage, OBJECTIVES, tmp_path, "m",
                               scann_options=ScannOptions(num_leaves=301))
    dup = Catalog(np.array(["a", "a"], dtype=object), {"category": np.array(["c0", "c0"], dtype=object)})
    with pytest.raises(ValueError, match="unique"):
        export_retrieval_model(d.user_model, d.item_model, dup, d.owner_stage, OBJECTIVES, tmp_path, "m",
                               use_scann=False)
    bad_spec = {"k": tf.TensorSpec([None], tf.string)}
    with pytest.raises(ValueError, match="reserved"):
        export_retrieval_model(*args, d.owner_stage, OBJECTIVES, tmp_path, "m", use_scann=False,
                               user_input_spec=bad_spec)
    assert not (tmp_path / "m").exists() or version_dirs(tmp_path / "m") == {}


def test_k_max_is_clamped_to_corpus_size(towers, tmp_path):
    d = towers["plain"]
    small = d.item_catalog.take(np.arange(12))
    path = export_retrieval_model(d.user_model, d.item_model, small, d.owner_stage, d.objectives, tmp_path, "m",
                                  k_max=100, default_k=10, use_scann=False)
    assert json.loads((path / "assets" / "config.json").read_text())["k_max"] == 12
    out = load(path).signatures["serving_default"](**user_batch(d, slice(0, 1)),
                                                   objective_weights=tf.constant([1., 1., 1.]), k=tf.constant(12))
    assert sorted(out["item_ids"].numpy()[0].astype(str)) == sorted(small.ids.astype(str))


def test_bundle_round_trip_through_the_export_cli(tmp_path):
    from csmf_tf.serving.bundle import load_tower_bundle, save_tower_bundle
    from pipelines import export as export_cli

    d = build_demo_towers(num_users=10, num_items=120, dim=8, seed=5, prune_wrapper=True)
    save_tower_bundle(tmp_path / "bundle", d.user_model, d.item_model, d.item_catalog, d.owner_stage,
                      d.objectives, [1.0, 2.0, 3.0], {"eta": 0.25})
    b = load_tower_bundle(tmp_path / "bundle")
    assert b.objectives == OBJECTIVES and b.default_weights == [1.0, 2.0, 3.0] and b.config == {"eta": 0.25}
    np.testing.assert_array_equal(b.owner_stage, d.owner_stage)
    np.testing.assert_array_equal(b.item_catalog.ids.astype(str), d.item_catalog.ids.astype(str))
    path = export_cli.main(["--bundle", str(tmp_path / "bundle"), "--base_path", str(tmp_path / "models"),
                            "--model_name", "csmf", "--k_max", "20", "--brute_force"])
    assert path == tmp_path / "models" / "csmf" / "1"
    users = user_batch(d, slice(0, 5))
    got = load(path).signatures["user_embedding"](**users)["user_embedding"].numpy()
    np.testing.assert_allclose(got, d.user_model(users, training=False).numpy(), atol=1e-5, rtol=0)
    assert json.loads((path / "assets" / "training_config.json").read_text()) == {"eta": 0.25}
    assert json.loads((path / "assets" / "objectives.json").read_text())["default_weights"] == [1.0, 2.0, 3.0]


def test_popularity_prior_is_served_in_one_inner_product(towers, tmp_path):
    """With a prior the served scores are ``s_t + alpha_t L_t(i)`` and the fused score their k-weighted sum."""
    from csmf_tf.metrics.prior import PopularityPrior
    from csmf_tf.scoring import stage_query_masks

    d = towers["plain"]
    rng = np.random.default_rng(3)
    prior = PopularityPrior(rng.random((len(d.item_catalog), 3)).astype(np.float32) * 4,
                            np.float32([0.5, 2.0, 1.0]))
    path = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                                  tmp_path, "prior", default_weights=[1.0, 0.5, 2.0], k_max=50, use_scann=False,
                                  popularity_prior=prior)
    config = json.loads((path / "assets" / "config.json").read_text())
    assert config["dim"] == config["tower_dim"] + 3 and config["popularity_prior"]["alphas"] == [0.5, 2.0, 1.0]
    served = tf.saved_model.load(str(path)).signatures["serving_default"]
    batch = user_batch(d)
    weights = np.float32([1.0, 0.5, 2.0])
    out = served(**batch, objective_weights=tf.constant(weights), k=tf.constant(50))
    u = d.user_model(batch).numpy()
    v = item_vectors_of(d)
    stage = np.einsum("bd,id,td->bit", u, v, stage_query_masks(d.owner_stage, 3)) + \
        prior.alphas[None, None, :] * prior.log_popularity[None, :, :]                   # [B, I, S]
    fused = stage @ weights
    ids = d.item_catalog.ids.astype(str)
    for b in range(len(u)):
        got_ids = out["item_ids"].numpy()[b].astype(str)
        rows = np.array([np.flatnonzero(ids == i)[0] for i in got_ids])
        np.testing.assert_allclose(out["scores"].numpy()[b], fused[b, rows], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["objective_scores"].numpy()[b], stage[b, rows], rtol=1e-4, atol=1e-4)
        assert set(got_ids) == set(ids[np.argsort(-fused[b])[:50]])


def test_weight_level_models_are_refused(towers, tmp_path):
    d = towers["plain"]
    with pytest.raises(ValueError, match="cannot export a model with 'weight'-level ownership"):
        export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                               tmp_path, "weight", use_scann=False, granularity="weight")
    assert not (tmp_path / "weight").exists()


# -- serving graph without training machinery (masks folded, no state writes) ------------------------------

#: Op types that write state: variables (resource and TF1 ref), scatter updates, optimizer updates.
STATE_WRITES = {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "Assign", "AssignAdd", "AssignSub",
                "ScatterUpdate", "ScatterAdd", "ScatterSub", "ScatterNdUpdate", "ScatterNdAdd",
                "ResourceStridedSliceAssign", "StridedSliceAssign", "LookupTableInsertV2", "LookupTableImportV2"}


def graph_ops(function) -> list[str]:
    """Every op type of a concrete function's graph and of every function in its library (nested calls)."""
    graph_def = function.graph.as_graph_def()
    return [n.op for n in graph_def.node] + [n.op for f in graph_def.library.function for n in f.node_def]


def state_writes(function) -> list[str]:
    return [op for op in graph_ops(function)
            if op in STATE_WRITES or op.startswith(("ResourceScatter", "ResourceApply"))]


@pytest.fixture(scope="module")
def cascade_export(tmp_path_factory):
    """A real CSMF model in its last stage with CPP masks (untrained: the graph and the folding are under
    test), exported once. The training model is snapshotted before the export and checked right after."""
    from csmf_tf.data.prepared import prepare
    from csmf_tf.data.synthetic import generate_cascade
    from csmf_tf.layers.masked import wrapper_mask
    from csmf_tf.models.towers import TowerConfig
    from csmf_tf.training.selective_mask import selective_mask
    from csmf_tf.training.stages import TrainingConfig, build_model

    data = prepare(generate_cascade(200, 150, 4000, seed=0))
    config = TrainingConfig(tower=TowerConfig(8, 4, (16,), 12), min_output_units=2)
    model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
    for stage in (1, 2):
        selective_mask(model, stage, 0.3, min_output_units=2)
        model.set_stage(stage + 1, reinitialise=True, seed=stage)
    # Inactive weights are zero after set_stage. Give them values, so that serving a weight without its
    # mask would change the scores: the folded weights must be weight * mask, what the masked pass uses.
    rng = np.random.default_rng(0)
    wrappers = [w for tower in model.towers for w in tower.wrappers]
    inactive = 0
    for wrapper in wrappers:
        mask = wrapper_mask(wrapper).numpy()
        weight = wrapper.layer.owned_weight
        weight.assign(np.where(mask == 0, rng.normal(size=mask.shape), weight.numpy()).astype(np.float32))
        inactive += int((mask == 0).sum())
    assert inactive > 0
    variables = [v for m in (model.user_model, model.item_model) for v in m.variables if isinstance(v, tf.Variable)]
    before = [v.numpy().copy() for v in variables]
    path = export_retrieval_model(model.user_model, model.item_model, data.items, model.owner_stage, model.objectives,
                                  tmp_path_factory.mktemp("cascade"), "csmf", default_weights=[1.0, 0.5, 2.0],
                                  k_max=40, use_scann=False)
    after = [v.numpy().copy() for v in variables]
    return {"model": model, "data": data, "path": path, "before": before, "after": after}


def test_export_neither_calls_nor_changes_the_training_model(cascade_export):
    # The raw inactive values are still there: the export never ran the wrappers' weight <- weight * mask.
    for before, after in zip(cascade_export["before"], cascade_export["after"]):
        np.testing.assert_array_equal(before, after)
    config = json.loads((cascade_export["path"] / "assets" / "config.json").read_text())
    assert config["folded_pruning_wrappers"] == {"user": 4, "item": 4}


@pytest.mark.parametrize("which", ["cascade", "demo_scann"])
def test_served_signatures_write_no_state(cascade_export, exported, which):
    path = cascade_export["path"] if which == "cascade" else exported["scann"]
    signatures = load(path).signatures
    ops = graph_ops(signatures["serving_default"])
    assert "LookupTableFindV2" in ops and "MatMul" in ops      # the towers are in there, read-only
    for name in ("serving_default", "user_embedding", "item_embedding", "model_info"):
        assert state_writes(signatures[name]) == [], name


def test_the_graph_walk_finds_the_training_towers_writes(cascade_export):
    # The same walk over the training user tower (traced only, never run) finds tfmot's per-call
    # weight * mask assignment, one per wrapped layer: the check above can fail.
    from csmf_tf.serving.tower_inputs import input_specs_of
    from csmf_tf.serving.verify import state_writing_ops

    user_model = cascade_export["model"].user_model
    specs = input_specs_of(user_model)
    traced = tf.function(lambda inputs: user_model(inputs, training=False)).get_concrete_function(specs)
    assert state_writes(traced) == ["AssignVariableOp"] * 4
    assert state_writing_ops(traced) == {"AssignVariableOp": 4}
    assert state_writing_ops(load(cascade_export["path"]).signatures["serving_default"]) == {}


def test_served_scores_equal_the_training_models_per_objective_scores(cascade_export):
    from csmf_tf.data.features import USER_ID
    from csmf_tf.training.evaluation import cascade_vectors

    model, data = cascade_export["model"], cascade_export["data"]
    signatures = load(cascade_export["path"]).signatures
    vectors = cascade_vectors(model, data.testing, model.objectives)      # the training model's own scores
    users = data.testing.users
    inputs = {n: tf.constant(v) if v.dtype != object else tf.constant(v.astype(str))
              for n, v in users.as_inputs(USER_ID).items()}
    served_u = signatures["user_embedding"](**inputs)["user_embedding"].numpy()
    np.testing.assert_allclose(served_u, model.user_vectors(users.as_inputs(USER_ID)), atol=1e-6, rtol=0)
    weights = np.float32([1.0, 0.5, 2.0])
    out = signatures["serving_default"](**inputs, objective_weights=tf.constant(weights), k=tf.constant(40))
    stage = np.stack([q @ v.T for q, v in zip(vectors.queries, vectors.items)], -1)     # [U, I, S]: s_t
    fused = stage @ weights
    row_of = {i: r for r, i in enumerate(data.testing.items.ids.astype(str))}
    rows = np.vectorize(row_of.get)(out["item_ids"].numpy().astype(str))
    np.testing.assert_allclose(out["objective_scores"].numpy(),
                               np.take_along_axis(stage, rows[:, :, None], 1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(fused, rows, 1), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(rows, np.argsort(-fused, axis=1, kind="stable")[:, :40])


# -- per-export ANN recall check ---------------------------------------------------------------------------

#: A deliberately coarse index over the 2,000 clustered items: 2 of 45 leaves, recall@10 well below 1.
COARSE = ScannOptions(num_leaves=45, num_leaves_to_search=2, num_reordering_candidates=50)


def users_np(d):
    c = d.user_catalog
    return {"user_id": c.ids.astype(str), "age": c.features["age"], "city": c.features["city"].astype(str)}


@pytest.fixture(scope="module")
def coarse_export(towers, tmp_path_factory):
    d = towers["pruned"]
    base = tmp_path_factory.mktemp("recall")
    path = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, base,
                                  "coarse", default_weights=[1.0, 0.5, 2.0], k_max=50, default_k=10,
                                  scann_options=COARSE, min_ann_recall=None, ann_recall_users=users_np(d))
    return base, path


def test_recall_is_measured_on_the_served_search_and_recorded(towers, coarse_export):
    d = towers["pruned"]
    _, path = coarse_export
    record = json.loads((path / "assets" / "config.json").read_text())["ann_recall"]
    assert record["queries"] == "user_tower" and record["num_queries"] == 40 and record["k"] == 10
    assert record["index"] == "scann" and record["min_recall"] is None and record["passed"] is True
    # Recomputed independently: each user's served top 10 (one request per user) against numpy's exact top 10.
    served = load(path).signatures["serving_default"]
    u = d.user_model(user_batch(d, slice(0, 40)), training=False).numpy()
    rows, _, _ = numpy_retrieval(u, item_vectors_of(d), d.owner_stage, np.float32([1.0, 0.5, 2.0]), 10)
    exact_ids = d.item_catalog.ids[rows].astype(str)
    defaults = {"objective_weights": tf.constant([1.0, 0.5, 2.0]), "k": tf.constant(10)}
    overlap = [len(set(served(**user_batch(d, slice(i, i + 1)), **defaults)["item_ids"].numpy()[0].astype(str))
                   & set(exact_ids[i])) for i in range(40)]
    assert record["recall_at_k"] == pytest.approx(sum(overlap) / 400, abs=1e-12)
    assert 0.3 < record["recall_at_k"] < 0.95          # coarse index: the number is informative, not 1.0
    info = load(path).signatures["model_info"]()
    assert float(info["ann_recall"]) == pytest.approx(record["recall_at_k"], abs=1e-7)
    assert int(info["ann_recall_k"]) == 10


def test_both_metadata_apis_report_the_recall(coarse_export):
    from google.protobuf import json_format, struct_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc
    import grpc

    from csmf_tf.serving.client import RestRetrievalClient
    from csmf_tf.serving.server import ModelServer

    _, path = coarse_export
    recall = json.loads((path / "assets" / "config.json").read_text())["ann_recall"]["recall_at_k"]
    server = ModelServer(path.parent, "coarse", port=0, rest_api_port=0, poll_interval_s=0)
    server.start()
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = get_model_metadata_pb2.GetModelMetadataRequest()
            request.model_spec.name = "coarse"
            request.metadata_field.extend(["signature_def", "model_info"])
            response = stub.GetModelMetadata(request, timeout=30)
            only_signatures = get_model_metadata_pb2.GetModelMetadataRequest()
            only_signatures.model_spec.name = "coarse"
            only_signatures.metadata_field.append("signature_def")
            plain = stub.GetModelMetadata(only_signatures, timeout=30)
        rest = RestRetrievalClient(server.rest_url, "coarse").metadata()
    finally:
        server.stop()
    info = struct_pb2.Struct()
    assert response.metadata["model_info"].Unpack(info)
    grpc_info = json_format.MessageToDict(info)
    assert grpc_info["ann_recall"] == pytest.approx(recall, abs=1e-7) and grpc_info["ann_recall_k"] == 10
    assert grpc_info["objectives"] == list(OBJECTIVES) and grpc_info["default_weights"] == [1.0, 0.5, 2.0]
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map) and "serving_default" in sig_map.signature_def
    assert set(plain.metadata) == {"signature_def"}          # TF Serving's contract: the fields asked for
    assert rest["metadata"]["model_info"]["ann_recall"] == pytest.approx(recall, abs=1e-7)
    assert rest["metadata"]["model_info"]["ann_recall_k"] == 10 and "signature_def" in rest["metadata"]


def test_a_recall_below_the_floor_fails_or_warns(towers, coarse_export, tmp_path, caplog):
    from csmf_tf.serving.recall import AnnRecallTooLow

    d = towers["pruned"]
    args = (d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, tmp_path)
    kwargs = dict(default_weights=[1.0, 0.5, 2.0], k_max=50, default_k=10, scann_options=COARSE,
                  ann_recall_users=users_np(d))
    # (ScaNN's k-means is not deterministic: each export measures its own index.)
    with pytest.raises(AnnRecallTooLow, match=r"ANN recall@10 = 0\.\d{4} is below min_ann_recall = 0\.95 "
                                              r"\(40 user_tower queries") as refused:
        export_retrieval_model(*args, "refused", min_ann_recall=0.95, **kwargs)
    assert float(str(refused.value).split(" = ")[1].split()[0]) < 0.95
    assert not (tmp_path / "refused").exists()                 # nothing published, no scratch left
    with caplog.at_level("WARNING", logger="csmf_tf.serving.recall"):
        path = export_retrieval_model(*args, "warned", min_ann_recall=0.95, ann_recall_action="warn", **kwargs)
    record = json.loads((path / "assets" / "config.json").read_text())["ann_recall"]
    assert record["passed"] is False and record["action"] == "warn" and record["recall_at_k"] < 0.95
    assert f"ANN recall@10 = {record['recall_at_k']:.4f} is below min_ann_recall = 0.95" in caplog.text
    for bad, needle in (({"min_ann_recall": 1.5}, "min_ann_recall must be in"),
                        ({"ann_recall_action": "ignore"}, "ann_recall_action must be one of"),
                        ({"ann_recall_k": 51}, r"ann_recall_k must be in \[1, k_max=50\]"),
                        ({"ann_recall_users": {"user_id": ["u1"]}}, "lacks user tower inputs")):
        with pytest.raises(ValueError, match=needle):
            export_retrieval_model(*args, "bad", **{**kwargs, **bad})
    assert not (tmp_path / "bad").exists()


def test_the_export_command_takes_the_recall_floor_and_action(tmp_path, capsys):
    from pipelines import export as export_cli

    flags = ["--demo", "--num_users", "30", "--num_items", "800", "--dim", "8", "--base_path", str(tmp_path),
             "--model_name", "demo", "--k_max", "20", "--num_leaves", "28", "--num_leaves_to_search", "1",
             "--num_reordering_candidates", "20", "--min_ann_recall", "1.0"]
    with pytest.raises(SystemExit, match=r"export refused, nothing published: ANN recall@10 = 0\.\d{4} is below "
                                         r"min_ann_recall = 1\.0 \(30 user_tower queries"):
        export_cli.main(flags)
    path = export_cli.main(flags + ["--ann_recall_action", "warn"])
    record = json.loads((path / "assets" / "config.json").read_text())["ann_recall"]
    assert record["passed"] is False and record["min_recall"] == 1.0 and record["queries"] == "user_tower"
    assert f"ANN recall@10 {record['recall_at_k']:.4f} (30 user_tower queries, floor 1.0)" in capsys.readouterr().out
