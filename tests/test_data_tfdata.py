"""Per-objective tf.data pipelines: dtypes, shapes, rows, sampling probabilities, cascade hard negatives."""
import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.data import features
from csmf_tf.data.tfdata import (cascade_hard_negatives, item_sampling_probabilities, make_objective_dataset,
                                 objective_columns)


@pytest.fixture(scope="module")
def table():
    return generate_cascade(200, 150, 6_000, seed=11)


def collect(ds):
    out = {}
    for batch in ds:
        for k, v in batch.items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_element_spec_dtypes_and_shapes(table):
    ds = make_objective_dataset(table, "click", batch_size=64, hard_negatives=True)
    spec = ds.element_spec
    strings = ["user_id", "user_segment", "item_id", "item_category", features.HARD_NEGATIVE_ITEM_ID,
               "hard_negative/item_category"]
    floats = ["user_activity", "item_price", "candidate_sampling_probability", "hard_negative/item_price",
              features.HARD_NEGATIVE_SAMPLING_PROBABILITY,
              "hard_negative_mask"]
    assert set(spec) == set(strings + floats)
    for k in strings:
        assert spec[k].dtype == tf.string and spec[k].shape.as_list() == [None], k
    for k in floats:
        assert spec[k].dtype == tf.float32 and spec[k].shape.as_list() == [None], k
    plain = make_objective_dataset(table, "exposure", batch_size=64, drop_remainder=True)
    assert features.HARD_NEGATIVE_ITEM_ID not in plain.element_spec
    assert plain.element_spec["item_id"].shape.as_list() == [64]


def test_rows_are_the_objectives_positives_with_their_features(table):
    pos = table.positives("click")
    data = collect(make_objective_dataset(table, "click", batch_size=50, shuffle=False))
    assert len(data["user_id"]) == pos.sum()
    assert [s.decode() for s in data["user_id"]] == table.user_id[pos].tolist()
    assert [s.decode() for s in data["item_id"]] == table.item_id[pos].tolist()
    assert np.array_equal(data["item_price"], table.item_features["item_price"][pos])
    assert [s.decode() for s in data["user_segment"]] == table.user_features["user_segment"][pos].tolist()
    batches = [b["item_id"].shape[0] for b in make_objective_dataset(table, "click", 50, shuffle=False)]
    assert batches[:-1] == [50] * (len(batches) - 1) and sum(batches) == pos.sum()


def test_shuffle_is_seeded_and_reshuffles_each_epoch(table):
    ds = make_objective_dataset(table, "exposure", batch_size=500, seed=3)
    first = [s.decode() for s in collect(ds)["item_id"]]
    second = [s.decode() for s in collect(ds)["item_id"]]
    again = [s.decode() for s in collect(make_objective_dataset(table, "exposure", 500, seed=3))["item_id"]]
    assert first == again and first != second
    assert sorted(first) == sorted(second) == sorted(table.item_id.tolist())


def test_sampling_probabilities(table):
    for obj in table.objectives:
        p = item_sampling_probabilities(table, obj)
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-9)
        pos = table.positives(obj)
        item = table.item_id[pos][0]
        assert p[item] == (table.item_id[pos] == item).sum() / pos.sum()
        assert set(p) == set(table.item_id[pos])
    data = collect(make_objective_dataset(table, "conversion", 32, shuffle=False))
    p = item_sampling_probabilities(table, "conversion")
    expect = np.array([p[s.decode()] for s in data["item_id"]], dtype=np.float32)
    assert np.array_equal(data["candidate_sampling_probability"], expect)
    empty = InteractionTable(np.array(["u"], object), np.array(["i"], object), np.array([[1, 0]]),
                             objectives=("e", "c"))
    with pytest.raises(ValueError, match="no positive rows"):
        item_sampling_probabilities(empty, "c")


def test_cascade_hard_negatives_are_upstream_positive_not_current(table):
    for t in (1, 2):
        neg, mask = cascade_hard_negatives(table, t, seed=4)
        assert neg.shape == mask.shape == (len(table),) and mask.dtype == np.float32
        key = {(u, i): l for u, i, l in zip(table.user_id, table.item_id, table.labels.tolist())}
        for r in range(len(table)):
            u = table.user_id[r]
            if mask[r] == 1.0:
                labels = key[(u, neg[r])]  # the negative is one of this user's own rows
                assert labels[t - 1] == 1 and labels[t] == 0
            else:
                assert neg[r] == table.item_id[r]
                user_rows = table.user_id == u
                assert not ((table.labels[user_rows, t - 1] == 1) & (table.labels[user_rows, t] == 0)).any()
        assert 0.0 < mask.mean() <= 1.0
        again, _ = cascade_hard_negatives(table, t, seed=4)
        other, _ = cascade_hard_negatives(table, t, seed=5)
        assert np.array_equal(neg, again) and not np.array_equal(neg, other)
    with pytest.raises(ValueError, match="upstream stage"):
        cascade_hard_negatives(table, 0)


def test_hard_negative_mask_zero_when_user_has_none():
    users = np.array(["a", "a", "b", "b"], dtype=object)
    items = np.array(["x", "y", "x", "z"], dtype=object)
    labels = np.array([[1, 1], [1, 0], [1, 1], [1, 1]])
    t = InteractionTable(users, items, labels, objectives=("e", "c"))
    neg, mask = cascade_hard_negatives(t, 1)
    assert neg.tolist() == ["y", "y", "x", "z"] and mask.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_hard_negative_features_come_from_the_catalog(table):
    data = collect(make_objective_dataset(table, "conversion", 64, hard_negatives=True, seed=2))
    cat = table.item_catalog()
    price = dict(zip(cat.ids, cat.features["item_price"]))
    category = dict(zip(cat.ids, cat.features["item_category"]))
    for nid, p, c in zip(data[features.HARD_NEGATIVE_ITEM_ID], data["hard_negative/item_price"],
                         data["hard_negative/item_category"]):
        assert price[nid.decode()] == p and category[nid.decode()] == c.decode()


def test_item_catalog_supplies_item_features(table):
    cat = table.item_catalog()
    custom = Catalog(cat.ids[::-1], {"item_price": np.arange(len(cat), dtype=np.float32)[::-1]})
    cols = objective_columns(table, "exposure", item_catalog=custom)
    rank = {i: k for k, i in enumerate(cat.ids)}
    assert cols["item_price"].tolist() == [float(rank[i]) for i in cols["item_id"]]
    assert "item_category" not in cols
    with pytest.raises(KeyError, match="not in item_catalog"):
        objective_columns(table, "exposure", item_catalog=custom.take(np.arange(10)))


def test_bad_arguments(table):
    with pytest.raises(ValueError, match="batch_size"):
        make_objective_dataset(table, "click", 0)
    with pytest.raises(KeyError, match="unknown objective"):
        make_objective_dataset(table, "purchase", 8)
    with pytest.raises(ValueError, match="upstream stage"):
        make_objective_dataset(table, "exposure", 8, hard_negatives=True)
