"""The ScaNN index defaults per catalogue size (``ScannOptions.for_catalogue``) and the benchmark's corpora
(``csmf_tf.testing.embedding_corpus``): the rule, its use as the export default, the generator's
documented statistics, the fit that sets its cluster knobs, and the trained-vector cache's layout."""
import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)

import dataclasses
import math

import numpy as np
import pytest

from csmf_tf.serving.index import (CATALOGUE_DEFAULTS, FULL_SEARCH_MAX_ITEMS, ScannOptions, build_index)
from csmf_tf.testing.embedding_corpus import (TRAINED_PROFILE, TrainingRecipe, cluster_statistics,
                                              corpus_profile, embedding_corpus, fit_profile, load_trained,
                                              train_item_vectors)


def test_small_catalogues_search_every_leaf():
    for n in (1, 17, 5_000, FULL_SEARCH_MAX_ITEMS):
        params = ScannOptions.for_catalogue(n, 100).resolve(n, 100)
        assert params["num_leaves"] == max(1, round(math.sqrt(n)))
        assert params["num_leaves_to_search"] == params["num_leaves"]
        assert params["num_reordering_candidates"] == min(n, 1000)
    assert ScannOptions.for_catalogue(5_000, 300).num_reordering_candidates == 3000


def test_measured_sizes_get_their_measured_configuration():
    for d in CATALOGUE_DEFAULTS:
        o = ScannOptions.for_catalogue(d.num_items)
        assert o.num_leaves == round(d.leaf_multiplier * math.sqrt(d.num_items))
        assert (o.leaves_to_search_fraction, o.num_reordering_candidates, o.spherical) == (
            d.leaf_fraction, d.reorder, d.spherical)


def test_between_and_beyond_measured_sizes():
    lo, hi = CATALOGUE_DEFAULTS[0], CATALOGUE_DEFAULTS[-1]
    mid = int(math.sqrt(lo.num_items * hi.num_items))
    o = ScannOptions.for_catalogue(mid)
    # Between two measured sizes: never less than either side needed.
    assert o.leaves_to_search_fraction == max(d.leaf_fraction for d in (lo, hi))
    assert o.num_reordering_candidates == max(d.reorder for d in (lo, hi))
    assert o.num_leaves == round(max(lo.leaf_multiplier, hi.leaf_multiplier) * math.sqrt(mid))
    big = ScannOptions.for_catalogue(10 * hi.num_items)
    assert (big.leaves_to_search_fraction, big.num_reordering_candidates) == (hi.leaf_fraction, hi.reorder)
    small = ScannOptions.for_catalogue(FULL_SEARCH_MAX_ITEMS + 1)
    assert (small.leaves_to_search_fraction, small.num_reordering_candidates) == (lo.leaf_fraction, lo.reorder)
    # Re-ranked candidates were measured for 100 retrieved: more retrieved, proportionally more.
    assert ScannOptions.for_catalogue(hi.num_items, 400).num_reordering_candidates == 4 * hi.reorder
    with pytest.raises(ValueError, match="num_items=0"):
        ScannOptions.for_catalogue(0)
    with pytest.raises(ValueError, match="num_candidates"):
        ScannOptions.for_catalogue(100, 0)


def test_default_options_are_the_rule_and_explicit_fields_win():
    for n in (3_000, 150_000, 2_000_000):
        assert ScannOptions().resolve(n, 100) == ScannOptions.for_catalogue(n, 100).resolve(n, 100)
    explicit = ScannOptions(num_leaves=50, num_leaves_to_search=7, num_reordering_candidates=300,
                            spherical=True).resolve(200_000, 100)
    assert (explicit["num_leaves"], explicit["num_leaves_to_search"], explicit["num_reordering_candidates"],
            explicit["spherical"]) == (50, 7, 300, True)


def test_export_index_uses_the_rule_by_default():
    vectors = np.random.default_rng(0).standard_normal((900, 8)).astype(np.float32)
    index, config = build_index(vectors, 20, use_scann=True)
    expected = ScannOptions.for_catalogue(900, 20).resolve(900, 20)
    assert {k: config[k] for k in expected} == expected
    rows = index(vectors[:3])[1].numpy()
    assert rows.shape == (3, 20)


def test_generator_has_its_profiles_statistics():
    # Fewer clusters' worth of between-variance than the fitted 0.98: at 6,000 rows the ~77 centres
    # would otherwise dominate the sample spectrum (at 10^6 rows there are 1,000 of them).
    p = dataclasses.replace(TRAINED_PROFILE, cluster_between=0.3)
    items, queries = embedding_corpus(6_000, 400, p, seed=3)
    assert items.shape == (6_000, p.tower_dim + 1) and queries.shape == (400, p.tower_dim + 1)
    assert items.dtype == queries.dtype == np.float32
    m = corpus_profile(items, queries, sample=6_000)
    assert np.all(queries[:, -1] == np.float32(p.alpha))
    assert np.allclose(np.expm1(items[:, -1]), np.round(np.expm1(items[:, -1])), atol=1e-3)  # log(1 + count)
    for key, tol in (("item_mean_norm", 0.03), ("item_centred_rms", 0.05), ("query_mean_norm", 0.05),
                     ("query_centred_rms", 0.05), ("log_count_mu", 0.05), ("log_count_sigma", 0.08),
                     ("popularity_r2", 0.05), ("query_mean_cosine", 0.05), ("mean_popularity_cosine", 0.05)):
        assert m[key] == pytest.approx(getattr(p, key), abs=tol * max(1.0, abs(getattr(p, key)))), key
    assert m["popularity_axis_share"] == pytest.approx(p.popularity_axis_share, rel=0.25)
    # The spectrum model is recovered from the generated rows (plateau, then a power-law fall).
    assert abs(m["plateau_dims"] - p.plateau_dims) <= 1.0 and abs(m["decay_slope"] - p.decay_slope) <= 0.5


def test_cluster_knob_is_monotone_and_fit_recovers_it():
    truth = dataclasses.replace(TRAINED_PROFILE, cluster_between=0.6, query_cluster_pull=0.3)
    shares = [cluster_statistics(*embedding_corpus(3_000, 200, dataclasses.replace(truth, cluster_between=b),
                                                   seed=1), sample=3_000)["cluster_within_share"]
              for b in (0.0, 0.5, 0.9)]
    assert shares[0] > shares[1] > shares[2]
    items, queries = embedding_corpus(3_000, 200, truth, seed=5)
    fitted = fit_profile(items, queries, sample=3_000, steps=5)
    # The fit's contract: corpora generated with the fitted knobs have the measured cluster statistics.
    target = cluster_statistics(items, queries, sample=3_000)
    again = cluster_statistics(*embedding_corpus(3_000, 200, fitted, seed=6), sample=3_000)
    assert again["cluster_within_share"] == pytest.approx(target["cluster_within_share"], abs=0.02)
    assert again["query_top_cluster_share"] == pytest.approx(target["query_top_cluster_share"], abs=0.05)
    assert fitted.cluster_between == pytest.approx(0.6, abs=0.2)
    assert fitted.alpha == pytest.approx(truth.alpha) and fitted.tower_dim == truth.tower_dim


def test_trained_vectors_are_what_an_export_indexes(tmp_path):
    recipe = TrainingRecipe(num_items=600, num_users=120, num_exposures=4_000, max_epochs=1, num_shards=2,
                            holdout_users=0.1)
    path = train_item_vectors(recipe, tmp_path, verbose=0)
    items, queries = load_trained(path)
    with np.load(path) as z:
        tower_dim = int(z["tower_dim"])
    assert items.shape[1] == queries.shape[1] == tower_dim + 1 and len(queries) == 120
    assert 0 < len(items) <= 600
    counts = np.expm1(items[:, -1].astype(np.float64))
    assert np.allclose(counts, np.round(counts), atol=1e-3) and counts.min() >= 0     # log(1 + count) column
    assert np.all(queries[:, -1] == queries[0, -1]) and queries[0, -1] >= 0           # [u, alpha]
    before = path.stat().st_mtime_ns
    assert train_item_vectors(recipe, tmp_path, verbose=0) == path and path.stat().st_mtime_ns == before
