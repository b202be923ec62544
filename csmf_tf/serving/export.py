"""Export trained CSMF towers as a TF Serving SavedModel with an in-graph retrieval index.

Layout written (the one TF Serving reads)::

    <base_path>/<model_name>/<version>/saved_model.pb
                                      variables/
                                      assets/{config.json, objectives.json, ownership.json, item_vocab.txt, ...}
                                      assets.extra/tf_serving_warmup_requests

This module checks the arguments, embeds the item catalog, describes the export (``config.json``) and
runs the steps in order. The steps have their own modules: :mod:`~csmf_tf.serving.folding` (read-only
inference copies of the towers, pruning masks folded in), :mod:`~csmf_tf.serving.module` (the saved
``tf.Module``, its signatures and the scoring maths), :mod:`~csmf_tf.serving.index` (ScaNN or exact
search), :mod:`~csmf_tf.serving.recall` (the search's recall@k against exact search, with a floor),
:mod:`~csmf_tf.serving.assets` (``assets/`` and the warm-up request), :mod:`~csmf_tf.serving.verify`
(the load-back check) and :mod:`~csmf_tf.serving.publish` (atomic publication as the next version).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.table import Catalog
from csmf_tf.masks import ownership
from csmf_tf.metrics.prior import PopularityPrior
from csmf_tf.serving.assets import warmup_request, write_assets, write_warmup
from csmf_tf.serving.constants import (ANN_RECALL_FAIL, DEFAULT_ANN_RECALL_QUERIES, DEFAULT_MIN_ANN_RECALL,
                                       ITEM_EMBEDDING_SIGNATURE, MODEL_INFO_SIGNATURE, RETRIEVAL_SIGNATURE,
                                       USER_EMBEDDING_SIGNATURE)
from csmf_tf.serving.folding import inference_tower, pruning_wrappers
from csmf_tf.serving.index import ScannOptions, build_index
from csmf_tf.serving.module import RetrievalServingModule
from csmf_tf.serving.publish import publish_next_version
from csmf_tf.serving.recall import check_ann_recall, check_recall_options, measure_ann_recall
from csmf_tf.serving.reserved import drop_reserved_dimensions
from csmf_tf.serving.tower_inputs import check_input_names, embed_catalog, input_specs_of, keyword_function
from csmf_tf.serving.verify import verify_export

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def build_serving_module(user_model: tf.keras.Model, item_model: tf.keras.Model, item_catalog: Catalog,
                         owner_stage: np.ndarray, objectives: Sequence[str],
                         default_weights: Sequence[float] | None = None, k_max: int = 100,
                         default_k: int = 10, use_scann: bool = True,
                         scann_options: ScannOptions | None = None,
                         user_input_spec: Mapping[str, tf.TensorSpec] | None = None,
                         item_input_spec: Mapping[str, tf.TensorSpec] | None = None,
                         item_batch_size: int = 4096,
                         item_vectors: np.ndarray | None = None,
                         popularity_prior: PopularityPrior | None = None,
                         granularity: str = "unit") -> tuple[RetrievalServingModule, dict]:
    """Embed the catalog, build the index and return ``(module, config)`` without writing anything.

    ``item_vectors`` may be passed when the caller already embedded the catalog (benchmarks);
    otherwise the item tower embeds ``item_catalog`` here. ``popularity_prior`` (rows = the catalog's)
    appends its ``S`` columns to the index (see :mod:`~csmf_tf.serving.module`). ``granularity`` is the
    model's ownership granularity: a weight-level model is refused, since its stage scores need one
    forward pass per stage, which one ``D``-dimensional query cannot give.
    """
    if granularity != "unit":
        raise ValueError(f"cannot export a model with {granularity!r}-level ownership: its stage scores s_t need "
                         "one forward pass per stage (S x D vectors), so one D-dimensional query would return "
                         "s_S for every objective; train with granularity 'unit' to serve it")
    objectives = tuple(str(o) for o in objectives)
    s = len(objectives)
    if s < 1:
        raise ValueError("objectives must name at least one objective")
    owner_stage = np.asarray(owner_stage)
    if owner_stage.ndim != 1 or not np.issubdtype(owner_stage.dtype, np.integer):
        raise ValueError(f"owner_stage must be a 1-D integer array, got {owner_stage.dtype} "
                         f"{owner_stage.shape}")
    # Dimensions reserved for a later objective (training/extend.py) are zero and serve no objective.
    trained_dim = owner_stage.size
    user_model, item_model, owner_stage = drop_reserved_dimensions(user_model, item_model, owner_stage, s)
    if owner_stage.size == 0 or owner_stage.min() < 1 or owner_stage.max() > s:
        raise ValueError(f"owner_stage values must lie in [1, {s}] (one stage per objective)")
    if owner_stage.size < trained_dim:
        # Said, not silent: a model with one stage more than the objectives named also lands here.
        log.warning("left out %d of %d output dimensions owned by stage %d: no objective among %s uses them "
                    "(a reserve for a later objective; if the model has a trained stage %d, name its "
                    "objective too)", trained_dim - owner_stage.size, trained_dim, s + 1, list(objectives), s + 1)
    weights = np.ones(s, np.float32) if default_weights is None else np.asarray(default_weights,
                                                                                np.float32)
    if weights.shape != (s,) or not np.all(np.isfinite(weights)):
        raise ValueError(f"default_weights must be {s} finite values, got {weights!r}")
    n = len(item_catalog)
    if n == 0:
        raise ValueError("item_catalog is empty")
    ids = np.asarray([str(i) for i in item_catalog.ids], dtype=object)
    if len(set(ids.tolist())) != n:
        raise ValueError("item_catalog ids must be unique")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if k_max > n:
        log.warning("k_max=%d exceeds the corpus size %d; using k_max=%d", k_max, n, n)
        k_max = n
    if not 1 <= default_k <= k_max:
        raise ValueError(f"default_k must be in [1, k_max={k_max}], got {default_k}")

    # Serve read-only copies: masks folded into the weights, tfmot wrappers (and their per-call
    # weight * mask assignment) gone. The training towers are only read from here on.
    folded = {"user": len(pruning_wrappers(user_model)), "item": len(pruning_wrappers(item_model))}
    user_model, item_model = inference_tower(user_model), inference_tower(item_model)
    user_spec = check_input_names(user_input_spec or input_specs_of(user_model), "user")
    item_spec = check_input_names(item_input_spec or input_specs_of(item_model), "item")
    item_inputs = item_catalog.as_inputs("item_id")
    if item_vectors is None:
        embed = tf.function(keyword_function(
            "embed_items", list(item_spec),
            lambda d: {"v": tf.cast(item_model(d, training=False), tf.float32)}),
            input_signature=list(item_spec.values()), autograph=False)
        item_vectors = embed_catalog(embed, item_inputs, item_spec, "v", item_batch_size)
    item_vectors = np.asarray(item_vectors, np.float32)
    if item_vectors.ndim != 2 or item_vectors.shape[0] != n:
        raise ValueError(f"item vectors must be [{n}, D], got {item_vectors.shape}")
    if item_vectors.shape[1] != owner_stage.size:
        raise ValueError(f"the item tower outputs D={item_vectors.shape[1]} dims but owner_stage has "
                         f"{owner_stage.size}")
    if not np.all(np.isfinite(item_vectors)):
        raise ValueError("the item tower produced non-finite vectors")
    alphas = None
    if popularity_prior is not None:
        if popularity_prior.log_popularity.shape != (n, s):
            raise ValueError(f"the popularity prior must have [{n}, {s}] columns (catalog rows x objectives), "
                             f"got {popularity_prior.log_popularity.shape}")
        item_vectors = np.concatenate([item_vectors, popularity_prior.log_popularity.astype(np.float32)], axis=1)
        alphas = np.asarray(popularity_prior.alphas, np.float32)

    index, index_config = build_index(item_vectors, k_max, use_scann, scann_options)

    module = RetrievalServingModule(user_model, item_model, ids, item_vectors, owner_stage, objectives,
                                    weights, k_max, default_k, user_spec, item_spec, index, alphas)
    dims = {o: np.flatnonzero(ownership.owned_by(owner_stage, t + 1)).tolist() for t, o in enumerate(objectives)}
    config = {
        "format_version": FORMAT_VERSION,
        "objectives": list(objectives), "num_objectives": s,
        "default_weights": weights.tolist(), "k_max": int(k_max), "default_k": int(default_k),
        "dim": int(item_vectors.shape[1]), "tower_dim": int(owner_stage.size), "num_items": n,
        "popularity_prior": None if alphas is None else {"alphas": alphas.tolist(),
                                                          "columns": "log(1 + training positives) per objective"},
        "index": index_config,
        "user_inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                        for k, v in user_spec.items()},
        "item_inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                        for k, v in item_spec.items()},
        "signatures": {RETRIEVAL_SIGNATURE: "retrieval", USER_EMBEDDING_SIGNATURE: "user tower",
                       ITEM_EMBEDDING_SIGNATURE: "item tower", MODEL_INFO_SIGNATURE: "metadata"},
        "ownership": {"owner_stage": owner_stage.astype(int).tolist(), "blocks": dims,
                      "reserved_dimensions_dropped": int(trained_dim - owner_stage.size)},
        "folded_pruning_wrappers": folded,
    }
    return module, config


def export_retrieval_model(user_model: tf.keras.Model, item_model: tf.keras.Model, item_catalog: Catalog,
                           owner_stage: np.ndarray, objectives: Sequence[str],
                           base_path: str | os.PathLike, model_name: str,
                           default_weights: Sequence[float] | None = None, k_max: int = 100,
                           default_k: int = 10, use_scann: bool = True,
                           scann_options: ScannOptions | None = None,
                           extra_assets: Mapping[str, Any] | None = None,
                           user_input_spec: Mapping[str, tf.TensorSpec] | None = None,
                           item_input_spec: Mapping[str, tf.TensorSpec] | None = None,
                           warmup_inputs: Mapping[str, Any] | None = None,
                           item_batch_size: int = 4096, verify: bool = True,
                           popularity_prior: PopularityPrior | None = None, granularity: str = "unit",
                           min_ann_recall: float | None = DEFAULT_MIN_ANN_RECALL,
                           ann_recall_action: str = ANN_RECALL_FAIL, ann_recall_k: int | None = None,
                           ann_recall_queries: int = DEFAULT_ANN_RECALL_QUERIES,
                           ann_recall_users: Mapping[str, Any] | None = None) -> Path:
    """Export the towers + index as the next version of ``<base_path>/<model_name>``; returns its path.

    Args:
      user_model, item_model: functional tf.keras towers with dict inputs, ``-> [B, D]`` float32. They
        may contain tfmot ``prune_low_magnitude`` wrappers: the export serves copies with the masks
        folded into the weights and no wrapper (:mod:`~csmf_tf.serving.folding`), so no request writes
        a variable; the towers themselves are neither called nor changed.
      item_catalog: every item of the corpus (``ids`` + item features); row order = index order.
      owner_stage: ``[D]`` ints in ``1..S``: the stage that owns each output dimension (``S + 1``: capacity
        reserved for a later objective, left out of the served vectors: :mod:`~csmf_tf.serving.reserved`).
      objectives: the ``S`` objective names in cascade order.
      default_weights: ``k_t`` used when a request gives no ``objective_weights`` (default: all 1).
      k_max: most results a request may ask for (the ScaNN index retrieves this many candidates);
        clamped to the corpus size. default_k: ``k`` when a request gives none.
      use_scann: ScaNN index (needs the Scann custom ops to serve) or exact matmul + top_k.
      scann_options: index parameters (:class:`ScannOptions`).
      extra_assets: ``{file name: value}`` written to ``assets/`` (dict -> JSON, list -> lines for
        ``.txt``, str/bytes as is), e.g. a training config and vocabularies.
      user_input_spec, item_input_spec: explicit ``{name: tf.TensorSpec}``; default: read from the towers.
      warmup_inputs: one user's features for the warm-up query written to
        ``assets.extra/tf_serving_warmup_requests``; default: out-of-vocabulary placeholders.
      verify: load the written SavedModel back and compare it with the in-memory towers before publishing.
      popularity_prior: the prior the model is scored with (:mod:`csmf_tf.metrics.prior`), if any.
      granularity: the model's ownership granularity; ``"weight"`` is refused (see
        :func:`build_serving_module`).
      min_ann_recall: the least recall@k the served search must reach against exact search
        (:mod:`csmf_tf.serving.recall`); ``None``: measured and recorded, never enforced.
      ann_recall_action: ``"fail"``: below the floor, raise :class:`~csmf_tf.serving.recall.AnnRecallTooLow`
        and publish nothing; ``"warn"``: log a warning and export.
      ann_recall_k: the ``k`` of the recall (default: ``default_k``). ann_recall_queries: most queries
        measured. ann_recall_users: user-tower inputs of real users to draw the queries from (one row
        per user); default: indexed item vectors stand in for users.

    The measured recall is in ``assets/config.json`` (``ann_recall``) and in the ``model_info``
    signature (``ann_recall``, ``ann_recall_k``).

    The export is atomic (:mod:`csmf_tf.serving.publish`): written to a scratch directory, verified,
    flushed, then renamed to ``<max existing version + 1>``; a crash leaves no version behind.
    """
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid model name {model_name!r}")
    check_recall_options(min_ann_recall, ann_recall_action, ann_recall_queries)
    module, config = build_serving_module(
        user_model, item_model, item_catalog, owner_stage, objectives, default_weights, k_max, default_k,
        use_scann, scann_options, user_input_spec, item_input_spec, item_batch_size,
        popularity_prior=popularity_prior, granularity=granularity)
    recall = measure_ann_recall(module, ann_recall_k or module.default_k, ann_recall_queries, ann_recall_users)
    config["ann_recall"] = recall.to_json(min_ann_recall, ann_recall_action)
    log.info("ANN recall@%d = %.4f on %d %s queries (%.1fs)", recall.k, recall.recall, recall.num_queries,
             recall.queries, recall.seconds)
    check_ann_recall(recall, min_ann_recall, ann_recall_action)   # before anything is written
    module.record_ann_recall(recall.recall, recall.k)
    request = warmup_request(module, warmup_inputs)

    def write(tmp: Path) -> None:
        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
        tf.saved_model.save(module, str(tmp), signatures=module.signatures(), options=options)
        config["model_name"] = model_name
        config["exported_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_assets(tmp, config, module.item_ids.numpy().astype(str), extra_assets)
        write_warmup(tmp, model_name, request)
        if verify:
            verify_export(tmp, module, request, item_catalog.as_inputs("item_id"))

    return publish_next_version(Path(base_path) / model_name, write)


#: ``ScannOptions`` is part of this module's API: it is what ``scann_options`` takes.
__all__ = ["FORMAT_VERSION", "ScannOptions", "build_serving_module", "export_retrieval_model"]
