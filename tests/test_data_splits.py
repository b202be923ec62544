"""Train / val / test splits: partition, labels kept with their pair, determinism, every method."""
import numpy as np
import pytest

from csmf_tf.data.splits import pair_hash_unit, split_table
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.data.table import InteractionTable


@pytest.fixture(scope="module")
def table():
    return generate_cascade(300, 200, 9_000, seed=5)


def keyed(t):
    """{(user, item): (labels tuple, timestamp or None)} of a table."""
    ts = t.timestamp if t.timestamp is not None else [None] * len(t)
    return {(u, i): (tuple(l), s) for u, i, l, s in zip(t.user_id, t.item_id, t.labels.tolist(), ts)}


def assert_partition(source, splits):
    parts = [keyed(p) for p in (splits.train, splits.val, splits.test)]
    assert sum(len(p) for p in parts) == len(source)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(parts[a]) & set(parts[b])  # disjoint pairs
    union = {**parts[0], **parts[1], **parts[2]}
    assert union == keyed(source)  # every pair with all its labels, exactly once


def test_time_split_partitions_by_global_cutoffs(table):
    s = split_table(table, 0.1, 0.2)
    assert_partition(table, s)
    assert s.train.timestamp.max() <= s.val.timestamp.min()
    assert s.val.timestamp.max() <= s.test.timestamp.min()
    n = len(table)
    assert abs(len(s.test) - 0.2 * n) <= 0.01 * n and abs(len(s.val) - 0.1 * n) <= 0.01 * n
    assert s.sizes() == split_table(table, 0.1, 0.2).sizes()


def test_user_split_partitions_and_is_deterministic(table):
    s = split_table(table, 0.1, 0.1, seed=7, method="user")
    assert_partition(table, s)
    again = split_table(table, 0.1, 0.1, seed=7, method="user")
    for a, b in zip((s.train, s.val, s.test), (again.train, again.val, again.test)):
        assert np.array_equal(a.user_id, b.user_id) and np.array_equal(a.item_id, b.item_id)
    other = split_table(table, 0.1, 0.1, seed=8, method="user")
    assert not np.array_equal(s.test.item_id, other.test.item_id)
    n = len(table)
    assert abs(len(s.test) - 0.1 * n) < 0.02 * n and abs(len(s.val) - 0.1 * n) < 0.02 * n


def test_user_split_assignment_is_row_independent(table):
    # a pair lands in the same part whatever the other rows are (pure function of seed, user, item)
    s = split_table(table, 0.2, 0.2, seed=1, method="user")
    test_pairs = set(zip(s.test.user_id, s.test.item_id))
    sub = table.take(np.arange(0, len(table), 2))
    s2 = split_table(sub, 0.2, 0.2, seed=1, method="user")
    sub_test = set(zip(s2.test.user_id, s2.test.item_id))
    sub_pairs = set(zip(sub.user_id, sub.item_id))
    # only pairs forced back into train (users left with no train pair) may differ
    assert sub_test <= test_pairs
    assert len((test_pairs & sub_pairs) - sub_test) <= 5


def test_every_user_keeps_a_train_pair():
    users = np.array(["a", "b", "b", "c", "c", "c"], dtype=object)
    items = np.array(["x", "x", "y", "x", "y", "z"], dtype=object)
    t = InteractionTable(users, items, np.ones((6, 1)), objectives=("exposure",))
    s = split_table(t, 0.45, 0.45, seed=0, method="user")
    assert set(s.train.user_id) == {"a", "b", "c"}
    assert_partition(t, s)
    h = pair_hash_unit(users, items, 0)
    assert h.shape == (6,) and ((h >= 0) & (h < 1)).all()
    assert np.array_equal(h, pair_hash_unit(users.copy(), items.copy(), 0))


def test_user_time_split_takes_each_users_own_latest_pairs(table):
    s = split_table(table, 0.1, 0.2, seed=3, method="user_time")
    assert_partition(table, s)
    for user in np.unique(table.user_id):
        ts = {name: part.timestamp[part.user_id == user] for name, part in
              (("train", s.train), ("val", s.val), ("test", s.test))}
        n = sum(len(v) for v in ts.values())
        # round(fraction * n) each, at least one training pair, val shrinking first
        expect_test = min(int(np.rint(0.2 * n)), n - 1)
        assert len(ts["test"]) == expect_test
        assert len(ts["val"]) == min(int(np.rint(0.1 * n)), n - 1 - expect_test)
        assert len(ts["train"]) >= 1
        # the user's own order in time: train, then val, then test
        if len(ts["val"]):
            assert ts["train"].max() <= ts["val"].min()
        if len(ts["test"]):
            assert np.concatenate([ts["train"], ts["val"]]).max() <= ts["test"].min()
    # every user with three or more pairs is evaluated (round(0.2 * 3) = 1)
    users, counts = np.unique(table.user_id, return_counts=True)
    assert set(users[counts >= 3]) <= set(s.test.user_id)
    assert keyed(s.test) == keyed(split_table(table, 0.1, 0.2, seed=3, method="user_time").test)


def test_user_time_split_breaks_ties_in_time_by_the_pair_hash():
    users = np.array(["a"] * 10, dtype=object)
    items = np.array([f"i{k}" for k in range(10)], dtype=object)
    t = InteractionTable(users, items, np.ones((10, 1)), objectives=("exposure",),
                         timestamp=np.zeros(10, dtype=np.int64))
    tests = [set(split_table(t, 0.2, 0.2, seed=seed, method="user_time").test.item_id) for seed in range(6)]
    assert all(len(x) == 2 for x in tests)
    assert len({frozenset(x) for x in tests}) > 1                 # the seed picks among tied pairs
    order = np.argsort(pair_hash_unit(users, items, 4))
    assert tests[4] == set(items[order[-2:]])                       # the largest hashes come "last"


def test_auto_uses_user_split_without_timestamps(table):
    no_ts = InteractionTable(table.user_id, table.item_id, table.labels)
    assert split_table(no_ts).sizes() == split_table(no_ts, method="user").sizes()
    with pytest.raises(ValueError, match="needs table.timestamp"):
        split_table(no_ts, method="time")
    with pytest.raises(ValueError, match="needs table.timestamp"):
        split_table(no_ts, method="user_time")


def test_bad_arguments(table):
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        split_table(table, 0.6, 0.5)
    with pytest.raises(ValueError, match="method must be"):
        split_table(table, method="random")
