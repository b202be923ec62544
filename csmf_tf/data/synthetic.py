"""A synthetic exposure -> click -> conversion cascade with known latent structure.

Generative model (all draws from one ``numpy`` generator tree seeded by ``seed``, so the same arguments
give a bit-identical table):

1. **Factors.** User factors ``P [U, d]`` and item factors ``Q [I, d]``, i.i.d. normal with standard
   deviation ``d ** -0.25`` per entry, so that ``<p_u, q_i>`` has unit variance whatever ``d`` is.
2. **Popularity.** Zipf-like: item ``i`` gets rank ``r_i`` (a random permutation) and
   ``log pop_i = -zipf_exponent * log(r_i)``.
3. **Exposure.** User ``u`` gets ``n_u`` exposures (log-normal activity, rescaled so that
   ``sum_u n_u == num_exposures`` exactly, ``1 <= n_u <= max_exposure_fraction * I``). The exposed set is a
   sample *without replacement* from ``softmax_i(log pop_i + relevance * <p_u, q_i>)``, drawn with the
   Gumbel-top-k trick: ``top_{n_u}(logit_ui + G_ui)`` with ``G`` standard Gumbel. No (user, item) pair
   appears twice.
4. **Later stages.** Stage ``t >= 1`` (click, conversion, ...) happens only on rows positive for stage
   ``t-1``: ``P(y_t=1 | y_{t-1}=1) = sigmoid(b_t + strength_t * <p^t_u, q^t_i>)`` with *partly different*
   factors ``p^t = rho_t p^{t-1} + sqrt(1 - rho_t^2) e_u`` (``e_u`` an independent draw, same for items),
   starting from ``p^0 = P``. The bias ``b_t`` is set by bisection so that the expected fraction of
   *exposures* positive for stage ``t`` equals ``rates[t-1]``; the realised rate is within sampling noise.
   The conversion logit also falls with the item's (standardised log) price.
5. **Side features**, correlated with the factors: ``user_segment`` (categorical ``"seg<k>"``,
   ``k = argmax`` of the first ``num_user_segments`` user-factor coordinates), ``user_activity`` (numeric,
   ``log1p`` of the user's exposure count plus noise), ``item_category`` (``"cat<k>"``, argmax of the first
   ``num_item_categories`` item-factor coordinates) and ``item_price`` (numeric, log-normal, its log
   driven by the item factor's last coordinate).
6. **Timestamps**: uniform over ``time_span_days`` from ``start_time``; the table is sorted by time
   (stable), so a global time split is possible.

Work is vectorised and chunked over users (a fixed number of ``users x items`` logits per chunk, each chunk
with its own child generator; the chunking depends only on the sizes, so results do not depend on the
machine). Time is dominated by the ``O(U * I * d)`` exposure logits and their Gumbel noise, memory by the
output rows. :func:`write_cascade_tfrecord` writes a generated table to TFRecord shards chunk by chunk
without materialising it (only the generator's integer columns are whole). Measured on a shared 2-core machine: default dataset (3k x 2k, 150k rows) < 1 s;
20k users x 5k items, 1e6 rows: ~5 s; 100k users x 10k items, 1e7 rows: ~47 s and ~1.1 GB peak RSS.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from csmf_tf.data.files import _WRITE_CHUNK_ROWS, PositiveShardWriter, _encode_rows, _write_schema, shard_paths
from csmf_tf.data.table import CATEGORICAL, DEFAULT_OBJECTIVES, NUMERIC, InteractionTable

# Logits per chunk (users x items): bounds memory at ~ 8 bytes x this x a few temporaries.
_CHUNK_ELEMENTS = 4_000_000


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """Knobs of :func:`generate_cascade` beyond the sizes (see the module docstring for the maths).

    ``rates[t-1]``: target fraction of exposures positive for stage ``t`` (one per stage after the first);
    ``rho[t-1]``: correlation of stage ``t``'s preference factors with stage ``t-1``'s;
    ``strength[t-1]``: scale of the affinity in stage ``t``'s logit.
    """

    zipf_exponent: float = 1.0
    relevance: float = 3.0
    activity_sigma: float = 0.6
    max_exposure_fraction: float = 0.5
    rates: tuple[float, ...] = (0.10, 0.02)
    rho: tuple[float, ...] = (0.6, 0.6)
    strength: tuple[float, ...] = (2.0, 2.0)
    price_effect: float = 0.5
    num_user_segments: int = 8
    num_item_categories: int = 12
    start_time: int = 1_700_000_000
    time_span_days: float = 30.0


def _chunk_users(num_users: int, num_items: int) -> list[tuple[int, int]]:
    # The chunking depends only on the sizes, never on the machine, so results are reproducible.
    step = max(1, _CHUNK_ELEMENTS // max(num_items, 1))
    return [(a, min(a + step, num_users)) for a in range(0, num_users, step)]


def _exposure_counts(rng: np.random.Generator, num_users: int, num_items: int, num_exposures: int,
                     cfg: CascadeConfig) -> np.ndarray:
    """``n_u`` with ``sum == num_exposures`` and ``1 <= n_u <= cap`` (largest-remainder rounding)."""
    cap = max(1, int(cfg.max_exposure_fraction * num_items))
    if num_exposures < num_users or num_exposures > cap * num_users:
        raise ValueError(f"num_exposures={num_exposures} must lie in [num_users={num_users}, "
                         f"num_users * {cap}] (each user gets 1..{cap} = max_exposure_fraction * num_items)")
    weights = rng.lognormal(0.0, cfg.activity_sigma, size=num_users)
    counts = np.ones(num_users, dtype=np.int64)
    remaining = num_exposures - num_users
    # Water-filling: distribute the remainder proportionally to the weights, respecting the cap.
    while remaining > 0:
        free = counts < cap
        share = weights * free
        ideal = remaining * share / share.sum()
        add = np.minimum(np.floor(ideal).astype(np.int64), cap - counts)
        if add.sum() == 0:
            # Fewer units left than users with room: give one each to the largest remainders.
            order = np.argsort(-(ideal - np.floor(ideal)) - free * 1e-9, kind="stable")
            order = order[free[order]][:remaining]
            add = np.zeros_like(counts)
            add[order] = 1
        counts += add
        remaining -= int(add.sum())
    return counts


def _gumbel_top_k(rng: np.random.Generator, logits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``r``, ``counts[r]`` distinct columns sampled without replacement from ``softmax(logits[r])``.

    Returns ``(rows, cols)`` flat index arrays. Gumbel-top-k: the top ``k`` of ``logits + Gumbel`` are a
    sample without replacement of size ``k`` (Kool et al., 2019). ``logits`` (float32) is overwritten.
    """
    # Float32 Gumbel noise -log(-log U), added in place: ~4x cheaper than rng.gumbel (float64).
    # U == 0 gives -inf (never picked); U < 1 always in float32, so no NaN.
    noise = rng.random(size=logits.shape, dtype=np.float32)
    with np.errstate(divide="ignore"):
        np.log(noise, out=noise)
        np.negative(noise, out=noise)
        np.log(noise, out=noise)
    scores = np.subtract(logits, noise, out=logits)
    k_max = int(counts.max())
    n_cols = scores.shape[1]
    if k_max < n_cols:
        top = np.argpartition(scores, n_cols - k_max, axis=1)[:, n_cols - k_max:]
    else:
        top = np.broadcast_to(np.arange(n_cols), scores.shape).copy()
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    keep = np.arange(top.shape[1])[None, :] < counts[:, None]
    rows = np.broadcast_to(np.arange(top.shape[0])[:, None], top.shape)[keep]
    return rows, top[keep]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_bias(logits: np.ndarray, parent_mask: np.ndarray, target_count: float) -> float:
    """Bias ``b`` with ``sum_{parent rows} sigmoid(b + logits) == target_count`` (bisection)."""
    z = logits[parent_mask].astype(np.float64)
    if target_count >= len(z):
        raise ValueError(f"target rate needs {target_count:.0f} positives but the parent stage has only "
                         f"{len(z)}: rates must decrease along the cascade")
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + z).sum() > target_count:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def _mix(rng: np.random.Generator, base: np.ndarray, rho: float, scale: float) -> np.ndarray:
    """``rho * base + sqrt(1 - rho^2) * fresh``: same per-entry scale, correlation ``rho`` with ``base``."""
    fresh = rng.normal(0.0, scale, base.shape)
    return (rho * base + math.sqrt(max(0.0, 1.0 - rho * rho)) * fresh).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CascadeTruth:
    """The latent ground truth behind a generated table (for oracle baselines and diagnostics).

    User ``u`` has id ``f"u{u}"``, item ``i`` has id ``f"i{i}"``. ``user_factors[t]`` ``[U, d]`` and
    ``item_factors[t]`` ``[I, d]`` are stage ``t``'s preference factors (``t = 0``: exposure);
    ``biases[t-1]`` and ``stage_offsets[t-1]`` ``[I]`` (the price term, zero except the last stage of
    three or more) complete stage ``t``'s logit.
    """

    log_pop: np.ndarray
    relevance: float
    user_factors: tuple[np.ndarray, ...]
    item_factors: tuple[np.ndarray, ...]
    strength: tuple[float, ...]
    biases: tuple[float, ...]
    stage_offsets: tuple[np.ndarray, ...]

    def oracle_scores(self, objective_index: int, users: np.ndarray) -> np.ndarray:
        """``[len(users), I]`` log-scores ranking items for objective ``t`` by the generative model.

        ``log pop_i + relevance <p_u, q_i> + sum_{s=1..t} log sigmoid(b_s + strength_s <p^s_u, q^s_i> + o^s_i)``:
        the exposure softmax logit plus the log-probabilities of passing every later stage up to ``t``.
        """
        users = np.asarray(users)
        out = self.log_pop[None, :] + self.relevance * (self.user_factors[0][users] @ self.item_factors[0].T)
        for s in range(1, objective_index + 1):
            z = (self.biases[s - 1] + self.strength[s - 1]
                 * (self.user_factors[s][users] @ self.item_factors[s].T) + self.stage_offsets[s - 1][None, :])
            out = out - np.logaddexp(0.0, -z)
        return out


def generate_cascade(num_users: int, num_items: int, num_exposures: int, seed: int = 0,
                     objectives: Sequence[str] = DEFAULT_OBJECTIVES, latent_dim: int = 16,
                     config: CascadeConfig | None = None) -> InteractionTable:
    """Generate a synthetic cascade table (see the module docstring for the generative model).

    Args:
      num_users, num_items: entity counts; ids are ``"u<k>"`` and ``"i<k>"``.
      num_exposures: exact number of rows (every row is an exposure).
      seed: the only source of randomness; the same arguments give a bit-identical table.
      objectives: stage names in cascade order (first = exposure); ``len(objectives) - 1`` must equal
        ``len(config.rates)``.
      latent_dim: dimension ``d`` of the latent factors.
      config: a :class:`CascadeConfig` (defaults: click ~10 %, conversion ~2 % of exposures).

    Returns:
      An :class:`InteractionTable` of ``num_exposures`` rows sorted by timestamp, labels ``[n, S]`` int8
      satisfying the cascade, user features ``user_segment`` (categorical), ``user_activity`` (numeric),
      item features ``item_category`` (categorical), ``item_price`` (numeric).
    """
    return generate_cascade_with_truth(num_users, num_items, num_exposures, seed=seed, objectives=objectives,
                                       latent_dim=latent_dim, config=config)[0]


def generate_cascade_with_truth(num_users: int, num_items: int, num_exposures: int, seed: int = 0,
                                objectives: Sequence[str] = DEFAULT_OBJECTIVES, latent_dim: int = 16,
                                config: CascadeConfig | None = None) -> tuple[InteractionTable, CascadeTruth]:
    """:func:`generate_cascade` plus the :class:`CascadeTruth` it was drawn from (same table)."""
    compact = _generate_compact(num_users, num_items, num_exposures, seed, objectives, latent_dim, config)
    return compact.rows(0, compact.num_rows), compact.truth


@dataclasses.dataclass(frozen=True)
class _CompactCascade:
    """A generated cascade as integer row columns plus per-entity features (~27 bytes per row).

    Rows are already in time order. :meth:`rows` materialises any slice as an :class:`InteractionTable`
    (string ids, per-row features), so a writer can emit the table chunk by chunk while the per-row
    string and feature columns of the whole table never exist at once.
    """

    user_index: np.ndarray      # [n] int64, row -> user
    item_index: np.ndarray      # [n] int64, row -> item
    labels: np.ndarray          # [n, S] int8
    timestamp: np.ndarray       # [n] int64
    objectives: tuple[str, ...]
    user_vocab: np.ndarray      # [U] str ids
    item_vocab: np.ndarray      # [I] str ids
    user_features: dict         # {name: [U]}
    item_features: dict         # {name: [I]}
    feature_kinds: dict
    truth: CascadeTruth

    @property
    def num_rows(self) -> int:
        return len(self.user_index)

    def rows(self, start: int, stop: int) -> InteractionTable:
        """Rows ``start:stop`` as a table (the same values :func:`generate_cascade` puts there)."""
        u, i = self.user_index[start:stop], self.item_index[start:stop]
        return InteractionTable(
            user_id=self.user_vocab[u], item_id=self.item_vocab[i], labels=self.labels[start:stop],
            objectives=self.objectives, timestamp=self.timestamp[start:stop],
            user_features={k: v[u] for k, v in self.user_features.items()},
            item_features={k: v[i] for k, v in self.item_features.items()},
            feature_kinds=dict(self.feature_kinds))


def _generate_compact(num_users: int, num_items: int, num_exposures: int, seed: int = 0,
                      objectives: Sequence[str] = DEFAULT_OBJECTIVES, latent_dim: int = 16,
                      config: CascadeConfig | None = None) -> _CompactCascade:
    """The generator proper (module docstring); see :func:`generate_cascade` for the arguments."""
    cfg = config or CascadeConfig()
    objectives = tuple(objectives)
    n_later = len(objectives) - 1
    if n_later < 0 or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must be distinct names, at least one; got {objectives}")
    for name in ("rates", "rho", "strength"):
        if len(getattr(cfg, name)) < n_later:
            raise ValueError(f"config.{name} has {len(getattr(cfg, name))} entries but objectives "
                             f"{objectives} need {n_later} (one per stage after the first)")
    if num_users < 1 or num_items < 2 or latent_dim < 1:
        raise ValueError(f"need num_users >= 1, num_items >= 2, latent_dim >= 1; got {num_users}, "
                         f"{num_items}, {latent_dim}")

    root = np.random.SeedSequence(seed)
    s_factors, s_counts, s_stage, s_time, s_feat, s_chunks = root.spawn(6)
    rng = np.random.default_rng(s_factors)
    scale = latent_dim ** -0.25  # entries of this scale give Var<p, q> = 1
    user_f = rng.normal(0.0, scale, (num_users, latent_dim)).astype(np.float32)
    item_f = rng.normal(0.0, scale, (num_items, latent_dim)).astype(np.float32)
    ranks = rng.permutation(num_items) + 1
    log_pop = (-cfg.zipf_exponent * np.log(ranks)).astype(np.float32)

    counts = _exposure_counts(np.random.default_rng(s_counts), num_users, num_items, num_exposures, cfg)

    # Exposure: chunked Gumbel-top-k over softmax(log pop + relevance * <p_u, q_i>).
    chunks = _chunk_users(num_users, num_items)
    chunk_seeds = s_chunks.spawn(len(chunks))
    scaled_items = np.ascontiguousarray((cfg.relevance * item_f).T)
    users_parts, items_parts = [], []
    for (a, b), cs in zip(chunks, chunk_seeds):
        logits = user_f[a:b] @ scaled_items
        logits += log_pop[None, :]
        rows, cols = _gumbel_top_k(np.random.default_rng(cs), logits, counts[a:b])
        users_parts.append(rows.astype(np.int64) + a)
        items_parts.append(cols.astype(np.int64))
    u_idx = np.concatenate(users_parts)
    i_idx = np.concatenate(items_parts)
    n = len(u_idx)

    # Item price: log-price follows the last factor coordinate, so price is learnable from features.
    feat_rng = np.random.default_rng(s_feat)
    log_price = (3.0 + 0.8 * item_f[:, -1] / scale + 0.3 * feat_rng.normal(size=num_items)).astype(np.float32)
    price_z = (log_price - log_price.mean()) / (log_price.std() + 1e-9)

    # Later stages: partly different factors per stage, bias calibrated to the target rate.
    stage_rng = np.random.default_rng(s_stage)
    labels = np.zeros((n, len(objectives)), dtype=np.int8)
    labels[:, 0] = 1
    pu, qi = user_f, item_f
    us, its, biases, offsets = [user_f], [item_f], [], []
    for t in range(1, len(objectives)):
        pu, qi = _mix(stage_rng, pu, cfg.rho[t - 1], scale), _mix(stage_rng, qi, cfg.rho[t - 1], scale)
        affinity = np.empty(n, dtype=np.float32)
        for a in range(0, n, 1_000_000):
            sl = slice(a, a + 1_000_000)
            affinity[sl] = np.einsum("nd,nd->n", pu[u_idx[sl]], qi[i_idx[sl]])
        z = cfg.strength[t - 1] * affinity  # <p, q> has unit variance by the choice of scale
        offset = np.zeros(num_items, dtype=np.float32)
        if t == len(objectives) - 1 and t >= 2:
            offset = (-cfg.price_effect * price_z).astype(np.float32)
            z = z + offset[i_idx]
        parent = labels[:, t - 1] == 1
        bias = _calibrate_bias(z, parent, cfg.rates[t - 1] * n)
        us.append(pu)
        its.append(qi)
        biases.append(bias)
        offsets.append(offset)
        draw = stage_rng.random(n) < _sigmoid(bias + z)
        labels[:, t] = (parent & draw).astype(np.int8)

    # Timestamps, then sort everything by time (stable: ties keep generation order).
    ts = (cfg.start_time + np.floor(np.random.default_rng(s_time).random(n)
                                    * cfg.time_span_days * 86400.0)).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    u_idx, i_idx, labels, ts = u_idx[order], i_idx[order], labels[order], ts[order]

    seg = np.argmax(user_f[:, :min(cfg.num_user_segments, latent_dim)], axis=1)
    cat = np.argmax(item_f[:, :min(cfg.num_item_categories, latent_dim)], axis=1)
    activity = (np.log1p(counts) + 0.1 * feat_rng.normal(size=num_users)).astype(np.float32)
    user_vocab = np.array([f"u{k}" for k in range(num_users)], dtype=object)
    item_vocab = np.array([f"i{k}" for k in range(num_items)], dtype=object)
    seg_vocab = np.array([f"seg{k}" for k in range(latent_dim)], dtype=object)
    cat_vocab = np.array([f"cat{k}" for k in range(latent_dim)], dtype=object)
    truth = CascadeTruth(log_pop=log_pop, relevance=cfg.relevance, user_factors=tuple(us),
                         item_factors=tuple(its), strength=tuple(cfg.strength[:n_later]),
                         biases=tuple(biases), stage_offsets=tuple(offsets))
    return _CompactCascade(
        user_index=u_idx, item_index=i_idx, labels=labels, timestamp=ts, objectives=objectives,
        user_vocab=user_vocab, item_vocab=item_vocab,
        user_features={"user_segment": seg_vocab[seg], "user_activity": activity},
        item_features={"item_category": cat_vocab[cat], "item_price": np.exp(log_price).astype(np.float32)},
        feature_kinds={"user_segment": CATEGORICAL, "user_activity": NUMERIC,
                       "item_category": CATEGORICAL, "item_price": NUMERIC},
        truth=truth)


#: Sizes of :func:`default_dataset`: 2,000 users x 1,500 items, 100,000 exposures (50 per user on average).
#: Chosen so that the main job (about 2 minutes) and the full synthetic report (about an hour) fit on 2
#: cores; until 2026-12-02 it was 3,000 x 2,000 x 150,000 (the archived synthetic report).
DEFAULT_NUM_USERS = 2_000
DEFAULT_NUM_ITEMS = 1_500
DEFAULT_NUM_EXPOSURES = 100_000


def default_dataset(seed: int = 0) -> InteractionTable:
    """The project's default synthetic dataset: 2,000 users, 1,500 items, exactly 100,000 exposures.

    Default :class:`CascadeConfig` (click ~10 %, conversion ~2 % of exposures, relevance 3.0) and
    ``latent_dim=16``. For ``seed=0``: 100,000 exposures, 10,027 clicks (10.03 %), 1,979 conversions
    (1.98 %); exposures per user min 5 / median 41 / max 454. The relevance term is strong enough that
    personalised retrieval beats popularity: on the default time split the exposure-only two-tower of
    the main job reached test exposure Recall@50 = 0.59 against 0.23 for popularity at the former size
    (measured with ``relevance=3.0``; at 2.5 the ratio was only about 2.0). Click and conversion follow partly different
    factors, so the objectives really differ.
    """
    return generate_cascade(DEFAULT_NUM_USERS, DEFAULT_NUM_ITEMS, DEFAULT_NUM_EXPOSURES, seed=seed)


HOLDOUT_SUFFIX = "_holdout"


@dataclasses.dataclass(frozen=True)
class CascadeFiles:
    """What :func:`write_cascade_tfrecord` wrote.

    ``paths``: the training shards; ``holdout_path``: the holdout file (``None`` without holdout);
    ``rows`` / ``holdout_rows``: rows in each; ``positives`` / ``holdout_positives``: positives per
    objective in each; ``num_users`` / ``num_items``: distinct users / items over all rows;
    ``positives_manifest``: the manifest of the shards' positive shards (``None`` when none were written).
    """

    paths: list[Path]
    holdout_path: Path | None
    rows: int
    holdout_rows: int
    positives: dict[str, int]
    holdout_positives: dict[str, int]
    num_users: int
    num_items: int
    positives_manifest: Path | None = None


def write_cascade_tfrecord(path: str | os.PathLike, num_users: int, num_items: int, num_exposures: int,
                           num_shards: int = 1, seed: int = 0, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                           latent_dim: int = 16, config: CascadeConfig | None = None,
                           holdout_users: float = 0.0, holdout_time: float = 0.2,
                           positive_objectives: Sequence[str] | None = None) -> CascadeFiles:
    """Generate a cascade and write it as sharded TFRecords chunk by chunk, never as a whole table.

    The rows are exactly those of :func:`generate_cascade` with the same arguments (``read_tfrecord``
    of the shards, plus the holdout, gives the same table); the files match :func:`write_tfrecord`'s.
    Memory: the generator's integer columns (~27 bytes per row, ~0.3 GB at 10^7 rows) plus one chunk of
    ``_WRITE_CHUNK_ROWS`` rows; the string and feature columns of the whole table (several GB as Python
    objects at 10^7) are never built.

    Holdout (for streaming training, whose evaluation sets must fit in memory): with ``holdout_users >
    0``, a seeded sample of that fraction of the users is drawn, and their rows in the last
    ``holdout_time`` of the time range (timestamp at or after that quantile) go to
    ``<stem>_holdout.tfrecord`` (+ its schema) instead of the shards. So the holdout is small, its users
    are known from training, and the training history of its users (to exclude from their rankings) is
    a small part of the shards. Shards keep the global row numbers (``row``), so shard ``k`` holds the
    non-holdout rows ``r`` with ``r % num_shards == k``.

    Positive shards (for streaming later stages, :class:`~csmf_tf.data.files.PositiveShardWriter`): each
    shard's positives of ``positive_objectives`` (``None``: every objective but the first; ``()``: none)
    are also written to ``<stem>.positives/``, with the manifest ``<stem>.positives.json``.
    """
    import tensorflow as tf

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    if not (0.0 <= holdout_users <= 1.0 and 0.0 < holdout_time < 1.0):
        raise ValueError(f"need 0 <= holdout_users <= 1 and 0 < holdout_time < 1; got {holdout_users}, "
                         f"{holdout_time}")
    compact = _generate_compact(num_users, num_items, num_exposures, seed, objectives, latent_dim, config)
    n = compact.num_rows
    # Its own generator (a child of the seed), so the holdout never changes the generated rows.
    eval_user = np.random.default_rng([seed, 0x401D]).random(num_users) < holdout_users
    cutoff = compact.timestamp[min(n - 1, int(math.ceil((1.0 - holdout_time) * n)))]
    paths = shard_paths(path, num_shards)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    holdout_path = None
    if holdout_users > 0:
        stem = Path(path).name.removesuffix(".tfrecord")
        holdout_path = paths[0].with_name(stem + HOLDOUT_SUFFIX + ".tfrecord")
    positive_shards = PositiveShardWriter(paths, compact.objectives, positive_objectives)
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    holdout_writer = tf.io.TFRecordWriter(str(holdout_path)) if holdout_path else None
    num_objectives = len(compact.objectives)
    positives, holdout_positives = np.zeros(num_objectives, np.int64), np.zeros(num_objectives, np.int64)
    holdout_rows = 0
    complete = False
    try:
        for a in range(0, n, _WRITE_CHUNK_ROWS):
            b = min(a + _WRITE_CHUNK_ROWS, n)
            records = _encode_rows(compact.rows(a, b), a)
            held = eval_user[compact.user_index[a:b]] & (compact.timestamp[a:b] >= cutoff)
            for k, record in enumerate(records):
                if held[k]:
                    holdout_writer.write(record)
                else:
                    writers[(a + k) % num_shards].write(record)
            labels = compact.labels[a:b].astype(np.int64)
            kept = np.flatnonzero(~held)
            positive_shards.add([records[k] for k in kept], (a + kept) % num_shards, labels[kept])
            holdout_positives += labels[held].sum(axis=0)
            positives += labels[~held].sum(axis=0)
            holdout_rows += int(held.sum())
        complete = True
    finally:
        for w in writers + ([holdout_writer] if holdout_writer else []):
            w.close()
        manifest = positive_shards.close(complete)
    schema_table = compact.rows(0, 0)
    _write_schema(schema_table, paths[0])
    if holdout_path is not None:
        _write_schema(schema_table, holdout_path)
    names = compact.objectives
    return CascadeFiles(
        paths=paths, holdout_path=holdout_path, rows=n - holdout_rows, holdout_rows=holdout_rows,
        positives={o: int(c) for o, c in zip(names, positives)},
        holdout_positives={o: int(c) for o, c in zip(names, holdout_positives)},
        num_users=int(np.count_nonzero(np.bincount(compact.user_index, minlength=num_users))),
        num_items=int(np.count_nonzero(np.bincount(compact.item_index, minlength=num_items))),
        positives_manifest=manifest)
