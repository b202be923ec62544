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
class ScannOptions:
    """ScaNN index parameters; ``None`` picks a size-based default.

    ``num_leaves ~ sqrt(N)``; search a fraction of them; score with anisotropic hashing; re-rank
    ``num_reordering_candidates`` hits with exact float dot products. Above 20k items the size-based
    defaults are the cheapest settings that reached recall@100 >= 0.99 against exact search in
    ``benchmarks/bench_scann.py`` (clustered 64-d embeddings, fused queries):

    ============  ===================  ============================
    items         leaves searched      candidates re-ranked
    ============  ===================  ============================
    <= 20k        all                  max(10 k_max, 1000)
    <= 250k       10 %                 max(10 k_max, 1000)
    > 250k        40 %                 max(40 k_max, 1000)
    ============  ===================  ============================

    Up to 20k items every leaf is searched: a partial search saves next to nothing at that size, and
    trained models are less clustered than the benchmark's corpus (30 % of the leaves, the previous
    default, gave the main job's trained 2,000-item model recall@10 = 0.372 on 500 of its users and the
    README quick start's 300-item model 0.89). They depend on how clustered the embeddings are: every
    export measures its own recall against exact search and refuses a version below its floor
    (:mod:`csmf_tf.serving.recall`). ``spherical`` partitioning (unit centroids) matters for
    inner-product search: with plain k-means centroids recall@100 dropped by several points at the
    same cost.
    """

    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    leaves_to_search_fraction: float | None = None
    dimensions_per_block: int = 2
    num_reordering_candidates: int | None = None
    training_iterations: int = 12
    training_sample_size: int | None = None
    spherical: bool = True
    anisotropic_quantization_threshold: float = 0.2
    parallelize_batch_searches: bool = True

    def resolve(self, num_items: int, num_candidates: int) -> dict[str, Any]:
        """Concrete parameters for a corpus of ``num_items`` from which ``num_candidates`` are retrieved."""
        if num_items < 1:
            raise ValueError("the ScaNN index needs at least one item")
        # ScaNN refuses more leaves than points; sqrt(N) keeps leaves ~ as large as their number.
        leaves = self.num_leaves if self.num_leaves is not None else max(1, int(round(math.sqrt(num_items))))
        if not 1 <= leaves <= num_items:
            raise ValueError(f"num_leaves must be in [1, {num_items}] (corpus size), got {leaves}")
        large = num_items > 250_000
        if self.num_leaves_to_search is not None:
            search = self.num_leaves_to_search
        else:
            fraction = self.leaves_to_search_fraction
            if fraction is None:
                fraction = 1.0 if num_items <= 20_000 else 0.4 if large else 0.1
            search = min(leaves, max(1, int(math.ceil(leaves * fraction))))
        if not 1 <= search <= leaves:
            raise ValueError(f"num_leaves_to_search must be in [1, num_leaves={leaves}], got {search}")
        reorder = self.num_reordering_candidates
        if reorder is None:
            reorder = max((40 if large else 10) * num_candidates, 1000)
        reorder = int(min(max(reorder, num_candidates), num_items))
        if self.dimensions_per_block < 1:
            raise ValueError("dimensions_per_block must be >= 1")
        sample = self.training_sample_size if self.training_sample_size is not None else min(num_items, 250_000)
        return {"num_leaves": int(leaves), "num_leaves_to_search": int(search),
                "dimensions_per_block": int(self.dimensions_per_block),
                "num_reordering_candidates": reorder,
                "training_iterations": int(self.training_iterations),
                "training_sample_size": int(sample), "spherical": bool(self.spherical),
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
