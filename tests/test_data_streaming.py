"""Streaming training data from TFRecord shards: same rows as in memory, bounded memory, real training."""
import collections
import dataclasses
import json
import logging
import os
import shutil
import tracemalloc
import types

import numpy as np
import pytest
import tensorflow as tf

from csmf_tf.data.example_encoding import encode_examples
from csmf_tf.data.streaming import HardNegativeIndex, TFRecordSource
from csmf_tf.data.files import (positives_manifest_path, read_tfrecord, schema_path, write_positive_shards,
                                write_tfrecord)
from csmf_tf.data.synthetic import generate_cascade, write_cascade_tfrecord
from csmf_tf.data.table import Catalog
from csmf_tf.data.features import HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_PREFIX
from csmf_tf.data.tfdata import item_sampling_probabilities, make_objective_dataset
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training.stages import TrainingConfig, build_model, fit_objective
from csmf_tf.data.prepared import prepare_streaming

HN_KEYS = (HARD_NEGATIVE_ITEM_ID, f"{HARD_NEGATIVE_PREFIX}item_category", f"{HARD_NEGATIVE_PREFIX}item_price",
           "hard_negative_mask", f"{HARD_NEGATIVE_PREFIX}candidate_sampling_probability")


@pytest.fixture(scope="module")
def table():
    return generate_cascade(200, 150, 6_000, seed=11)


@pytest.fixture(scope="module")
def shards(table, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_tfrecord(table, root / "cascade", num_shards=3)


@pytest.fixture(scope="module")
def source(shards):
    # A small scan batch: the first pass takes many steps, so merging across batches is exercised.
    return TFRecordSource(str(shards[0].parent / "cascade-*.tfrecord"), scan_batch_size=500, shuffle_buffer=1000)


def collect(ds) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for batch in ds:
        for k, v in batch.items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def row_multiset(cols: dict[str, np.ndarray], skip=()) -> collections.Counter:
    keys = [k for k in cols if k not in skip]
    return collections.Counter(zip(*(cols[k].tolist() for k in keys)))


def assert_catalogs_equal(expected: Catalog, got: Catalog) -> None:
    assert expected.ids.dtype == got.ids.dtype == object
    np.testing.assert_array_equal(expected.ids, got.ids)
    assert list(expected.features) == list(got.features)
    for k, v in expected.features.items():
        assert v.dtype == got.features[k].dtype, k
        np.testing.assert_array_equal(v, got.features[k], err_msg=k)


# --------------------------------------------------------------------------------------------- encoder

def test_vectorised_encoder_parses_to_the_protobuf_example():
    values = {"id": ("bytes", [b"u1", b"", "é".encode() * 100, b"x" * 300]),
              "price": ("float", np.array([1.5, -0.0, np.float32(3.4e38), 1e-30], np.float32)),
              "n": ("int64", np.array([0, 127, 128, -5])),
              "ts": ("int64", np.array([1_700_000_000, 2**62, 1, 300]))}
    records = encode_examples(values)
    F = tf.train.Feature
    for r, record in enumerate(records):
        features = {}
        for key, (kind, col) in values.items():
            if kind == "bytes":
                features[key] = F(bytes_list=tf.train.BytesList(value=[col[r]]))
            elif kind == "float":
                features[key] = F(float_list=tf.train.FloatList(value=[col[r]]))
            else:
                features[key] = F(int64_list=tf.train.Int64List(value=[int(col[r])]))
        assert tf.train.Example.FromString(record) == tf.train.Example(features=tf.train.Features(feature=features))
    assert encode_examples({"a": ("bytes", [])}) == []
    with pytest.raises(ValueError, match="different lengths"):
        encode_examples({"a": ("int64", [1]), "b": ("int64", [1, 2])})


# ------------------------------------------------------------------------------------------ first pass

def test_first_pass_catalogs_counts_and_schema(table, source):
    assert source.files == tuple(str(p) for p in sorted(source.files)) and len(source.files) == 3
    assert source.objectives == table.objectives and source.feature_kinds == table.feature_kinds
    assert source.num_rows == len(source) == len(table)
    assert source.positive_counts == {o: int(table.positives(o).sum()) for o in table.objectives}
    assert_catalogs_equal(table.user_catalog(), source.user_catalog())
    assert_catalogs_equal(table.item_catalog(), source.item_catalog())
    for o in table.objectives:
        assert source.sampling_probabilities(o) == item_sampling_probabilities(table, o)


def test_catalog_takes_the_first_row_not_the_first_record_read(table, tmp_path):
    """An item whose feature changes over time: the catalog keeps its earliest row's value even when a
    later row sits in an earlier shard (the row key, not the reading order, decides)."""
    changed = table.take(np.arange(len(table)))
    item = changed.item_id[4]
    rows = np.flatnonzero(changed.item_id == item)
    late = rows[rows % 3 == 0][-1]  # a later row of that item, in shard 0 (read first)
    assert late > 4
    changed.item_features["item_price"][late] = 123.5
    write_tfrecord(changed, tmp_path / "c", num_shards=3)
    src = TFRecordSource(str(tmp_path / "c-*.tfrecord"), scan_batch_size=97)
    assert_catalogs_equal(changed.item_catalog(), src.item_catalog())
    assert src.item_catalog().features["item_price"][list(src.item_catalog().ids).index(item)] != 123.5


# ---------------------------------------------------------------------------------------- the datasets

@pytest.mark.parametrize("objective", ["exposure", "click", "conversion"])
@pytest.mark.parametrize("with_catalog", [False, True])
def test_same_rows_and_element_format_as_in_memory(table, source, objective, with_catalog):
    catalog = table.item_catalog() if with_catalog else None
    memory = make_objective_dataset(table, objective, 64, seed=1, item_catalog=catalog)
    stream = source.objective_dataset(objective, 64, seed=1, item_catalog=catalog)
    assert list(stream.element_spec) == list(memory.element_spec)
    assert stream.element_spec == memory.element_spec
    expected, got = collect(memory), collect(stream)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in expected.items()}
    assert len(got["user_id"]) == source.positive_counts[objective]
    assert row_multiset(got) == row_multiset(expected)


def test_drop_remainder_and_static_batch(source):
    ds = source.objective_dataset("click", 100, drop_remainder=True)
    assert ds.element_spec["item_id"].shape.as_list() == [100]
    sizes = [len(b["item_id"]) for b in ds]
    assert sizes == [100] * (source.positive_counts["click"] // 100)


def test_shuffle_is_seeded_reshuffled_per_epoch_and_optional(source):
    def order(ds):
        return collect(ds)["item_id"].tolist(), collect(ds)["user_id"].tolist()

    a = source.objective_dataset("click", 50, seed=3)
    first_epoch, second_epoch = collect(a)["user_id"].tolist(), collect(a)["user_id"].tolist()
    assert first_epoch != second_epoch and sorted(first_epoch) == sorted(second_epoch)
    b = source.objective_dataset("click", 50, seed=3)
    assert collect(b)["user_id"].tolist() == first_epoch  # same seed, same first epoch
    plain = source.objective_dataset("click", 50, shuffle=False)
    assert order(plain) == order(plain)


def test_hard_negatives_follow_the_cascade_rule(table, source):
    for objective in ("click", "conversion"):
        t = table.objective_index(objective)
        cand = (table.labels[:, t - 1] == 1) & (table.labels[:, t] == 0)
        per_user = collections.defaultdict(collections.Counter)
        for u, i in zip(table.user_id[cand], table.item_id[cand]):
            per_user[u][i] += 1
        index = source.hard_negative_index(objective)
        assert isinstance(index, HardNegativeIndex)
        assert index.items.dtype == np.int32 and len(index.items) == cand.sum()
        users, items = source.user_catalog().ids, source.item_catalog().ids
        for r, u in enumerate(users):  # the CSR index holds exactly each user's candidate rows
            got = collections.Counter(items[index.items[index.offsets[r]:index.offsets[r + 1]]].tolist())
            assert got == per_user.get(u, collections.Counter()), u

        cols = collect(source.objective_dataset(objective, 64, seed=5, hard_negatives=True))
        memory = collect(make_objective_dataset(table, objective, 64, hard_negatives=True))
        assert list(cols) == list(memory)
        assert row_multiset(cols, skip=HN_KEYS) == row_multiset(memory, skip=HN_KEYS)
        catalog = source.item_catalog()
        position = {i: r for r, i in enumerate(catalog.ids)}
        has = cols["hard_negative_mask"] == 1.0
        for r in range(len(has)):
            user, negative = cols["user_id"][r].decode(), cols[HARD_NEGATIVE_ITEM_ID][r].decode()
            assert has[r] == (user in per_user)
            if has[r]:
                assert negative in per_user[user]
            else:
                assert negative == cols["item_id"][r].decode()
            row = position[negative]
            assert cols[f"{HARD_NEGATIVE_PREFIX}item_category"][r].decode() == catalog.features["item_category"][row]
            assert cols[f"{HARD_NEGATIVE_PREFIX}item_price"][r] == catalog.features["item_price"][row]
        # uniform over the user's candidate rows: P(the user's first indexed candidate) = 1 / |C_u| on average
        first = {u: items[index.items[index.offsets[r]]] for r, u in enumerate(users)
                 if index.offsets[r + 1] > index.offsets[r]}
        size = {u: sum(c.values()) for u, c in per_user.items()}
        picked_first = [cols[HARD_NEGATIVE_ITEM_ID][r].decode() == first[cols["user_id"][r].decode()]
                        for r in np.flatnonzero(has)]
        chance = [per_user[u][first[u]] / size[u] for u in (cols["user_id"][r].decode() for r in np.flatnonzero(has))]
        assert abs(np.mean(picked_first) - np.mean(chance)) < (0.04 if objective == "click" else 0.15)
    with pytest.raises(ValueError, match="upstream stage"):
        source.objective_dataset("exposure", 64, hard_negatives=True)


def test_fraction_keeps_a_fixed_hashed_subset(source):
    full = row_multiset(collect(source.objective_dataset("exposure", 256, shuffle=False)))
    ds = source.objective_dataset("exposure", 256, seed=7, fraction=0.5)
    first, second = row_multiset(collect(ds)), row_multiset(collect(ds))
    assert first == second and not first - full
    assert 0.45 * source.num_rows < sum(first.values()) < 0.55 * source.num_rows
    other = row_multiset(collect(source.objective_dataset("exposure", 256, seed=8, fraction=0.5)))
    assert other != first
    with pytest.raises(ValueError, match="fraction"):
        source.objective_dataset("exposure", 256, fraction=0.0)


def test_errors(table, source, tmp_path):
    with pytest.raises(FileNotFoundError):
        TFRecordSource(str(tmp_path / "nothing-*.tfrecord"))
    lone = write_tfrecord(table.take(np.arange(10)), tmp_path / "lone")
    schema_path(lone[0]).unlink()
    with pytest.raises(FileNotFoundError, match="schema"):
        TFRecordSource(lone)
    small = table.item_catalog().take(np.arange(10))
    with pytest.raises(KeyError, match="not in item_catalog"):
        source.objective_dataset("exposure", 64, item_catalog=small)
    with pytest.raises(KeyError, match="unknown objective"):
        source.objective_dataset("purchase", 64)
    with pytest.raises(ValueError, match="batch_size"):
        source.objective_dataset("click", 0)


def test_rows_of_users(table, source):
    users = ["u3", "u17", "u150"]
    got = source.rows_of_users(users)
    want = table.take(np.isin(table.user_id.astype(str), users))
    np.testing.assert_array_equal(got.user_id, want.user_id)
    np.testing.assert_array_equal(got.item_id, want.item_id)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.timestamp, want.timestamp)
    assert len(source.rows_of_users([])) == 0


# ----------------------------------------------------------------------------------------------- memory

def _arrays(obj, seen=None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes, dicts, tuples and dataclasses."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return []
    return [a for c in children for a in _arrays(c, seen)]


def test_memory_does_not_grow_with_rows(shards, source, tmp_path):
    """Twice the rows (every shard twice): the source holds the same arrays, none of them per-row, and
    the first pass' Python-side peak stays the same."""
    for p in shards:
        (tmp_path / p.name.replace("cascade", "twice")).write_bytes(p.read_bytes())
    (tmp_path / "twice.schema.json").write_text(schema_path(shards[0]).read_text())
    files = [str(p) for p in shards] + sorted(str(p) for p in tmp_path.glob("twice-*.tfrecord"))

    def build(paths):
        tracemalloc.start()
        try:
            src = TFRecordSource(paths, scan_batch_size=500)
            return src, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    build([str(p) for p in shards])  # warm-up: TensorFlow's one-time allocations are not the source's
    once, peak_once = build([str(p) for p in shards])
    twice, peak_twice = build(files)
    assert twice.num_rows == 2 * once.num_rows
    assert twice.positive_counts == {o: 2 * c for o, c in once.positive_counts.items()}
    assert twice.sampling_probabilities("click") == once.sampling_probabilities("click")
    shapes_once = sorted(a.shape for a in _arrays(once))
    assert shapes_once == sorted(a.shape for a in _arrays(twice))
    largest = max(max(a.shape, default=0) for a in _arrays(once))
    assert largest <= max(len(once.user_catalog()), len(once.item_catalog())) < once.num_rows / 20
    assert twice.held_bytes() == once.held_bytes()
    assert peak_twice < 1.2 * peak_once
    # the hard-negative index is the documented exception: ~4 bytes per candidate row
    before = once.held_bytes()
    index = once.hard_negative_index("click")
    assert once.held_bytes() - before == index.nbytes == 8 * (len(once.user_catalog()) + 1) + 4 * len(index.items)


# ------------------------------------------------------------------------------------ generator, training

def test_chunked_generator_writes_the_generated_table_and_a_holdout(tmp_path):
    files = write_cascade_tfrecord(tmp_path / "g", 120, 90, 4_000, num_shards=2, seed=4, holdout_users=0.25,
                                   holdout_time=0.3)
    expected = generate_cascade(120, 90, 4_000, seed=4)
    train, holdout = read_tfrecord(files.paths), read_tfrecord(files.holdout_path)
    assert files.holdout_path.name == "g_holdout.tfrecord"
    assert files.rows == len(train) and files.holdout_rows == len(holdout) > 0
    assert files.rows + files.holdout_rows == len(expected)
    held = np.isin(expected.user_id, np.unique(holdout.user_id)) & (expected.timestamp >= holdout.timestamp.min())
    assert 0.15 < len(np.unique(holdout.user_id)) / 120 < 0.35
    assert holdout.timestamp.min() >= np.quantile(expected.timestamp, 0.69)
    for part, want in ((train, expected.take(~held)), (holdout, expected.take(held))):
        np.testing.assert_array_equal(part.user_id, want.user_id)
        np.testing.assert_array_equal(part.item_id, want.item_id)
        np.testing.assert_array_equal(part.labels, want.labels)
        np.testing.assert_array_equal(part.timestamp, want.timestamp)
        for k in want.item_features:
            np.testing.assert_array_equal(part.item_features[k], want.item_features[k])
    assert files.positives == {o: int(train.positives(o).sum()) for o in train.objectives}
    assert json.loads(schema_path(files.holdout_path).read_text())["objectives"] == list(expected.objectives)
    without = write_cascade_tfrecord(tmp_path / "h", 120, 90, 4_000, num_shards=3, seed=4)
    assert without.holdout_path is None
    assert read_tfrecord(without.paths).user_id.tolist() == expected.user_id.tolist()


def test_stages_train_from_shards(tmp_path):
    files = write_cascade_tfrecord(tmp_path / "d", 300, 200, 12_000, num_shards=3, seed=2, holdout_users=0.3)
    source = TFRecordSource([str(p) for p in files.paths], shuffle_buffer=4096)
    data = prepare_streaming(source, read_tfrecord(files.holdout_path))
    config = TrainingConfig(tower=TowerConfig(16, 4, (32,), 16), batch_size=256, learning_rate=3e-3,
                            objectives=("exposure", "click"), tau=(0.3,), fusion_weights=(1.0, 1.0))
    model = build_model(config, data.users, data.items, data.table.feature_kinds)
    log = fit_objective(model, data.train, "exposure", data.items, data.validation, config, max_epochs=2,
                        verbose=0)
    assert log["epochs"] == 2 and log["best_val_recall@50"] > 0.05
    model.set_stage(2, reinitialise=True, seed=1)
    log = fit_objective(model, data.train, "click", data.items, data.validation, config, max_epochs=1,
                        fraction=0.5, verbose=0)  # hard negatives and the recovery subset, from shards
    assert log["epochs"] == 1 and log["best_val_recall@50"] > 0


def test_command_lines_generate_shards_and_train_from_them(tmp_path, capsys, monkeypatch):
    from pipelines import generate_data, train_cascade
    from csmf_tf.training.run import TrainedRun

    assert generate_data.main(["--num-users", "80", "--num-items", "60", "--num-exposures", "2000", "--seed", "1",
                               "--out-dir", str(tmp_path), "--format", "tfrecord", "--shards", "2",
                               "--holdout-users", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "rows=2,000 users=80" in out and "cascade_holdout.tfrecord (holdout:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cascade-00000-of-00002.tfrecord", "cascade-00001-of-00002.tfrecord", "cascade.positives",
        "cascade.positives.json", "cascade.schema.json", "cascade_holdout.schema.json", "cascade_holdout.tfrecord"]
    with pytest.raises(SystemExit):
        generate_data.main(["--out-dir", str(tmp_path), "--format", "csv", "--holdout-users", "0.1"])

    seen = {}

    def fake_train(data, config, out_dir, stages=None, verbose=1, strategy=None, **kwargs):
        seen.update(data=data, config=config)
        # Only the data reaching training is under test: the run stands in for a model by its objectives.
        return TrainedRun(types.SimpleNamespace(objectives=config.objectives), [],
                          {"stage": {"exposure/recall@50": 0.5}}, None)

    monkeypatch.setattr(train_cascade, "train_csmf", fake_train)
    train_cascade.main(["--out", str(tmp_path / "run"), "--train-tfrecords", str(tmp_path / "cascade-*.tfrecord"),
                        "--holdout", str(tmp_path / "cascade_holdout.tfrecord"), "--shuffle-buffer", "123"])
    data = seen["data"]
    assert isinstance(data.train, TFRecordSource) and data.train.shuffle_buffer == 123
    assert [p.rsplit("/", 1)[1] for p in data.train.files] == ["cascade-00000-of-00002.tfrecord",
                                                               "cascade-00001-of-00002.tfrecord"]
    holdout = read_tfrecord(tmp_path / "cascade_holdout.tfrecord")
    assert data.train.num_rows + len(holdout) == 2000 and len(data.val) + len(data.test) == len(holdout)
    assert data.val.timestamp.max() <= data.test.timestamp.min()
    assert "exposure" in data.validation.eval_sets and len(data.users) == 80
    with pytest.raises(SystemExit):
        train_cascade.main(["--train-tfrecords", str(tmp_path / "cascade-*.tfrecord")])


# ------------------------------------------------------------------------------------------- positive shards

def raw_records(paths) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset([str(p) for p in paths])]


def label(record: bytes, objective: str) -> int:
    return tf.train.Example.FromString(record).features.feature[f"label/{objective}"].int64_list.value[0]


def bytes_read() -> int:
    """Bytes this process has read through read() system calls so far (kernel accounting)."""
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])


def assert_positive_shards_hold_each_shards_positives(paths, objectives=("click", "conversion")) -> dict:
    """Every main shard's positive shard of each objective holds exactly its positive records, byte for
    byte and in order, and the manifest's counts and sizes are right."""
    manifest = json.loads(positives_manifest_path(paths[0]).read_text())
    assert manifest["format"] == 1 and manifest["objectives"] == list(objectives)
    assert [e["file"] for e in manifest["shards"]] == [p.name for p in paths]
    for p, entry in zip(paths, manifest["shards"]):
        main = raw_records([p])
        assert entry["records"] == len(main) and entry["bytes"] == p.stat().st_size
        for o in objectives:
            shard = p.parent / entry["positives"][o]["file"]
            expected = [r for r in main if label(r, o) == 1]
            assert 0 < len(expected) < len(main)
            assert raw_records([shard]) == expected, (p.name, o)
            assert entry["positives"][o] == {"file": entry["positives"][o]["file"], "records": len(expected),
                                             "bytes": shard.stat().st_size}
    return manifest


def test_writers_copy_each_shards_positives(shards, tmp_path):
    assert_positive_shards_hold_each_shards_positives(shards)
    assert (shards[0].parent / "cascade.positives" / "cascade-00001-of-00003.click.tfrecord").exists()

    files = write_cascade_tfrecord(tmp_path / "g", 120, 90, 4_000, num_shards=2, seed=4, holdout_users=0.25)
    assert files.positives_manifest == tmp_path / "g.positives.json"
    manifest = assert_positive_shards_hold_each_shards_positives(files.paths)
    for o in ("click", "conversion"):  # the holdout's positives stay in the holdout only
        assert sum(e["positives"][o]["records"] for e in manifest["shards"]) == files.positives[o]

    # Shards written without positive shards (as by an older version) get the same ones afterwards.
    old = tmp_path / "old"
    old.mkdir()
    for p in [*files.paths, schema_path(files.paths[0])]:
        shutil.copy(p, old / p.name)
    copies = sorted(old.glob("g-*.tfrecord"))
    assert write_positive_shards(str(old / "g-*.tfrecord")) == old / "g.positives.json"
    assert json.loads((old / "g.positives.json").read_text()) == manifest
    for entry in manifest["shards"]:
        for shard in entry["positives"].values():
            assert (old / shard["file"]).read_bytes() == (tmp_path / shard["file"]).read_bytes()
    assert_positive_shards_hold_each_shards_positives(copies)

    only = write_cascade_tfrecord(tmp_path / "c", 120, 90, 4_000, num_shards=2, seed=4,
                                  positive_objectives=("conversion",))
    assert_positive_shards_hold_each_shards_positives(only.paths, ("conversion",))
    none = write_cascade_tfrecord(tmp_path / "c", 120, 90, 4_000, num_shards=2, seed=4, positive_objectives=())
    assert none.positives_manifest is None and not (tmp_path / "c.positives.json").exists()  # stale one removed
    with pytest.raises(ValueError, match="purchase"):
        write_cascade_tfrecord(tmp_path / "d", 120, 90, 4_000, positive_objectives=("purchase",))


@pytest.fixture(scope="module")
def scan_source(shards):
    """The same files read the old way: every epoch scans and filters every record."""
    return TFRecordSource(str(shards[0].parent / "cascade-*.tfrecord"), scan_batch_size=500, shuffle_buffer=1000,
                          positive_shards=False)


@pytest.mark.parametrize("objective", ["click", "conversion"])
def test_later_stages_read_their_positive_shards_and_get_the_scans_examples(table, source, scan_source, objective):
    positives = source.positive_counts[objective]
    assert source.epoch_records(objective) == positives == len(raw_records(source.epoch_files(objective)))
    assert all("cascade.positives" in f for f in source.epoch_files(objective))
    assert scan_source.epoch_files(objective) == source.files and scan_source.epoch_records(objective) == 6_000
    assert source.epoch_files("exposure") == source.files  # the first stage reads every record anyway

    # the hard-negative index (built from the upstream positive shards for conversion) is the scan's, exactly
    mine, scanned = source.hard_negative_index(objective), scan_source.hard_negative_index(objective)
    np.testing.assert_array_equal(mine.offsets, scanned.offsets)
    np.testing.assert_array_equal(mine.items, scanned.items)

    # Every key (ids, features, sampling probabilities, drawn hard negatives and their mask) of every
    # example: the same multiset, epoch after epoch, shuffled or not, on a hashed subset or not.
    for kwargs in (dict(seed=5, item_catalog=table.item_catalog(), hard_negatives=True),
                   dict(seed=3, shuffle=False, hard_negatives=True, fraction=0.5),
                   dict(seed=2)):
        ds, scan_ds = source.objective_dataset(objective, 64, **kwargs), scan_source.objective_dataset(objective, 64, **kwargs)
        for _ in range(2):
            got, expected = collect(ds), collect(scan_ds)
            assert list(got) == list(expected)
            assert row_multiset(got) == row_multiset(expected)
            if "fraction" not in kwargs:
                assert len(got["user_id"]) == positives
            if "hard_negative_mask" in got:
                assert 0 < got["hard_negative_mask"].mean()


def test_an_epoch_reads_only_the_positive_shards(shards, tmp_path):
    """Bytes read by one epoch (kernel accounting) are the positive shards' bytes, and the epoch still
    runs once the main shards are gone."""
    folder = tmp_path / "copy"
    shutil.copytree(shards[0].parent, folder)
    pattern = str(folder / "cascade-*.tfrecord")
    source, scan = TFRecordSource(pattern), TFRecordSource(pattern, positive_shards=False)
    main_bytes = sum(os.path.getsize(f) for f in source.files)
    for objective in ("click", "conversion"):
        source.hard_negative_index(objective)
        positive_bytes = sum(os.path.getsize(f) for f in source.epoch_files(objective))
        assert positive_bytes < main_bytes / 5
        read = {}
        for name, src in (("positives", source), ("scan", scan)):
            ds = src.objective_dataset(objective, 64, hard_negatives=True)
            collect(ds)  # first epoch: tracing and lookup tables
            before = bytes_read()
            collect(ds)
            read[name] = bytes_read() - before
        assert positive_bytes <= read["positives"] < 1.05 * positive_bytes + 65_536
        assert read["scan"] >= main_bytes
    expected = {o: row_multiset(collect(source.objective_dataset(o, 64, seed=1, hard_negatives=True)))
                for o in ("click", "conversion")}
    datasets = {o: source.objective_dataset(o, 64, seed=1, hard_negatives=True) for o in ("click", "conversion")}
    scan_click = scan.objective_dataset("click", 64)
    for f in source.files:
        os.remove(f)
    for o, ds in datasets.items():
        assert row_multiset(collect(ds)) == expected[o]
    with pytest.raises(tf.errors.NotFoundError):
        collect(scan_click)


def test_missing_or_stale_positive_shards(table, tmp_path, caplog):
    paths = write_tfrecord(table.take(np.arange(3_000)), tmp_path / "s", num_shards=3)
    pattern = str(tmp_path / "s-*.tfrecord")
    manifest_path = positives_manifest_path(paths[0])
    manifest = json.loads(manifest_path.read_text())
    click = [tmp_path / e["positives"]["click"]["file"] for e in manifest["shards"]]

    manifest_path.unlink()  # files written without positive shards: a one-line notice, then the scan
    with caplog.at_level(logging.WARNING, logger="csmf_tf.data"):
        old = TFRecordSource(pattern)
    notices = [r.getMessage() for r in caplog.records if "positive shards" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and "write_positive_shards" in notices[0]
    assert old.epoch_files("click") == old.files and old.epoch_records("click") == 3_000

    def rewrite() -> None:
        write_positive_shards(pattern)
        assert TFRecordSource(pattern).epoch_files("click") == tuple(str(p) for p in click)

    rewrite()
    click[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"positive shard .*s-00001-of-00003\.click\.tfrecord .*missing"):
        TFRecordSource(pattern)
    rewrite()
    with open(click[2], "ab") as fh:
        fh.write(click[0].read_bytes()[:100])
    with pytest.raises(ValueError, match="stale positive shards: .*click.tfrecord has"):
        TFRecordSource(pattern)
    rewrite()
    edited = json.loads(manifest_path.read_text())
    edited["shards"][0]["positives"]["conversion"]["records"] += 1
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="stale positive shards: the 'conversion' positive shards hold"):
        TFRecordSource(pattern)
    edited["format"] = 99
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="format 99"):
        TFRecordSource(pattern)
    rewrite()
    kept = manifest_path.read_text()  # main shards rewritten with other rows, the old manifest restored
    write_tfrecord(table.take(np.arange(2_000)), tmp_path / "s", num_shards=3, positive_objectives=())
    assert not manifest_path.exists()
    manifest_path.write_text(kept)
    with pytest.raises(ValueError, match="stale positive shards: .*s-00000-of-00003.tfrecord has .* bytes"):
        TFRecordSource(pattern)

    write_tfrecord(table.take(np.arange(3_000)), tmp_path / "s", num_shards=3)
    source = TFRecordSource(pattern)
    ds = source.objective_dataset("click", 64)
    shutil.copy(paths[0], click[0])  # a positive shard replaced by exposures after the checks
    with pytest.raises(tf.errors.InvalidArgumentError, match="not positive"):
        collect(ds)
