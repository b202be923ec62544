"""Item vectors with the structure of trained embeddings, for ANN benchmarks.

Two sources:

* :func:`train_item_vectors`: the real thing. The synthetic cascade at ``n`` items is written as TFRecord
  shards (:func:`csmf_tf.data.synthetic.write_cascade_tfrecord`), the exposure tower (CSMF's stage 1) is
  trained from them through the streaming path (``TFRecordSource`` + ``prepare_streaming`` +
  ``train_csmf``, what ``python -m pipelines.train_cascade --train-tfrecords ... --holdout ...`` runs) with
  lazy Adam and sparse embeddings (a step costs the same at any catalogue size), and the vectors an export
  indexes are saved to an ``.npz`` cache: the item vectors with the popularity-prior column appended, and
  every user's query ``[u, alpha]`` (one objective, so the fused query ``u * w`` is ``u`` times a scalar).
* :func:`embedding_corpus`: a generator in the same layout whose spectrum (a plateau over the latent
  rank, then a power-law fall), norms, mean directions, popularity column (log-normal counts, linearly
  encoded in the tower vector as trained towers do) and cluster structure were fitted to those trained
  vectors (:data:`TRAINED_PROFILE`, numbers and provenance next to it; :func:`fit_profile` fits any
  other pair). :func:`corpus_profile` measures the statistics on any corpus, so the fit can be checked
  (``benchmarks/bench_scann.py`` writes both side by side). What it does *not* reproduce: how far a
  query's top items stand out from the rest (:func:`score_tail`; at 10^6 the trained top-100 sit 0.83
  score standard deviations above the 1,000th, generated ones 0.40), and with that ScaNN's difficulty:
  at 10^6 generated items no swept setting reaches recall@100 0.99 (0.88 at best), where the trained
  vectors reach 0.991 at 20 % of the leaves. Benchmark on trained vectors; use the generator for shapes
  and scale, not for choosing index settings.

Nothing in :mod:`csmf_tf.serving` imports this module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from csmf_tf.data.synthetic import CascadeConfig

#: The cascade the trained vectors come from: the generator's defaults except a flatter popularity
#: (Zipf exponent 0.5 instead of 1.0), so that a few exposures per item reach most of a 10^6 catalogue
#: (with exponent 1.0 and 3 exposures per item, most of the tail is never shown and never enters the
#: catalogue at all).
TRAINED_CASCADE = CascadeConfig(zipf_exponent=0.5)


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Sizes and training settings of :func:`train_item_vectors` for one catalogue size."""

    num_items: int
    num_users: int
    num_exposures: int
    max_epochs: int
    num_shards: int = 4
    holdout_users: float = 0.05
    seed: int = 0


def default_recipe(num_items: int) -> TrainingRecipe:
    """3 to 6 exposures per item and 3,000 users (the generator's cost is ``O(users x items)``: 3,000 x 10^6
    logits took 227 s on the shared 2-core machine); at most 6 epochs at 10^6 items (an epoch of 3M
    exposures is about 2,900 steps: 224 s at load 6, up to 465 s at load 10), fewer with early stopping
    (patience 2: the 10^6 run stopped after 4 epochs, best at 2; 31 min in all at load 6-10); 10^5 items
    train until validation Recall@50 stops improving (6 epochs of 22-26 s, 4 min in all).

    Not every item is drawn: catalogues hold the items the cascade exposed (87,432 of 10^5 and 720,136 of
    10^6 with these recipes)."""
    if num_items <= 200_000:
        return TrainingRecipe(num_items, 3_000, 6 * num_items, max_epochs=20)
    return TrainingRecipe(num_items, 3_000, 3 * num_items, max_epochs=6, num_shards=8)


def train_item_vectors(recipe: TrainingRecipe, cache_dir: str | Path, verbose: int = 1) -> Path:
    """Generate, train and cache; returns the ``.npz`` path (reused when it exists).

    The ``.npz`` holds ``items [N, D+1]`` (tower output and the prior column ``log(1 + count)``, exactly the
    rows a ScaNN export indexes), ``queries [U, D+1]`` (``[u, alpha]`` for every user), ``tower_dim``,
    ``recipe`` (JSON) and the training ``seconds`` per phase.
    """
    from csmf_tf.data.files import read_tfrecord
    from csmf_tf.data.prepared import prepare_streaming
    from csmf_tf.data.streaming import TFRecordSource
    from csmf_tf.data.features import ITEM_ID, USER_ID
    from csmf_tf.data.synthetic import write_cascade_tfrecord
    from csmf_tf.training.run import train_csmf
    from csmf_tf.training.stages import TrainingConfig

    cache = Path(cache_dir)
    out = cache / f"trained_items_{recipe.num_items}_seed{recipe.seed}.npz"
    if out.exists():
        return out
    work = cache / f"cascade_{recipe.num_items}_seed{recipe.seed}"
    seconds = {}
    t0 = time.perf_counter()
    files = write_cascade_tfrecord(work / "data" / "cascade", recipe.num_users, recipe.num_items,
                                   recipe.num_exposures, num_shards=recipe.num_shards, seed=recipe.seed,
                                   config=TRAINED_CASCADE, holdout_users=recipe.holdout_users)
    seconds["generate"] = time.perf_counter() - t0
    print(f"cascade: {files.rows:,} rows, {files.num_items:,} items seen, {files.num_users:,} users "
          f"({seconds['generate']:.0f}s)", flush=True)
    t0 = time.perf_counter()
    data = prepare_streaming(TFRecordSource([str(p) for p in files.paths]), read_tfrecord(str(files.holdout_path)),
                             seed=recipe.seed)
    config = TrainingConfig(objectives=("exposure",), tau=(), optimizer="lazy_adam", sparse_embeddings=True,
                            max_epochs=recipe.max_epochs, seed=recipe.seed)
    run = train_csmf(data, config, work / "run", verbose=verbose, tensorboard_dir=None)
    seconds["train"] = time.perf_counter() - t0
    model = run.model
    items = model.item_vectors(data.items.as_inputs(ITEM_ID))
    users = model.user_vectors(data.users.as_inputs(USER_ID))
    # What the export indexes with the popularity prior (on by default): [v, log(1 + count)], queries [u, alpha].
    items = np.concatenate([items, run.prior.log_popularity[:, :1]], axis=1)
    users = np.concatenate([users, np.full((len(users), 1), run.prior.alphas[0], np.float32)], axis=1)
    np.savez(out, items=items.astype(np.float32), queries=users.astype(np.float32),
             tower_dim=model.owner_stage.shape[-1], recipe=json.dumps(dataclasses.asdict(recipe)),
             seconds=json.dumps(seconds), results=json.dumps(run.results, default=float))
    print(f"saved {out}: items {items.shape}, queries {users.shape}", flush=True)
    return out


def load_trained(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(items, queries)`` of a :func:`train_item_vectors` cache."""
    with np.load(path) as z:
        return z["items"], z["queries"]


def _kmeans(x: np.ndarray, num_clusters: int, rng: np.random.Generator,
            iterations: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: ``(centres, assignment)``."""
    sq = (x * x).sum(axis=1)
    centres = [x[rng.integers(len(x))]]
    nearest = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(num_clusters - 1):
        centres.append(x[rng.choice(len(x), p=nearest / nearest.sum())])
        nearest = np.minimum(nearest, ((x - centres[-1]) ** 2).sum(axis=1))
    c = np.array(centres)
    for _ in range(iterations + 1):
        assign = np.argmin(sq[:, None] - 2.0 * x @ c.T + (c * c).sum(axis=1)[None, :], axis=1)
        counts = np.bincount(assign, minlength=num_clusters)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        keep = counts > 0
        c[keep] = sums[keep] / counts[keep, None]
    return c, assign


def cluster_statistics(items: np.ndarray, queries: np.ndarray | None, sample: int = 20_000, k: int = 100,
                       seed: int = 0) -> dict:
    """Cluster structure on a ``sample`` of the items with ``sqrt(sample)`` k-means clusters.

    ``cluster_within_share``: within-cluster share of the centred variance (1: no cluster structure, 0:
    points on their centres). With ``queries``: ``query_top_cluster_share``, the mean share of a query's
    exact top-``k`` (among the sample) that falls in its most frequent cluster (how concentrated a
    query's neighbours are in partition space: what an IVF index like ScaNN's tree exploits).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(items, np.float64)
    rows = x if len(x) <= sample else x[rng.choice(len(x), sample, replace=False)]
    centred = rows - rows.mean(axis=0)
    c, assign = _kmeans(centred, int(round(math.sqrt(len(rows)))), rng)
    out = {"cluster_within_share": float(((centred - c[assign]) ** 2).sum() / (centred ** 2).sum())}
    if queries is not None:
        top = np.argsort(-(np.asarray(queries, np.float64) @ rows.T), axis=1)[:, :min(k, len(rows))]
        out["query_top_cluster_share"] = float(np.mean([np.bincount(a).max() / len(a) for a in assign[top]]))
    return out


def spectrum_shares(dim: int, plateau_dims: float, decay_slope: float) -> np.ndarray:
    """Eigenvalue shares (sum 1, largest first): ``1 / (1 + (i / plateau_dims) ^ decay_slope)``, about flat
    over the first ``plateau_dims`` (the latent rank the data has), then falling as a power law."""
    s = 1.0 / (1.0 + (np.arange(dim, dtype=np.float64) / plateau_dims) ** decay_slope)
    return s / s.sum()


def fit_spectrum(shares: np.ndarray) -> tuple[float, float, float]:
    """``(plateau_dims, decay_slope, rms error of the log shares)``: least squares by grid search."""
    shares = np.asarray(shares, np.float64)
    target = np.log(np.maximum(shares / shares.sum(), 1e-12))
    best = (np.inf, 1.0, 1.0)
    for r in np.arange(1.0, len(shares), 0.5):
        for beta in np.arange(0.5, 12.01, 0.25):
            best = min(best, (float(np.mean((np.log(spectrum_shares(len(shares), r, beta)) - target) ** 2)), r, beta))
    return float(best[1]), float(best[2]), math.sqrt(best[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def corpus_profile(items: np.ndarray, queries: np.ndarray, sample: int = 20_000, seed: int = 0) -> dict:
    """The statistics :func:`embedding_corpus` is fitted to, measured on an export's rows and queries.

    ``items [N, D+1]`` are ``[v, log(1 + count)]`` and ``queries [Q, D+1]`` are ``[u, alpha]`` (what a
    ScaNN export indexes and asks with the popularity prior on). ``e_pop`` is the unit direction of the
    least-squares fit of the popularity column from the tower vectors ``v``.

    * items: ``item_mean_norm`` ``|mean v|``, ``item_centred_rms`` ``sqrt(E|v - mean|^2)``, ``spectrum``
      (eigenvalue shares of the centred ``v`` outside ``e_pop``, largest first) with
      :func:`fit_spectrum`'s ``plateau_dims`` / ``decay_slope``; ``popularity_axis_share`` (share of the
      centred variance along ``e_pop``), ``popularity_r2`` (R^2 of that fit), ``mean_popularity_cosine``
      (``cos(mean v, e_pop)``), ``log_count_mu`` / ``log_count_sigma`` (of the counts ``>= 1``),
      ``norm_quantiles`` (``|row|`` at 1/10/50/90/99 % over its median);
    * queries: ``query_mean_norm``, ``query_centred_rms``, ``query_mean_cosine`` (with ``mean v``),
      ``query_popularity_cosine`` (``cos(mean u, e_pop)``), ``alpha`` (mean last column);
    * :func:`score_tail` (``score_gap_100_1000``, ``score_top100_z``: not fitted, reported) and
      :func:`cluster_statistics` of the rows (``cluster_within_share``, ``query_top_cluster_share``).
    """
    x = np.asarray(items, np.float64)
    q = np.asarray(queries, np.float64)
    v, pop = x[:, :-1], x[:, -1]
    mean = v.mean(axis=0)
    centred = v - mean
    coef, *_ = np.linalg.lstsq(centred, pop - pop.mean(), rcond=None)
    e_pop = coef / np.linalg.norm(coef)
    along = centred @ e_pop
    rest = centred - np.outer(along, e_pop)
    eig = np.linalg.eigvalsh(rest.T @ rest / len(v))[::-1][:-1].clip(min=0)   # D-1: e_pop's axis is gone
    plateau, slope, err = fit_spectrum(eig / eig.sum())
    residual = pop - pop.mean() - centred @ coef
    counts = np.round(np.expm1(pop))
    log_counts = np.log(counts[counts >= 1])
    u, alpha = q[:, :-1], q[:, -1]
    qm = u.mean(axis=0)
    norms = np.linalg.norm(x, axis=1)
    return {"num_items": int(len(x)), "dim": int(x.shape[1]),
            "item_mean_norm": float(np.linalg.norm(mean)),
            "item_centred_rms": float(np.sqrt(np.mean(np.sum(centred ** 2, axis=1)))),
            "spectrum": (eig / eig.sum()).tolist(), "plateau_dims": plateau, "decay_slope": slope,
            "spectrum_fit_rms_log": err,
            "popularity_axis_share": float(np.mean(along ** 2) / np.mean(np.sum(centred ** 2, axis=1))),
            "popularity_r2": float(1.0 - residual.var() / pop.var()),
            "mean_popularity_cosine": abs(_cosine(mean, e_pop)),
            "log_count_mu": float(log_counts.mean()), "log_count_sigma": float(log_counts.std()),
            "norm_quantiles": (np.percentile(norms, [1, 10, 50, 90, 99]) / np.median(norms)).tolist(),
            "query_mean_norm": float(np.linalg.norm(qm)),
            "query_centred_rms": float(np.sqrt(np.mean(np.sum((u - qm) ** 2, axis=1)))),
            "query_mean_cosine": _cosine(qm, mean),
            "query_popularity_cosine": _cosine(qm, e_pop) * float(np.sign(mean @ e_pop) or 1.0),
            "alpha": float(alpha.mean()),
            **score_tail(x, q), **cluster_statistics(x, q, sample=sample, seed=seed)}


def score_tail(items: np.ndarray, queries: np.ndarray, num_queries: int = 200) -> dict:
    """How far a query's top items stand out: medians over (at most ``num_queries``) queries of
    ``(s_100 - s_1000) / sd`` (``score_gap_100_1000``) and ``(s_100 - mean) / sd`` (``score_top100_z``),
    with ``s_r`` the r-th best score and ``sd`` the spread of the query's scores over all items. An ANN
    index with quantised scores needs more re-ranking when the gap is small."""
    x = np.asarray(items, np.float32)
    q = np.asarray(queries, np.float32)[:num_queries]
    r = min(1000, len(x))
    gaps, zs = [], []
    for lo in range(0, len(q), 50):
        scores = q[lo:lo + 50] @ x.T
        top = -np.sort(-np.partition(scores, -r, axis=1)[:, -r:], axis=1)
        sd = scores.std(axis=1)
        gaps.append((top[:, min(99, r - 1)] - top[:, r - 1]) / sd)
        zs.append((top[:, min(99, r - 1)] - scores.mean(axis=1)) / sd)
    return {"score_gap_100_1000": float(np.median(np.concatenate(gaps))),
            "score_top100_z": float(np.median(np.concatenate(zs)))}


@dataclasses.dataclass(frozen=True)
class EmbeddingProfile:
    """Parameters of :func:`embedding_corpus`, in the trained vectors' own units (see :func:`corpus_profile`
    for what each one measures; ``cluster_between`` and ``query_cluster_pull`` are the generator's knobs
    that :func:`fit_profile` sets so the measured cluster statistics match)."""

    tower_dim: int
    item_mean_norm: float
    item_centred_rms: float
    plateau_dims: float
    decay_slope: float
    popularity_axis_share: float
    popularity_r2: float
    mean_popularity_cosine: float
    log_count_mu: float
    log_count_sigma: float
    cluster_between: float
    query_mean_norm: float
    query_centred_rms: float
    query_mean_cosine: float
    query_popularity_cosine: float
    alpha: float
    query_cluster_pull: float


def embedding_corpus(num_items: int, num_queries: int, profile: "EmbeddingProfile | None" = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(items [N, D+1], queries [Q, D+1])`` float32 with ``profile``'s statistics (default
    :data:`TRAINED_PROFILE`), laid out like an export's rows ``[v, log(1 + count)]`` and queries ``[u, alpha]``.

    * Popularity: counts ``max(1, round(exp(N(log_count_mu, log_count_sigma))))``, column ``log(1 + count)``.
    * Tower ``v = mean + a e_pop + centre[c] + noise`` in a random orthonormal basis: ``a`` carries
      ``popularity_axis_share`` of the centred variance and is the standardised popularity column mixed
      with noise so the column's linear R^2 is ``popularity_r2``; centre and noise live on the other
      ``D - 1`` axes with :func:`spectrum_shares` eigenvalues, split ``cluster_between : 1 - cluster_between``
      over ``sqrt(N)`` equally likely clusters; ``mean`` has ``mean_popularity_cosine`` with ``e_pop``.
    * Queries ``u = query mean + centred part``: the mean has the measured cosines with ``mean v`` and
      ``e_pop``; the centred part is ``sqrt(pull)`` times the unit direction of a random cluster's centre
      (users point at what they like) plus ``sqrt(1 - pull)`` Gaussian noise with the items' spectrum (both
      towers are trained into one latent space), scaled to
      ``query_centred_rms``; last column ``alpha``.
    """
    p = profile or TRAINED_PROFILE
    rng = np.random.default_rng(seed)
    d = p.tower_dim
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    e_pop, others = basis[:, 0], basis[:, 1:]
    counts = np.maximum(1.0, np.round(np.exp(rng.normal(p.log_count_mu, p.log_count_sigma, num_items))))
    pop = np.log1p(counts)
    z = (pop - pop.mean()) / max(pop.std(), 1e-12)
    r = math.sqrt(p.popularity_r2)
    a = (r * z + math.sqrt(1.0 - p.popularity_r2) * rng.standard_normal(num_items)) \
        * p.item_centred_rms * math.sqrt(p.popularity_axis_share)
    scale = np.sqrt(spectrum_shares(d - 1, p.plateau_dims, p.decay_slope) * (1.0 - p.popularity_axis_share)) \
        * p.item_centred_rms
    k = max(1, int(round(math.sqrt(num_items))))
    centres = (rng.standard_normal((k, d - 1)) * scale * math.sqrt(p.cluster_between)) @ others.T
    cluster = rng.integers(0, k, num_items)
    c = p.mean_popularity_cosine
    side = others @ rng.standard_normal(d - 1)
    side /= np.linalg.norm(side)
    mean = p.item_mean_norm * (c * e_pop + math.sqrt(1.0 - c * c) * side)
    items = np.empty((num_items, d + 1), np.float32)
    within = scale * math.sqrt(1.0 - p.cluster_between)
    for lo in range(0, num_items, 200_000):   # chunks keep the float64 temporaries small at 10^6 rows
        hi = min(lo + 200_000, num_items)
        noise = (rng.standard_normal((hi - lo, d - 1)) * within) @ others.T
        items[lo:hi, :d] = mean + np.outer(a[lo:hi], e_pop) + centres[cluster[lo:hi]] + noise
    items[:, d] = pop

    # The query mean: the measured cosines with mean v and e_pop, the rest on a third direction.
    m_hat = mean / np.linalg.norm(mean)
    third = others @ rng.standard_normal(d - 1)
    third -= (third @ m_hat) * m_hat + (third @ e_pop) * e_pop
    third /= np.linalg.norm(third)
    q_dir = np.linalg.lstsq(np.stack([m_hat, e_pop]), np.array([p.query_mean_cosine, p.query_popularity_cosine]),
                            rcond=None)[0]
    q_dir = q_dir + math.sqrt(max(0.0, 1.0 - q_dir @ q_dir)) * third
    target = centres[rng.integers(0, k, num_queries)]
    target /= np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    # Queries vary where the items do (both towers are trained into one latent space): the items' spectrum.
    iso = (rng.standard_normal((num_queries, d - 1)) * scale / np.linalg.norm(scale)) @ others.T
    centred = math.sqrt(p.query_cluster_pull) * target + math.sqrt(1.0 - p.query_cluster_pull) * iso
    centred *= p.query_centred_rms / math.sqrt(np.mean(np.sum(centred ** 2, axis=1)))
    queries = np.empty((num_queries, d + 1), np.float32)
    queries[:, :d] = p.query_mean_norm * q_dir + centred
    queries[:, d] = p.alpha
    return items, queries


def _bisect(measure, target: float, lo: float, hi: float, increasing: bool, steps: int) -> float:
    """The ``x`` in ``[lo, hi]`` where the monotone ``measure(x)`` is closest to ``target`` (bisection)."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if (measure(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_profile(items: np.ndarray, queries: np.ndarray, sample: int = 20_000, seed: int = 0,
                steps: int = 7) -> EmbeddingProfile:
    """An :class:`EmbeddingProfile` for ``(items, queries)``: every statistic of :func:`corpus_profile` as
    measured, and the two cluster knobs by bisection on corpora generated at the same size until
    :func:`cluster_statistics` matches (``steps`` halvings each)."""
    m = corpus_profile(items, queries, sample=sample, seed=seed)
    names = [f.name for f in dataclasses.fields(EmbeddingProfile)]
    base = EmbeddingProfile(**{**{k: m[k] for k in names if k in m}, "tower_dim": m["dim"] - 1,
                               "cluster_between": 0.5, "query_cluster_pull": 0.5})

    def measured(profile: EmbeddingProfile, key: str) -> float:
        gen_items, gen_queries = embedding_corpus(len(items), len(queries), profile, seed=seed + 1)
        return cluster_statistics(gen_items, gen_queries, sample=sample, seed=seed)[key]

    between = _bisect(lambda b: measured(dataclasses.replace(base, cluster_between=b), "cluster_within_share"),
                      m["cluster_within_share"], 0.0, 0.99, increasing=False, steps=steps)
    base = dataclasses.replace(base, cluster_between=between)
    pull = _bisect(lambda x: measured(dataclasses.replace(base, query_cluster_pull=x), "query_top_cluster_share"),
                   m["query_top_cluster_share"], 0.0, 1.0, increasing=True, steps=steps)
    return dataclasses.replace(base, query_cluster_pull=pull)


#: :func:`fit_profile` of the trained vectors at 10^6 nominal items (720,136 in the catalogue), 1,000 queries
#: (``default_recipe(1_000_000)``, seed 0; ``benchmarks/bench_scann.py`` prints both profiles side by side).
#: The 10^5 run (87,432 items) measured: item mean norm 1.77, centred rms 0.62, plateau 7 dims then slope 3.0,
#: popularity R^2 0.82, log-count mu/sigma 1.40/0.98, query mean norm 0.55, centred rms 0.87, alpha 0.044.
#: Not matched by the generator at 10^6: ``cluster_within_share`` 0.194 trained vs 0.258 generated (the knob
#: is at its bound 0.98: the trained rows' discrete popularity levels and category structure cluster more
#: than Gaussian clusters can), norm 99th percentile / median 2.04 vs 1.77.
TRAINED_PROFILE = EmbeddingProfile(
    tower_dim=64, item_mean_norm=1.2720, item_centred_rms=0.4944, plateau_dims=7.5, decay_slope=3.0,
    popularity_axis_share=0.00209, popularity_r2=0.6285, mean_popularity_cosine=0.2511, log_count_mu=0.9635,
    log_count_sigma=0.8801, cluster_between=0.9823, query_mean_norm=0.3919, query_centred_rms=0.7866,
    query_mean_cosine=0.6328, query_popularity_cosine=0.1554, alpha=0.02751, query_cluster_pull=0.5859)
