"""The retrieval index over the item vectors: ScaNN (approximate) or none (exact matmul + top_k).

The index is built once over the item vectors ``v_j``; a request's objective weights only rescale its
query (``u * w``, see :mod:`csmf_tf.serving.module`), so one index serves every weighting. It returns
``k_max`` candidate *rows*; the serving graph re-scores them exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
from scann import scann_ops


@dataclasses.dataclass(frozen=True)
class CatalogueDefault:
    """One measured point of :meth:`ScannOptions.for_catalogue`: at ``num_items`` items the cheapest
    configuration with recall@100 >= 0.99 had ``leaf_multiplier * sqrt(N)`` leaves (``spherical`` or plain
    k-means centres), searched ``leaf_fraction`` of them and re-ranked ``reorder`` candidates (for 100
    retrieved)."""

    num_items: int
    leaf_multiplier: float
    leaf_fraction: float
    reorder: int
    spherical: bool


#: Up to this many items every leaf is searched (see :class:`ScannOptions`).
FULL_SEARCH_MAX_ITEMS = 20_000

#: The measured points (``benchmarks/bench_scann.py``, ``docs/results/serving/bench_scann.json``), by size.
CATALOGUE_DEFAULTS = (CatalogueDefault(87_432, 1.0, 0.2, 500, False),
                      CatalogueDefault(720_136, 1.0, 0.2, 2000, False))


@dataclasses.dataclass(frozen=True)
class ScannOptions:
    """ScaNN index parameters; ``None`` takes :meth:`for_catalogue`'s value for the corpus size.

    ``num_leaves ~ sqrt(N)``; search a fraction of them; score with anisotropic hashing; re-rank
    ``num_reordering_candidates`` hits with exact float dot products. Above 20k items the defaults are
    the cheapest settings (fewest vectors scored) that reached recall@100 >= 0.99 against exact search in
    ``benchmarks/bench_scann.py`` on *trained* item vectors: CSMF's stage 1 (exposure tower) trained on
    the synthetic cascade through the streaming path, rows ``[v, log(1 + count)]`` and queries
    ``[u, alpha]`` exactly as an export with the popularity prior indexes and asks them
    (``docs/results/serving/bench_scann.json``, 500 queries; 2 cores at load 2-4):

    ============  ===========  ===============  ==========  =========  ====================================
    items         leaves       leaves searched  re-ranked   centres    measured (single p50 / exact)
    ============  ===========  ===============  ==========  =========  ====================================
    <= 20k        sqrt(N)      all              max(10 k,   spherical  (not measured here)
                                                1000)
    87,432        sqrt(N)      20 %             500         plain      recall 0.991, 0.93 / 3.7 ms
    720,136       sqrt(N)      20 %             2000        plain      recall 0.991, 0.97 / 14.5 ms
    ============  ===========  ===============  ==========  =========  ====================================

    Between and beyond the measured sizes see :meth:`for_catalogue`. Up to 20k items every leaf is
    searched: a partial search saves next to nothing at that size (the previous rule, kept). Plain
    (non-spherical) k-means centres above 20k: with the popularity column the trained rows are far from
    unit length and their norm carries the popularity, so spherical centres send queries to the wrong
    leaves (recall@100 0.011 at 10 % of the leaves at 720k items, 0.18 at 40 %, where plain centres give
    0.957 and 0.996). The previous size table (spherical; 10 % of the leaves and 1,000 re-ranked up to
    250k items, 40 % and 4,000 above) came from tightly clustered demo vectors; on the trained vectors it
    gives recall@100 0.003 at 87k items and about 0.18 at 720k (0.979 at 87k with plain centres).
    The right setting depends on the embeddings: every export measures its own recall against exact
    search and refuses a version below its floor (:mod:`csmf_tf.serving.recall`).
    """

    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    leaves_to_search_fraction: float | None = None
    dimensions_per_block: int = 2
    num_reordering_candidates: int | None = None
    training_iterations: int = 12
    training_sample_size: int | None = None
    spherical: bool | None = None
    anisotropic_quantization_threshold: float = 0.2
    parallelize_batch_searches: bool = True

    @classmethod
    def for_catalogue(cls, num_items: int, num_candidates: int = 100) -> "ScannOptions":
        """The default index for ``num_items`` items from which ``num_candidates`` are retrieved.

        Up to :data:`FULL_SEARCH_MAX_ITEMS`: ``sqrt(N)`` leaves, all searched, ``max(10 k, 1000)``
        re-ranked. Above: the measured points :data:`CATALOGUE_DEFAULTS`; at a measured size its
        configuration, below the smallest the smallest's, above the largest the largest's, and between two
        the more demanding of the two in every knob (more leaves, a larger fraction, more re-ranked), so
        the rule never asks for less than a measured size on either side needed. Re-ranked candidates
        scale with ``num_candidates`` above 100 (they were measured for 100).
        """
        if num_items < 1:
            raise ValueError(f"the ScaNN index needs at least one item, got num_items={num_items}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if num_items <= FULL_SEARCH_MAX_ITEMS:
            return cls(num_leaves=max(1, int(round(math.sqrt(num_items)))), leaves_to_search_fraction=1.0,
                       num_reordering_candidates=max(10 * num_candidates, 1000), spherical=True)
        below = [d for d in CATALOGUE_DEFAULTS if d.num_items <= num_items] or [CATALOGUE_DEFAULTS[0]]
        above = [d for d in CATALOGUE_DEFAULTS if d.num_items >= num_items] or [CATALOGUE_DEFAULTS[-1]]
        lo, hi = below[-1], above[0]
        multiplier = max(lo.leaf_multiplier, hi.leaf_multiplier)
        reorder = max(lo.reorder, hi.reorder)
        return cls(num_leaves=min(num_items, max(1, int(round(multiplier * math.sqrt(num_items))))),
                   leaves_to_search_fraction=max(lo.leaf_fraction, hi.leaf_fraction),
                   num_reordering_candidates=max(reorder, int(math.ceil(reorder * num_candidates / 100))),
                   spherical=hi.spherical)

    def resolve(self, num_items: int, num_candidates: int) -> dict[str, Any]:
        """Concrete parameters for a corpus of ``num_items`` from which ``num_candidates`` are retrieved."""
        if num_items < 1:
            raise ValueError("the ScaNN index needs at least one item")
        default = None
        if None in (self.num_leaves, self.num_reordering_candidates, self.spherical) or (
                self.num_leaves_to_search is None and self.leaves_to_search_fraction is None):
            default = ScannOptions.for_catalogue(num_items, num_candidates)
        # ScaNN refuses more leaves than points; sqrt(N) keeps leaves ~ as large as their number.
        leaves = self.num_leaves if self.num_leaves is not None else default.num_leaves
        if not 1 <= leaves <= num_items:
            raise ValueError(f"num_leaves must be in [1, {num_items}] (corpus size), got {leaves}")
        if self.num_leaves_to_search is not None:
            search = self.num_leaves_to_search
        else:
            fraction = self.leaves_to_search_fraction
            if fraction is None:
                fraction = default.leaves_to_search_fraction
            search = min(leaves, max(1, int(math.ceil(leaves * fraction))))
        if not 1 <= search <= leaves:
            raise ValueError(f"num_leaves_to_search must be in [1, num_leaves={leaves}], got {search}")
        reorder = self.num_reordering_candidates
        if reorder is None:
            reorder = default.num_reordering_candidates
        reorder = int(min(max(reorder, num_candidates), num_items))
        if self.dimensions_per_block < 1:
            raise ValueError("dimensions_per_block must be >= 1")
        sample = self.training_sample_size if self.training_sample_size is not None else min(num_items, 250_000)
        return {"num_leaves": int(leaves), "num_leaves_to_search": int(search),
                "dimensions_per_block": int(self.dimensions_per_block),
                "num_reordering_candidates": reorder,
                "training_iterations": int(self.training_iterations),
                "training_sample_size": int(sample),
                "spherical": bool(self.spherical if self.spherical is not None else default.spherical),
                "anisotropic_quantization_threshold": float(self.anisotropic_quantization_threshold),
                "parallelize_batch_searches": bool(self.parallelize_batch_searches)}


class ScaNNIndex(tfrs.layers.factorized_top_k.ScaNN):
    """``tfrs.layers.factorized_top_k.ScaNN`` with the partitioning knobs the TFRS layer does not expose.

    TFRS builds its searcher with ``tree(num_leaves, num_leaves_to_search, training_iterations)`` and
    ``score_ah(dimensions_per_block)``; inner-product search on real embeddings needs spherical
    partitioning, a training sample of the whole corpus and the anisotropic threshold (ScaNN's README
    configuration). Indexing, calling and serialisation are the TFRS layer's own.
    """

    def __init__(self, k: int, num_leaves: int, num_leaves_to_search: int, dimensions_per_block: int,
                 num_reordering_candidates: int | None, training_iterations: int, training_sample_size: int,
                 spherical: bool, anisotropic_quantization_threshold: float,
                 parallelize_batch_searches: bool = True, name: str | None = None) -> None:
        super().__init__(k=k, distance_measure="dot_product", num_leaves=num_leaves,
                         num_leaves_to_search=num_leaves_to_search, training_iterations=training_iterations,
                         dimensions_per_block=dimensions_per_block,
                         num_reordering_candidates=num_reordering_candidates,
                         parallelize_batch_searches=parallelize_batch_searches, name=name)

        def build_searcher(candidates: tf.Tensor):  # noqa: ANN202 - a ScannSearcher
            builder = scann_ops.builder(db=candidates, num_neighbors=k, distance_measure="dot_product")
            builder = builder.tree(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                                   training_sample_size=training_sample_size,
                                   training_iterations=training_iterations, spherical=spherical)
            builder = builder.score_ah(dimensions_per_block,
                                       anisotropic_quantization_threshold=anisotropic_quantization_threshold)
            if num_reordering_candidates is not None:
                builder = builder.reorder(num_reordering_candidates)
            # A unique shared name: two versions loaded in one process must not share a searcher.
            return builder.build(shared_name=f"{self.name}/{uuid.uuid4()}")

        self._build_searcher = build_searcher


def build_index(item_vectors: np.ndarray, num_candidates: int, use_scann: bool,
                options: ScannOptions | None = None) -> tuple[ScaNNIndex | None, dict[str, Any]]:
    """``(index, its description for config.json)``; the index is ``None`` for exact search.

    ``num_candidates`` (the export's ``k_max``) is how many rows one search returns.
    """
    if not use_scann:
        return None, {"type": "brute_force"}
    params = (options or ScannOptions()).resolve(len(item_vectors), num_candidates)
    t0 = time.perf_counter()
    index = ScaNNIndex(k=num_candidates, name="scann_index", **params)
    # Index the row numbers implicitly (identifiers=None): the layer then returns row indices,
    # which gather exact vectors for re-scoring and the per-objective scores.
    index.index(tf.constant(item_vectors))
    return index, {"type": "scann", "distance_measure": "dot_product", **params,
                   "build_seconds": round(time.perf_counter() - t0, 3)}
