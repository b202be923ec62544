import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import math

import numpy as np
import pytest

import csmf_tf  # noqa: F401
from csmf_tf.data.table import InteractionTable
from csmf_tf.metrics import (EvalSet, build_eval_set, evaluate_retrieval, format_results_table,
                             popularity_counts, prefix_results)

ITEMS = np.array(["a", "b", "c", "d", "e"], dtype=object)


def table(rows):
    """rows: (user, item, exposure, click, conversion)."""
    rows = list(rows)
    return InteractionTable(
        user_id=np.array([r[0] for r in rows], dtype=object),
        item_id=np.array([r[1] for r in rows], dtype=object),
        labels=np.array([r[2:] for r in rows], dtype=np.int8).reshape(len(rows), 3))


# u1: clicked a in train, was only exposed to c; test clicks b, d.
# u2: test clicks e and a. u3: test exposure only -> not evaluated for click.
TRAIN = table([("u1", "a", 1, 1, 0), ("u1", "c", 1, 0, 0), ("u3", "b", 1, 1, 1), ("u2", "b", 1, 1, 0)])
TEST = table([("u1", "b", 1, 1, 0), ("u1", "d", 1, 1, 1), ("u2", "e", 1, 1, 0), ("u2", "a", 1, 1, 0),
              ("u3", "c", 1, 0, 0)])
# Scores <q_u, v_i>: u1 ranks a > b > c > d > e, u2 the reverse.
ITEM_VECS = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]], np.float32)
QUERY = np.array([[1.0], [-1.0]], np.float32)  # rows follow eval_set.user_ids = [u1, u2]

L2, L3, L6 = math.log2(2), math.log2(3), math.log2(6)


def test_build_eval_set_structure():
    es = build_eval_set(TRAIN, TEST, "click", ITEMS)
    assert isinstance(es, EvalSet)
    assert es.objective == "click"
    assert es.user_ids.tolist() == ["u1", "u2"]
    assert es.user_rows.tolist() == [0, 1]
    assert es.positive_indptr.tolist() == [0, 2, 4]
    assert es.positives(0).tolist() == [1, 3] and es.positives(1).tolist() == [0, 4]
    assert es.num_positives.tolist() == [2, 2]
    # click positives of train only: u1's a; u2's b. u1's exposure-only c is not excluded.
    assert es.excluded(0).tolist() == [0] and es.excluded(1).tolist() == [1]
    assert es.num_unknown_positives == 0

    es_all = build_eval_set(TRAIN, TEST, "click", ITEMS, exclude_all_train_pairs=True)
    assert es_all.excluded(0).tolist() == [0, 2] and es_all.excluded(1).tolist() == [1]

    conv = build_eval_set(TRAIN, TEST, 2, ITEMS)  # objective by column index
    assert conv.objective == "conversion"
    assert conv.user_ids.tolist() == ["u1"] and conv.positives(0).tolist() == [3]
    assert conv.excluded(0).tolist() == []


def test_hand_computed_recall_ndcg():
    es = build_eval_set(TRAIN, TEST, "click", ITEMS)
    res = evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1, 3, 5))
    # u1 ranking with a excluded: b c d e a(-inf) -> hits at ranks 0, 2.
    # u2 ranking (scores -v) with b excluded: e d c a b(-inf) -> hits at ranks 0, 3.
    u1 = {"recall@1": 0.5, "recall@3": 1.0, "recall@5": 1.0, "ndcg@1": 1.0,
          "ndcg@3": (1 + 1 / math.log2(4)) / (1 + 1 / L3), "ndcg@5": (1 + 1 / math.log2(4)) / (1 + 1 / L3)}
    u2 = {"recall@1": 0.5, "recall@3": 0.5, "recall@5": 1.0, "ndcg@1": 1.0,
          "ndcg@3": 1 / (1 + 1 / L3), "ndcg@5": (1 + 1 / math.log2(5)) / (1 + 1 / L3)}
    assert res["num_users"] == 2.0
    assert set(res) == {*u1, "num_users"}
    for key in u1:
        assert res[key] == pytest.approx((u1[key] + u2[key]) / 2, abs=1e-9), key


def test_exclude_all_train_pairs_changes_ranking():
    es = build_eval_set(TRAIN, TEST, "click", ITEMS, exclude_all_train_pairs=True)
    res = evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(2,))
    # u1: b d e a c -> hits at 0, 1: recall 1, ndcg 1. u2: e d c a b -> hit at 0 only.
    assert res["recall@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["ndcg@2"] == pytest.approx((1.0 + 1 / (1 + 1 / L3)) / 2)


def test_extra_exclude_tables():
    valid = table([("u1", "b", 1, 1, 0)])  # u1's b is a test positive: must stay ranked
    valid2 = table([("u2", "d", 1, 1, 0), ("u9", "d", 1, 1, 0)])
    es = build_eval_set(TRAIN, TEST, "click", ITEMS, exclude=[valid, valid2])
    assert es.excluded(0).tolist() == [0] and es.excluded(1).tolist() == [1, 3]
    assert build_eval_set(TRAIN, TEST, "click", ITEMS, exclude=valid2).excluded(1).tolist() == [1, 3]


def test_test_positive_that_is_a_train_positive_is_kept():
    train = table([("u2", "e", 1, 1, 0), ("u2", "b", 1, 1, 0)])
    es = build_eval_set(train, TEST, "click", ITEMS)
    assert es.positives(1).tolist() == [0, 4]
    assert es.excluded(1).tolist() == [1]
    res = evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1,))
    # u1 (nothing excluded): a b c d e -> no hit at rank 0. u2: e d c a -> e first, a hit.
    assert res["recall@1"] == 0.25


def test_user_universe_and_row_mapping():
    universe = np.array(["u3", "u2", "u0", "u1"], dtype=object)
    es = build_eval_set(TRAIN, TEST, "click", ITEMS, user_ids=universe)
    assert es.user_ids.tolist() == ["u2", "u1"]
    assert es.user_rows.tolist() == [1, 3]
    all_queries = np.array([[7.0], [-1.0], [7.0], [1.0]], np.float32)
    res = evaluate_retrieval(all_queries[es.user_rows], ITEM_VECS, es, ks=(1, 3, 5))
    ref = evaluate_retrieval(QUERY, ITEM_VECS, build_eval_set(TRAIN, TEST, "click", ITEMS), ks=(1, 3, 5))
    assert res == pytest.approx(ref)


def test_unknown_items_and_users():
    test = table([("u1", "b", 1, 1, 0), ("u1", "zz", 1, 1, 0), ("u2", "e", 1, 1, 0)])
    with pytest.raises(ValueError, match=r"1 test positive pair.*'click'.*not in item_ids.*zz"):
        build_eval_set(TRAIN, test, "click", ITEMS)
    with pytest.warns(UserWarning, match="dropped"):
        es = build_eval_set(TRAIN, test, "click", ITEMS, on_unknown="drop")
    assert es.num_unknown_positives == 1 and es.positives(0).tolist() == [1]
    with pytest.raises(ValueError, match=r"users not in user_ids.*u2"):
        build_eval_set(TRAIN, test.take(np.array([0, 2])), "click", ITEMS, user_ids=np.array(["u1"]))
    with pytest.raises(ValueError, match="on_unknown"):
        build_eval_set(TRAIN, TEST, "click", ITEMS, on_unknown="ignore")


def test_build_errors():
    with pytest.raises(ValueError, match=r"item_ids must be unique.*'a'"):
        build_eval_set(TRAIN, TEST, "click", np.array(["a", "b", "a"]))
    with pytest.raises(ValueError, match="user_ids must be unique"):
        build_eval_set(TRAIN, TEST, "click", ITEMS, user_ids=np.array(["u1", "u1", "u2"]))
    with pytest.raises(KeyError, match="unknown objective 'buy'"):
        build_eval_set(TRAIN, TEST, "buy", ITEMS)
    with pytest.raises(KeyError, match="out of range"):
        build_eval_set(TRAIN, TEST, 3, ITEMS)
    with pytest.raises(ValueError, match="item_ids is empty"):
        build_eval_set(TRAIN, TEST, "click", np.array([], dtype=object))


def test_no_evaluated_users_and_tensor_inputs():
    import tensorflow as tf
    es = build_eval_set(TRAIN, table([("u1", "a", 1, 0, 0)]), "click", ITEMS)
    assert es.num_users == 0 and es.positive_indptr.tolist() == [0]
    res = evaluate_retrieval(np.zeros((0, 1)), ITEM_VECS, es, ks=(2,))
    assert res["num_users"] == 0.0 and math.isnan(res["recall@2"]) and math.isnan(res["ndcg@2"])
    es = build_eval_set(TRAIN, TEST, "click", ITEMS)
    ref = evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1, 3))
    got = evaluate_retrieval(tf.constant(QUERY, tf.float64), tf.constant(ITEM_VECS.astype(int)), es, ks=(1, 3))
    assert got == ref


def test_evaluate_errors():
    es = build_eval_set(TRAIN, TEST, "click", ITEMS)
    with pytest.raises(ValueError, match="K=6 exceeds the corpus size 5"):
        evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1, 6))
    with pytest.raises(ValueError, match="query_vectors has 3 rows but eval_set has 2 users"):
        evaluate_retrieval(np.ones((3, 1)), ITEM_VECS, es, ks=(1,))
    with pytest.raises(ValueError, match="item_vectors has 4 rows"):
        evaluate_retrieval(QUERY, ITEM_VECS[:4], es, ks=(1,))
    with pytest.raises(ValueError, match="query dimension 2 != item dimension 1"):
        evaluate_retrieval(np.ones((2, 2)), ITEM_VECS, es, ks=(1,))
    with pytest.raises(ValueError, match="query_vectors must be 2-D"):
        evaluate_retrieval(np.ones(2), ITEM_VECS, es, ks=(1,))
    with pytest.raises(ValueError, match="item_vectors contains NaN"):
        evaluate_retrieval(QUERY, np.full((5, 1), np.nan), es, ks=(1,))
    with pytest.raises(ValueError, match="every K in ks must be a positive int"):
        evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(0,))
    with pytest.raises(ValueError, match="user_chunk"):
        evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1,), user_chunk=0)
    with pytest.raises(ValueError, match="item_chunk"):
        evaluate_retrieval(QUERY, ITEM_VECS, es, ks=(1,), item_chunk=-1)


# ---------------------------------------------------------------------------------------------
# Random data against a naive per-user implementation
# ---------------------------------------------------------------------------------------------
def random_tables(rng, num_users=57, num_items=83, rows=1400):
    users = np.array([f"u{j}" for j in rng.integers(0, num_users, rows)], dtype=object)
    items = np.array([f"i{j}" for j in rng.integers(0, num_items, rows)], dtype=object)
    exposure = np.ones(rows, np.int8)
    click = (rng.random(rows) < 0.4).astype(np.int8)
    conv = click * (rng.random(rows) < 0.4).astype(np.int8)
    t = InteractionTable(users, items, np.stack([exposure, click, conv], axis=1))
    is_test = rng.random(rows) < 0.3
    return t.take(~is_test), t.take(is_test)


def naive_metrics(train, test, objective, item_ids, queries_by_user, item_vecs, ks, all_pairs=False):
    col = test.objectives.index(objective)
    row_of = {it: j for j, it in enumerate(item_ids)}
    pos, excl = {}, {}
    for u, i, lab in zip(test.user_id, test.item_id, test.labels):
        if lab[col]:
            pos.setdefault(u, set()).add(row_of[i])
    for u, i, lab in zip(train.user_id, train.item_id, train.labels):
        if all_pairs or lab[col]:
            excl.setdefault(u, set()).add(row_of[i])
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for u in sorted(pos):
        p = pos[u]
        scores = item_vecs.astype(np.float64) @ queries_by_user[u].astype(np.float64)
        for j in excl.get(u, set()) - p:
            scores[j] = -np.inf
        order = sorted(range(len(item_ids)), key=lambda j: (-scores[j], j))
        for k in ks:
            hits = [r for r in range(k) if order[r] in p]
            sums[f"recall@{k}"] += len(hits) / len(p)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(p), k)))
            sums[f"ndcg@{k}"] += sum(1 / math.log2(r + 2) for r in hits) / idcg
    out = {key: v / len(pos) for key, v in sums.items()}
    out["num_users"] = float(len(pos))
    return out, pos, excl


@pytest.mark.parametrize("objective,all_pairs", [("click", False), ("conversion", False), ("click", True)])
def test_matches_naive_on_random_data(objective, all_pairs):
    rng = np.random.default_rng(7)
    train, test = random_tables(rng)
    item_ids = np.array([f"i{j}" for j in range(90)], dtype=object)  # 7 items never seen
    rng.shuffle(item_ids)
    # Small integer vectors: float32 scores are exact in every implementation and ties are frequent,
    # so the lower-index tie rule is exercised across item chunks.
    item_vecs = rng.integers(-2, 3, size=(len(item_ids), 4)).astype(np.float32)
    es = build_eval_set(train, test, objective, item_ids, exclude_all_train_pairs=all_pairs)
    queries_by_user = {u: rng.integers(-2, 3, size=4).astype(np.float32) for u in es.user_ids}
    queries = np.stack([queries_by_user[u] for u in es.user_ids])
    ks = (1, 5, 20, 90)
    ref, pos, excl = naive_metrics(train, test, objective, list(item_ids), queries_by_user, item_vecs, ks,
                                   all_pairs)
    assert es.user_ids.tolist() == sorted(pos)
    for r, u in enumerate(es.user_ids):
        assert es.positives(r).tolist() == sorted(pos[u])
        assert es.excluded(r).tolist() == sorted(excl.get(u, set()) - pos[u])
    for user_chunk, item_chunk in [(1024, None), (10, 7), (13, 90), (1, 41), (64, 1)]:
        res = evaluate_retrieval(queries, item_vecs, es, ks=ks, user_chunk=user_chunk, item_chunk=item_chunk)
        assert res.keys() == ref.keys()
        for key in ref:
            assert res[key] == pytest.approx(ref[key], abs=1e-9), (key, user_chunk, item_chunk)


def test_float_vectors_chunking_is_invariant():
    rng = np.random.default_rng(3)
    train, test = random_tables(rng, num_users=300, num_items=500, rows=6000)
    item_ids = np.array([f"i{j}" for j in range(500)], dtype=object)
    es = build_eval_set(train, test, "exposure", item_ids)
    q = rng.normal(size=(es.num_users, 16)).astype(np.float32)
    v = rng.normal(size=(500, 16)).astype(np.float32)
    full = evaluate_retrieval(q, v, es, ks=(10, 50))
    chunked = evaluate_retrieval(q, v, es, ks=(10, 50), user_chunk=37, item_chunk=61)
    assert chunked == pytest.approx(full, abs=1e-12)
    assert 0.0 < full["recall@10"] < full["recall@50"] < 1.0


# ---------------------------------------------------------------------------------------------
# Popularity
# ---------------------------------------------------------------------------------------------
def test_popularity_counts_and_baseline():
    train = table([("u1", "a", 1, 1, 0), ("u2", "a", 1, 1, 1), ("u3", "c", 1, 1, 0), ("u3", "d", 1, 0, 0),
                   ("u4", "zz", 1, 1, 0), ("u1", "c", 1, 1, 0), ("u2", "e", 1, 0, 0)])
    assert popularity_counts(train, "click", ITEMS).tolist() == [2, 0, 2, 0, 0]
    assert popularity_counts(train, "exposure", ITEMS).tolist() == [2, 0, 2, 1, 1]
    assert popularity_counts(train, 2, ITEMS).tolist() == [1, 0, 0, 0, 0]
    assert popularity_counts(train, "click", ITEMS).dtype == np.float32

    test = table([("u1", "b", 1, 1, 0), ("u3", "a", 1, 1, 0), ("u3", "b", 1, 1, 0)])
    es = build_eval_set(train, test, "click", ITEMS)
    # Popularity as D = 1 vectors (what metrics.vectors.popularity_scoring builds): Q = 1, V = counts.
    q, v = np.ones((es.num_users, 1), np.float32), popularity_counts(train, "click", ITEMS)[:, None]
    res = evaluate_retrieval(q, v, es, ks=(1, 2))
    # Ranking a(2) c(2) b d e (tie a/c: lower row first). u1 excludes a, c -> b first: hit.
    # u3 excludes c -> a b d e: hits at 0, 1.
    assert res["recall@1"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["recall@2"] == pytest.approx(1.0)
    assert res["ndcg@2"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Table formatting
# ---------------------------------------------------------------------------------------------
def test_format_results_table():
    rows = {
        "csmf": {**prefix_results({"recall@50": 0.123456, "ndcg@50": 0.05}, "click"),
                 "conversion/recall@50": 0.2, "conversion/ndcg@50": 0.1, "click/recall@20": 9.0},
        "popularity": {"click/recall@50": 0.01, "click/ndcg@50": float("nan")},
    }
    out = format_results_table(rows, precision=3)
    assert out.splitlines() == [
        "| method     | click/recall@50 | click/ndcg@50 | conversion/recall@50 | conversion/ndcg@50 |",
        "|------------|----------------:|--------------:|---------------------:|-------------------:|",
        "| csmf       |           0.123 |         0.050 |                0.200 |              0.100 |",
        "| popularity |           0.010 |           nan |                    - |                  - |",
    ]
    only = format_results_table(rows, metrics=("recall@20",), objectives=["click"])
    assert only.splitlines()[2] == "| csmf       |          9.0000 |"
    plain = format_results_table({"m": {"recall@50": 0.5}}, metrics=("recall@50",))
    assert plain.splitlines() == ["| method | recall@50 |", "|--------|----------:|", "| m      |    0.5000 |"]
    with pytest.raises(ValueError, match="metrics is empty"):
        format_results_table(rows, metrics=())
