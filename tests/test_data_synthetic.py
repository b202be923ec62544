"""The synthetic cascade generator and its CSV / TFRecord writers and readers."""
import numpy as np
import pytest

from csmf_tf.data.files import read_csv, read_tfrecord, schema_path, write_csv, write_tfrecord
from csmf_tf.data.synthetic import CascadeConfig, generate_cascade, generate_cascade_with_truth
from csmf_tf.data.validation import BadRowsError

SIZES = dict(num_users=400, num_items=300, num_exposures=20_000)


@pytest.fixture(scope="module")
def gen():
    return generate_cascade_with_truth(**SIZES, seed=3)


def assert_tables_equal(a, b):
    assert a.objectives == b.objectives and a.feature_kinds == b.feature_kinds
    assert np.array_equal(a.user_id, b.user_id) and np.array_equal(a.item_id, b.item_id)
    assert np.array_equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype == np.int8
    assert np.array_equal(a.timestamp, b.timestamp)
    for side_a, side_b in ((a.user_features, b.user_features), (a.item_features, b.item_features)):
        assert list(side_a) == list(side_b)
        for k in side_a:
            assert side_a[k].dtype == side_b[k].dtype and np.array_equal(side_a[k], side_b[k]), k


def test_same_seed_is_bit_identical_and_other_seed_differs(gen):
    table, _ = gen
    again = generate_cascade(**SIZES, seed=3)
    assert_tables_equal(table, again)
    assert table.item_features["item_price"].tobytes() == again.item_features["item_price"].tobytes()
    other = generate_cascade(**SIZES, seed=4)
    assert not np.array_equal(table.item_id, other.item_id)
    assert not np.array_equal(table.labels, other.labels)


def test_shape_ids_and_cascade_invariants(gen):
    t, _ = gen
    assert len(t) == 20_000 and t.objectives == ("exposure", "click", "conversion")
    assert (t.labels[:, 0] == 1).all()
    assert (t.labels[:, 1:] <= t.labels[:, :-1]).all()
    pairs = t.user_id.astype(str) + "|" + t.item_id.astype(str)
    assert len(np.unique(pairs)) == len(t)  # no duplicate (user, item) pair
    assert set(np.unique(t.user_id)) <= {f"u{k}" for k in range(400)}
    assert len(np.unique(t.user_id)) == 400  # every user has at least one exposure
    assert np.all(np.diff(t.timestamp) >= 0) and t.timestamp.dtype == np.int64
    click, conv = t.labels[:, 1].mean(), t.labels[:, 2].mean()
    assert 0.05 <= click <= 0.15 and 0.01 <= conv <= 0.03


def test_features_belong_to_entities_and_have_kinds(gen):
    t, truth = gen
    assert t.feature_kinds == {"user_segment": "categorical", "user_activity": "numeric",
                               "item_category": "categorical", "item_price": "numeric"}
    assert t.user_features["user_segment"].dtype == object and t.item_features["item_price"].dtype == np.float32
    for ids, col in ((t.user_id, t.user_features["user_segment"]), (t.user_id, t.user_features["user_activity"]),
                     (t.item_id, t.item_features["item_category"]), (t.item_id, t.item_features["item_price"])):
        _, inv = np.unique(ids, return_inverse=True)
        firsts = {}
        for g, v in zip(inv, col):
            assert firsts.setdefault(g, v) == v  # constant per entity
    # segment = argmax of the first 8 user-factor coordinates
    u = np.array([int(x[1:]) for x in t.user_id[:50]])
    expect = [f"seg{k}" for k in np.argmax(truth.user_factors[0][u, :8], axis=1)]
    assert t.user_features["user_segment"][:50].tolist() == expect
    assert (t.item_features["item_price"] > 0).all()


def test_exposure_follows_popularity_and_relevance(gen):
    t, truth = gen
    u = np.array([int(x[1:]) for x in t.user_id])
    i = np.array([int(x[1:]) for x in t.item_id])
    counts = np.bincount(i, minlength=300)
    top = np.argsort(-truth.log_pop)[:30]
    assert counts[top].sum() > 2 * 0.1 * len(t)  # top 10 % of items by popularity: > 2x their uniform share
    rank_corr = np.corrcoef(np.argsort(np.argsort(counts)), np.argsort(np.argsort(truth.log_pop)))[0, 1]
    assert rank_corr > 0.6
    aff = np.einsum("nd,nd->n", truth.user_factors[0][u], truth.item_factors[0][i])
    rng = np.random.default_rng(0)
    ru, ri = rng.integers(0, 400, len(t)), rng.integers(0, 300, len(t))
    rand_aff = np.einsum("nd,nd->n", truth.user_factors[0][ru], truth.item_factors[0][ri])
    assert aff.mean() > rand_aff.mean() + 0.5  # unit-variance affinity: exposed pairs are clearly preferred


def test_later_objectives_use_partly_different_preferences(gen):
    t, truth = gen
    rng = np.random.default_rng(1)
    ru, ri = rng.integers(0, 400, 50_000), rng.integers(0, 300, 50_000)

    def aff(s):
        return np.einsum("nd,nd->n", truth.user_factors[s][ru], truth.item_factors[s][ri])

    corr01 = np.corrcoef(aff(0), aff(1))[0, 1]
    corr12 = np.corrcoef(aff(1), aff(2))[0, 1]
    assert 0.2 < corr01 < 0.55 and 0.2 < corr12 < 0.55  # rho^2 = 0.36: related but different
    # clicked exposures have a higher click affinity than unclicked ones
    u = np.array([int(x[1:]) for x in t.user_id])
    i = np.array([int(x[1:]) for x in t.item_id])
    c_aff = np.einsum("nd,nd->n", truth.user_factors[1][u], truth.item_factors[1][i])
    clicked = t.labels[:, 1] == 1
    assert c_aff[clicked].mean() > c_aff[~clicked].mean() + 0.5


def test_oracle_of_each_objective_is_best_for_it(gen):
    t, truth = gen
    u = np.array([int(x[1:]) for x in t.user_id])
    i = np.array([int(x[1:]) for x in t.item_id])
    scores = [truth.oracle_scores(s, np.arange(400)) for s in range(2)]
    ranks = [(sc[u] > sc[u, i][:, None]).sum(axis=1) for sc in scores]  # rank of the row's item
    clicked = t.labels[:, 1] == 1
    assert ranks[1][clicked].mean() < ranks[0][clicked].mean()  # the click oracle ranks clicks better


def test_generic_objectives_and_bad_arguments():
    t = generate_cascade(50, 40, 500, seed=1, objectives=("view", "buy"), config=CascadeConfig(rates=(0.2,)))
    assert t.objectives == ("view", "buy") and t.labels.shape == (500, 2)
    assert (t.labels[:, 1] <= t.labels[:, 0]).all()
    with pytest.raises(ValueError, match="config.rates has 1 entries"):
        generate_cascade(50, 40, 500, objectives=("a", "b", "c", "d"), config=CascadeConfig(rates=(0.2,)))
    with pytest.raises(ValueError, match=r"num_exposures=10 must lie in \[num_users=50"):
        generate_cascade(50, 40, 10)
    with pytest.raises(ValueError, match="must lie in"):
        generate_cascade(50, 40, 50 * 21)  # cap = 0.5 * 40 = 20 per user


def test_exposure_counts_hit_the_cap_exactly():
    t = generate_cascade(20, 10, 100, seed=2)  # every user at the cap of 5
    assert np.bincount([int(x[1:]) for x in t.user_id]).tolist() == [5] * 20


def test_csv_round_trip_through_validating_reader(gen, tmp_path):
    table, _ = gen
    small = table.take(np.arange(500))
    path = write_csv(small, tmp_path / "d" / "cascade.csv")
    assert schema_path(path).exists()
    assert path.read_text().splitlines()[0] == ("user_id,item_id,timestamp,exposure,click,conversion,"
                                                "user_segment,user_activity,item_category,item_price")
    assert_tables_equal(small, read_csv(path))
    # the reader checks rows: corrupt one label
    lines = path.read_text().splitlines()
    parts = lines[5].split(",")
    parts[4] = "7"
    lines[5] = ",".join(parts)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowsError, match=r"cascade\.csv:6: bad_label"):
        read_csv(path)


@pytest.mark.parametrize("shards", [1, 3])
def test_tfrecord_round_trip(gen, tmp_path, shards):
    table, _ = gen
    small = table.take(np.arange(300))
    paths = write_tfrecord(small, tmp_path / "cascade", num_shards=shards)
    names = [p.name for p in paths]
    if shards == 1:
        assert names == ["cascade.tfrecord"]
    else:
        assert names == [f"cascade-0000{k}-of-00003.tfrecord" for k in range(3)]
    assert_tables_equal(small, read_tfrecord(paths))
    assert_tables_equal(small, read_tfrecord(str(tmp_path / "cascade*.tfrecord")))


def test_generate_data_cli(tmp_path, capsys):
    from pipelines.generate_data import main

    rc = main(["--num-users", "60", "--num-items", "50", "--num-exposures", "900", "--seed", "2",
               "--out-dir", str(tmp_path), "--format", "both", "--shards", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rows=900 users=60" in out and "click" in out and "rate=" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cascade-00000-of-00002.tfrecord", "cascade-00001-of-00002.tfrecord", "cascade.csv",
                     "cascade.positives", "cascade.positives.json", "cascade.schema.json"]
    expected = generate_cascade(60, 50, 900, seed=2)
    assert_tables_equal(expected, read_csv(tmp_path / "cascade.csv"))
    assert_tables_equal(expected, read_tfrecord(str(tmp_path / "cascade-*.tfrecord")))
    assert main(["--num-users", "60", "--num-items", "50", "--num-exposures", "10",
                 "--out-dir", str(tmp_path)]) == 2
