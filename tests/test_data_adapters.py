"""Adapters: the generic CSV/TSV reader, and Beibei / AliExpress / Ali-CCP / MovieLens on the shared data."""
import csv

import numpy as np
import pytest

from csmf_tf.data.adapters import (movielens_genre_feature, movielens_year, read_ali_ccp, read_aliexpress, read_beibei,
                                   read_generic, read_movielens)
from csmf_tf.data.validation import BadRowsError, hash_id


def test_generic_rules_features_and_timestamp(tmp_path):
    p = tmp_path / "log.tsv"
    p.write_text("uid\tpid\tlabel\twhen\tcity\tprice\n"
                 "1\t10\t3\t2024-01-02\tparis\t9.5\n"
                 "1\t11\t1\t2024-01-01\tparis\t1\n"
                 "2\t10\t0\t2024-01-03\trome\t9.5\n")
    t = read_generic(p, {"user_id": "uid", "item_id": "pid", "timestamp": "when"},
                     {"exposure": "1", "click": "label>=2", "conversion": "label>=3"},
                     user_features={"city": "city"}, item_features={"price": ("price", "numeric")})
    assert t.labels.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert t.timestamp.tolist() == [1704153600, 1704067200, 1704240000]
    assert t.user_features["city"].tolist() == ["paris", "paris", "rome"]
    assert t.item_features["price"].dtype == np.float32 and t.feature_kinds["city"] == "categorical"


def test_generic_derived_labels_breaking_the_cascade_are_bad_rows(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("u,i,clk,label\n1,1,1,3\n1,2,0,3\n")
    rules = {"exposure": "1", "click": "clk", "conversion": "label>=3"}
    with pytest.raises(BadRowsError, match=r"x\.csv:3: cascade_violation: conversion=1 but click=0"):
        read_generic(p, {"user_id": "u", "item_id": "i"}, rules)
    t = read_generic(p, {"user_id": "u", "item_id": "i"}, rules, on_bad_rows="skip",
                     rejects_path=tmp_path / "rej.csv")
    assert len(t) == 1
    with open(tmp_path / "rej.csv", newline="") as fh:
        assert [(r["line"], r["reason"]) for r in csv.DictReader(fh)] == [("3", "cascade_violation")]


def test_generic_hashed_ids_and_mapping_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("q,a,b,c\n7,1,2.0,0\n7,1,2,1\n")
    t = read_generic(p, {"user_id": "q", "item_id": ["a", "b"]}, {"exposure": "1", "click": "c"},
                     duplicates="merge")
    assert t.item_id.tolist() == [hash_id(["1", "2"])] and t.labels.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="needs keys 'user_id' and 'item_id'"):
        read_generic(p, {"user": "q", "item_id": "a"}, {"exposure": "1"})


# ----------------------------------------------------------------------------------- shared samples


def test_beibei_counts_match_provenance(shared_data_dir):
    t = read_beibei(shared_data_dir / "beibei_cascade_ai607" / "task1_val_answers.tsv")
    assert len(t) == 243_148 and t.objectives == ("exposure", "click", "conversion")
    assert t.labels.sum(axis=0).tolist() == [121_574, 32_271, 13_080]  # label>=1, >=2, ==3
    assert int((t.labels.sum(axis=1) == 0).sum()) == 121_574  # label-0 rows kept as all-zero rows
    assert len(np.unique(t.user_id)) == 10_858 and len(np.unique(t.item_id)) == 7_977
    assert t.timestamp is None and not t.user_features and not t.item_features
    assert (t.user_id[0], t.item_id[0], t.labels[0].tolist()) == ("4630", "327", [1, 1, 0])


def test_aliexpress_samples(shared_data_dir):
    d = shared_data_dir / "aliexpress_sample"
    t = read_aliexpress(d / "aliexpress_train_sample.csv")
    assert len(t) == 100 and t.labels.sum(axis=0).tolist() == [100, 60, 2]
    assert len(np.unique(t.user_id)) == 41 and t.user_id[0] == "81"
    assert len(np.unique(t.item_id)) == 100 and all(len(i) == 16 for i in t.item_id)
    assert list(t.user_features) == [f"categorical_{k}" for k in range(1, 10)]
    assert list(t.item_features) == [f"categorical_{k}" for k in range(10, 17)]
    with open(d / "aliexpress_train_sample.csv", newline="") as fh:
        first = next(csv.DictReader(fh))
    cols = [f"categorical_{k}" for k in range(10, 17)] + [f"numerical_{k}" for k in range(24, 64)]
    assert t.item_id[0] == hash_id([first[c] for c in cols])
    assert t.item_features["categorical_10"][0] == first["categorical_10"]
    test = read_aliexpress(d / "aliexpress_test_sample.csv", numeric_features=True)
    assert len(test) == 20 and test.labels.sum(axis=0).tolist() == [20, 10, 2]
    assert len(test.user_features) == 9 + 23 and len(test.item_features) == 7 + 40
    assert test.item_features["numerical_24"].dtype == np.float32


def test_ali_ccp_samples(shared_data_dir):
    d = shared_data_dir / "ali_ccp_sample"
    # rows / unique (101, 205) pairs / clicked pairs / purchased pairs, counted independently with csv
    expected = {"train": (100, 65, 7, 1), "val": (50, 25, 3, 1), "test": (50, 33, 1, 1)}
    for split, (rows, pairs, clicks, buys) in expected.items():
        path = d / f"ali_ccp_{split}_sample.csv"
        t = read_ali_ccp(path)
        assert len(t) == pairs and t.labels.sum(axis=0).tolist() == [pairs, clicks, buys]
        assert (t.labels[:, 1:] <= t.labels[:, :-1]).all()
        with pytest.raises(BadRowsError, match=f"{rows - pairs} bad row"):
            read_ali_ccp(path, duplicates="bad")
    t = read_ali_ccp(d / "ali_ccp_val_sample.csv")
    assert list(t.user_features) == [f"user_{c}" for c in ("121", "122", "124", "125", "126", "127", "128", "129")]
    assert list(t.item_features) == ["item_category", "item_shop", "item_brand"]
    assert (t.user_id[0], t.item_id[0], t.item_features["item_category"][0]) == ("1", "0", "27")


# ------------------------------------------------------------------------------------------- MovieLens


def _write_crlf(path, lines):
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))


def _tiny_movielens(folder, ratings, movies=None):
    folder.mkdir(exist_ok=True)
    _write_crlf(folder / "movies.csv", movies or [
        "movieId,title,genres",
        '1,"Heat, The (1995)",Action|Crime|Sci-Fi',
        "2,Babylon 5,(no genres listed)",
        "3,Padded Title (2001)  ,Film-Noir"])
    _write_crlf(folder / "ratings.csv", ["userId,movieId,rating,timestamp", *ratings])
    return folder


def test_movielens_tiny_crlf_features_and_labels(tmp_path):
    d = _tiny_movielens(tmp_path / "ml", ["1,1,4.5,100", "1,2,3.0,200", "2,3,4.0,300", "2,1,5,400"])
    t = read_movielens(d)
    assert t.user_id.tolist() == ["1", "1", "2", "2"] and t.item_id.tolist() == ["1", "2", "3", "1"]
    assert t.labels.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert t.timestamp.tolist() == [100, 200, 300, 400]
    assert list(t.item_features) == ["year", "year_missing", "genre_action", "genre_crime", "genre_film_noir",
                                     "genre_sci_fi"]
    assert set(t.feature_kinds.values()) == {"numeric"}
    items = t.item_catalog()
    f = {k: v.tolist() for k, v in items.features.items()}
    assert items.ids.tolist() == ["1", "2", "3"]
    assert f["year"] == [1995.0, 1998.0, 2001.0] and f["year_missing"] == [0.0, 1.0, 0.0]  # 1998 = mean
    assert f["genre_action"] == [1, 0, 0] and f["genre_sci_fi"] == [1, 0, 0] and f["genre_film_noir"] == [0, 0, 1]
    assert movielens_genre_feature("Sci-Fi") == "genre_sci_fi" and movielens_genre_feature("--") == ""
    assert movielens_year("Death Note: Desu nôto (2006–2007)") is None and movielens_year("X (1999) ") == 1999


def test_movielens_bad_rows_name_file_and_line(tmp_path):
    d = _tiny_movielens(tmp_path / "ml", ["1,1,4.5,100", "1,2,abc,200", "1,99,4.0,300", "2,3,7,400",
                                          "2,1,4.0,500", "2,1,3.0,600"])
    with pytest.raises(BadRowsError) as err:
        read_movielens(d)
    msg = str(err.value)
    assert "4 bad row(s)" in msg
    assert "ratings.csv:3: bad_label: rating 'abc' is not a number" in msg
    assert "ratings.csv:4: unknown_item: movieId '99': not listed in movies.csv" in msg
    assert "ratings.csv:5: bad_label: rating '7' is not on the 0.5..5.0 half-star scale" in msg
    assert "ratings.csv:7: duplicate_pair" in msg and "already on line 6" in msg
    t = read_movielens(d, on_bad_rows="skip", rejects_path=tmp_path / "rej.csv")
    assert len(t) == 2 and t.item_id.tolist() == ["1", "1"]
    with open(tmp_path / "rej.csv", newline="") as fh:
        rejected = [(r["file"].endswith("ratings.csv"), r["line"], r["reason"]) for r in csv.DictReader(fh)]
    assert rejected == [(True, "3", "bad_label"), (True, "4", "unknown_item"), (True, "5", "bad_label"),
                        (True, "7", "duplicate_pair")]


def test_movielens_bad_movie_rows(tmp_path):
    movies = ["movieId,title,genres", "1,Heat (1995),Action||Crime", "2,Up (2009),Comedy", "2,Again (2009),Drama",
              "3,Broken (1990)"]
    d = _tiny_movielens(tmp_path / "ml", ["1,1,4.0,100", "1,2,4.0,200"], movies=movies)
    with pytest.raises(BadRowsError) as err:
        read_movielens(d)
    msg = str(err.value)
    assert "movies.csv:2: bad_genres" in msg and "movies.csv:4: duplicate_item: movieId '2' already on line 3" in msg
    assert "movies.csv:5: malformed_row: 2 columns, expected 3" in msg and "ratings.csv" not in msg
    t = read_movielens(d, on_bad_rows="skip", rejects_path=tmp_path / "rej.csv")
    assert t.item_id.tolist() == ["2"] and list(t.item_features) == ["year", "year_missing", "genre_comedy"]
    with open(tmp_path / "rej.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["line"], r["reason"]) for r in rows] == [("2", "bad_genres"), ("4", "duplicate_item"),
                                                          ("5", "malformed_row"), ("2", "unknown_item")]
    assert "its movies.csv row (line 2) was rejected" in rows[-1]["detail"]
    with pytest.raises(ValueError, match="header"):
        read_movielens(_tiny_movielens(tmp_path / "h", [], movies=["id,title,genres"]))


def _movielens_csv(folder):
    """The two files read independently with the ``csv`` module (the reference for the adapter)."""
    with open(folder / "ratings.csv", newline="", encoding="utf-8") as fh:
        ratings = list(csv.DictReader(fh))
    with open(folder / "movies.csv", newline="", encoding="utf-8") as fh:
        movies = {m["movieId"]: m for m in csv.DictReader(fh)}
    return ratings, movies


@pytest.fixture(scope="module")
def movielens(shared_data_dir):
    folder = shared_data_dir / "movielens_latest_small"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder, read_movielens(folder)


def test_movielens_counts_match_csv(movielens):
    folder, t = movielens
    ratings, _ = _movielens_csv(folder)
    stars = np.array([float(r["rating"]) for r in ratings])
    assert len(t) == len(ratings) == 100_836 and t.objectives == ("exposure", "click", "conversion")
    assert len(np.unique(t.user_id)) == len({r["userId"] for r in ratings}) == 610
    assert len(np.unique(t.item_id)) == len({r["movieId"] for r in ratings}) == 9_724
    expected = [len(ratings), int((stars >= 4.0).sum()), int((stars >= 4.5).sum())]
    assert t.labels.sum(axis=0).tolist() == expected == [100_836, 48_580, 21_762]
    assert (t.labels[:, 1:] <= t.labels[:, :-1]).all()
    assert t.user_id.tolist() == [r["userId"] for r in ratings] and t.item_id.tolist() == [r["movieId"] for r in ratings]
    assert t.timestamp.tolist() == [int(r["timestamp"]) for r in ratings]
    assert (t.timestamp.min(), t.timestamp.max()) == (828_124_615, 1_537_799_250)


def test_movielens_item_features(movielens):
    folder, t = movielens
    _, movies = _movielens_csv(folder)
    items = t.item_catalog()
    assert len(items) == 9_724 and set(items.features) == set(t.item_features)
    genres = sorted({g for m in movies.values() for g in m["genres"].split("|")} - {"(no genres listed)"})
    assert len(genres) == 19 and "IMAX" in genres
    assert list(t.item_features) == ["year", "year_missing"] + sorted(movielens_genre_feature(g) for g in genres)
    f = items.features
    row = {m: k for k, m in enumerate(items.ids.tolist())}
    toy = row["1"]
    assert movies["1"]["title"] == "Toy Story (1995)" and f["year"][toy] == 1995 and f["year_missing"][toy] == 0
    assert [g for g in genres if f[movielens_genre_feature(g)][toy] == 1] == [
        "Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    for mid, k in row.items():  # every rated movie's multi-hot = its genres field, independently parsed
        listed = set(movies[mid]["genres"].split("|")) - {"(no genres listed)"}
        assert {g for g in genres if f[movielens_genre_feature(g)][k] == 1} == listed, mid
    known = [int(m["title"].strip()[-5:-1]) for m in movies.values() if m["title"].strip()[-6:-5] == "("
             and m["title"].strip()[-5:-1].isdigit() and m["title"].strip().endswith(")")]
    assert len(known) == 9_729 and f["year"][row["40697"]] == pytest.approx(np.mean(known))  # no year: mean year
    no_year = {m for m, k in row.items() if f["year_missing"][k] == 1}
    assert len(no_year) == 13 and {"40697", "171749", "176601"} <= no_year  # Babylon 5, Death Note, Black Mirror
    padded = [m for m in movies.values() if m["title"] != m["title"].strip()]
    assert len(padded) == 11 and all(f["year_missing"][row[m["movieId"]]] == 0 for m in padded if m["movieId"] in row)
    assert f["year"][row[padded[0]["movieId"]]] == int(padded[0]["title"].strip()[-5:-1])


def test_movielens_features_reach_the_item_tower(movielens):
    from csmf_tf.models.towers import TowerConfig
    from csmf_tf.training.stages import TrainingConfig, build_model

    _, table = movielens
    t = table.take(np.arange(2000))
    config = TrainingConfig(tower=TowerConfig(id_embedding_dim=8, feature_embedding_dim=4, hidden_units=(16,),
                                              output_dim=8))
    model = build_model(config, t.user_catalog(), t.item_catalog(), t.feature_kinds, factorized_metrics=False)
    assert set(model.item_inputs) == {"item_id", *t.item_features}
    items = t.item_catalog()
    inputs = items.as_inputs("item_id")
    vectors = model.item_vectors(inputs)
    assert vectors.shape == (len(items), 8) and np.isfinite(vectors).all()
    flipped = dict(inputs, genre_drama=1.0 - inputs["genre_drama"], year=inputs["year"] + 20.0)
    assert not np.allclose(model.item_vectors(flipped), vectors)
