"""Small functional towers with the trained towers' input/output contract, for tests, benchmarks and demos.

They are *not* trained: the item tower's output is a clustered embedding (items of a category sit near
a category centre) so that retrieval behaves like on real data (ScaNN partitions are meaningful) while
the whole model is still a plain ``StringLookup + Embedding + Dense`` tf.keras graph. Nothing in
:mod:`csmf_tf.serving` imports this module.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from csmf_tf.data.table import Catalog
from csmf_tf.layers.lookup import string_lookup


#: The demo user tower's ``city`` vocabulary (any other city is out of vocabulary).
DEMO_CITIES = ("paris", "lyon", "nice", "lille")


@dataclasses.dataclass
class DemoTowers:
    """Towers plus the catalogs they were built for."""

    user_model: tf.keras.Model
    item_model: tf.keras.Model
    user_catalog: Catalog
    item_catalog: Catalog
    owner_stage: np.ndarray
    objectives: tuple[str, ...]


def clustered_vectors(n: int, dim: int, num_clusters: int, rng: np.random.Generator, spread: float = 0.35,
                      return_centres: bool = False) -> tuple[np.ndarray, ...]:
    """``n`` vectors around ``num_clusters`` centres with log-normal norms.

    Returns ``(vectors, cluster)`` or, with ``return_centres``, ``(vectors, cluster, centres)``.

    Real embedding tables are clustered and have varying norms (popular items are longer); uniform
    noise would make every ANN index look bad and every partition equally (un)useful.
    """
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Zipf-like cluster sizes: a few large categories, many small ones.
    p = 1.0 / np.arange(1, num_clusters + 1) ** 0.7
    cluster = rng.choice(num_clusters, size=n, p=p / p.sum())
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    vectors = centres[cluster] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    norms = np.exp(rng.normal(0.0, 0.25, size=(n, 1))).astype(np.float32)
    vectors = (vectors * norms).astype(np.float32)
    return (vectors, cluster, centres) if return_centres else (vectors, cluster)


def default_owner_stage(dim: int, num_stages: int) -> np.ndarray:
    """Contiguous blocks, the first stage owning half the dims, the rest split evenly (as CPP tends to)."""
    first = dim // 2
    rest = np.array_split(np.arange(dim - first), num_stages - 1) if num_stages > 1 else []
    owner = np.ones(dim, np.int32)
    for t, block in enumerate(rest, start=2):
        owner[first + block] = t
    return owner


def build_demo_towers(num_users: int = 50, num_items: int = 300, dim: int = 16, num_clusters: int = 20,
                      objectives: tuple[str, ...] = ("exposure", "click", "conversion"),
                      prune_wrapper: bool = False, seed: int = 0) -> DemoTowers:
    """Functional towers on dict inputs.

    user tower: ``user_id`` (string) -> StringLookup -> Embedding (initialised near one or two
    favourite item categories, as a trained tower would be) + Dense(``city`` embedding, ``age``
    float32) -> Dense(dim). item tower: ``item_id`` + ``category`` (string) -> StringLookup ->
    Embedding initialised with clustered vectors. With ``prune_wrapper`` the user tower's last Dense is
    wrapped in ``tfmot.sparsity.keras.prune_low_magnitude`` with a schedule that never recomputes the
    mask (how the CSMF trainer uses it), and part of the mask is zeroed.
    """
    rng = np.random.default_rng(seed)
    user_ids = np.array([f"u{i}" for i in range(num_users)], dtype=object)
    item_ids = np.array([f"i{i}" for i in range(num_items)], dtype=object)
    cities = np.array(DEMO_CITIES, dtype=object)
    user_catalog = Catalog(user_ids, {"age": rng.uniform(18, 70, num_users).astype(np.float32),
                                      "city": cities[rng.integers(0, len(cities), num_users)]})
    item_vecs, cluster, centres = clustered_vectors(num_items, dim, num_clusters, rng, return_centres=True)
    item_catalog = Catalog(item_ids, {"category": np.array([f"c{c}" for c in cluster], dtype=object)})

    # Like a trained tower, a user points towards the items it likes: one or two favourite categories.
    fav = rng.choice(np.unique(cluster), size=(num_users, 2))
    mix = rng.uniform(0.6, 1.0, size=(num_users, 1))
    user_table = mix * centres[fav[:, 0]] + (1 - mix) * centres[fav[:, 1]]
    user_table += rng.standard_normal(user_table.shape) * 0.2 / np.sqrt(dim)
    user_table = np.concatenate([np.zeros((1, dim)), user_table]).astype(np.float32)   # row 0 = OOV

    u_in = {"user_id": tf.keras.Input(shape=(), dtype=tf.string, name="user_id"),
            "age": tf.keras.Input(shape=(), dtype=tf.float32, name="age"),
            "city": tf.keras.Input(shape=(), dtype=tf.string, name="city")}
    uid = string_lookup(user_ids, name="user_lookup")(u_in["user_id"])
    user_emb = tf.keras.layers.Embedding(num_users + 1, dim, name="user_emb")
    uemb = user_emb(uid)
    cid = tf.keras.layers.StringLookup(vocabulary=list(cities), name="city_lookup")(u_in["city"])
    cemb = tf.keras.layers.Embedding(len(cities) + 1, 4, name="city_emb", embeddings_initializer=
                                     tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=seed + 1))(cid)
    age = tf.keras.layers.Reshape((1,), name="age_col")(u_in["age"] / 50.0)
    side = tf.keras.layers.Dense(dim, name="user_side", kernel_initializer=
                                 tf.keras.initializers.RandomNormal(stddev=0.02, seed=seed))(
        tf.keras.layers.Concatenate(name="side_concat")([cemb, age]))
    h = tf.keras.layers.Add(name="user_sum")([uemb, side])
    kernel = np.eye(dim, dtype=np.float32) + rng.standard_normal((dim, dim)).astype(np.float32) * 0.05
    dense = tf.keras.layers.Dense(dim, name="user_out", kernel_initializer=tf.keras.initializers.Constant(kernel))
    if prune_wrapper:
        import tensorflow_model_optimization as tfmot

        schedule = tfmot.sparsity.keras.ConstantSparsity(0.0, begin_step=0, end_step=0, frequency=10 ** 9)
        dense = tfmot.sparsity.keras.prune_low_magnitude(dense, pruning_schedule=schedule)
    user_model = tf.keras.Model(u_in, dense(h), name="user_tower")
    # Assigned, not a Constant initializer: an initializer's value is part of the layer config, which
    # SavedModel export serialises again and again (a 1M-row table made the export take minutes).
    user_emb.embeddings.assign(user_table)
    if prune_wrapper:
        # An active-connection mask as CSMF holds it: later-stage columns lose random off-diagonal inputs.
        wrapper = user_model.get_layer(dense.name)
        _, mask, _ = wrapper.pruning_vars[0]
        m = np.ones(mask.shape, np.float32)
        m[:, dim // 2:] *= (rng.random((dim, dim - dim // 2)) > 0.5)
        np.fill_diagonal(m, 1.0)
        mask.assign(m)

    i_in = {"item_id": tf.keras.Input(shape=(), dtype=tf.string, name="item_id"),
            "category": tf.keras.Input(shape=(), dtype=tf.string, name="category")}
    iid = string_lookup(item_ids, name="item_lookup")(i_in["item_id"])
    table = np.concatenate([np.zeros((1, dim), np.float32), item_vecs])   # row 0 = OOV
    item_emb = tf.keras.layers.Embedding(num_items + 1, dim, name="item_emb")
    iemb = item_emb(iid)
    cats = sorted(set(item_catalog.features["category"].tolist()))
    kid = tf.keras.layers.StringLookup(vocabulary=cats, name="category_lookup")(i_in["category"])
    kemb = tf.keras.layers.Embedding(len(cats) + 1, dim, name="category_emb",
                                     embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.01, seed=seed))(kid)
    item_model = tf.keras.Model(i_in, tf.keras.layers.Add(name="item_out")([iemb, kemb]), name="item_tower")
    item_emb.embeddings.assign(table)
    return DemoTowers(user_model, item_model, user_catalog, item_catalog,
                      default_owner_stage(dim, len(objectives)), tuple(objectives))


def numpy_retrieval(user_vectors: np.ndarray, item_vectors: np.ndarray, owner_stage: np.ndarray,
                    weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference exact retrieval in numpy: ``(rows [B, k], fused scores [B, k], stage scores [B, k, S])``.

    ``weights`` is ``[S]`` or ``[B, S]``; ``F = sum_t k_t s_t`` with ``s_t`` from
    :func:`csmf_tf.scoring.stage_queries`, computed independently of the serving graph.
    """
    from csmf_tf.scoring import stage_queries

    u = np.asarray(user_vectors, np.float64)
    v = np.asarray(item_vectors, np.float64)
    s = int(np.asarray(weights).shape[-1])
    w = np.broadcast_to(np.asarray(weights, np.float64).reshape(-1, s), (len(u), s))
    stage = np.stack([stage_queries(u, owner_stage, t + 1).astype(np.float64) @ v.T for t in range(s)], -1)
    fused = np.einsum("bnt,bt->bn", stage, w)
    rows = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return rows, take(fused, rows, 1), np.stack([take(stage[..., t], rows, 1) for t in range(s)], -1)


@dataclasses.dataclass
class BenchmarkCorpus:
    """Clustered item vectors plus user vectors and per-query objective weights (benchmarks)."""

    items: np.ndarray          # [N, D]
    users: np.ndarray          # [Q, D]
    weights: np.ndarray        # [Q, S]
    owner_stage: np.ndarray    # [D]


def benchmark_corpus(num_items: int, dim: int = 64, num_queries: int = 500, num_stages: int = 3,
                     items_per_cluster: int = 200, seed: int = 0) -> BenchmarkCorpus:
    """A corpus shaped like trained two-tower embeddings, for ANN benchmarks.

    Items: ``N / items_per_cluster`` categories with Zipf-like sizes, unit directions around a centre,
    log-normal norms. Users: a mix of one or two favourite categories plus noise (a trained user
    vector points at what the user likes). Weights: ``k_t ~ U(0.2, 2)`` per query, so the fused
    queries ``u * w`` vary in direction as well as length.
    """
    rng = np.random.default_rng(seed)
    items, cluster, centres = clustered_vectors(num_items, dim, max(10, num_items // items_per_cluster), rng,
                                                return_centres=True)
    fav = rng.choice(np.unique(cluster), size=(num_queries, 2))
    mix = rng.uniform(0.6, 1.0, size=(num_queries, 1))
    users = mix * centres[fav[:, 0]] + (1 - mix) * centres[fav[:, 1]]
    users += rng.standard_normal(users.shape) * 0.2 / np.sqrt(dim)
    weights = rng.uniform(0.2, 2.0, size=(num_queries, num_stages))
    return BenchmarkCorpus(items, users.astype(np.float32), weights.astype(np.float32),
                           default_owner_stage(dim, num_stages))


def identity_towers(dim: int) -> tuple[tf.keras.Model, tf.keras.Model]:
    """Towers that return their input vector (``user_vector`` / ``item_vector`` float32 [B, D]).

    Benchmarks use them to serve precomputed vectors through the real export graph.
    """
    u_in = tf.keras.Input(shape=(dim,), dtype=tf.float32, name="user_vector")
    i_in = tf.keras.Input(shape=(dim,), dtype=tf.float32, name="item_vector")
    user = tf.keras.Model({"user_vector": u_in}, tf.keras.layers.Activation("linear", name="u")(u_in))
    item = tf.keras.Model({"item_vector": i_in}, tf.keras.layers.Activation("linear", name="v")(i_in))
    return user, item
