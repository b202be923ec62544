"""The ``tf.Module`` an export saves: both towers, the item table, the index and the four signatures.

Signatures:

``serving_default``
    inputs: every user-tower input (e.g. ``user_id`` string [B], features [B]), plus two inputs with
    defaults stored in the SignatureDef (so TF Serving >= 2.13 and our server let a request omit them):
    ``objective_weights`` float32 ``[S]`` or ``[B, S]`` and ``k`` int32 scalar (``1 <= k <= k_max``).
    outputs: ``item_ids`` string [B, k], ``scores`` float32 [B, k] (fused score ``F = sum_t k_t s_t``),
    ``objective_scores`` float32 [B, k, S] (``s_t`` of every returned item).
``user_embedding`` / ``item_embedding``
    tower inputs -> ``[B, D]`` float32.
``model_info``
    no inputs -> ``objectives`` [S] string, ``default_weights`` [S], ``k_max`` and ``default_k`` (scalars),
    ``prior_alphas`` [S], and ``ann_recall`` / ``ann_recall_k`` (the served search's recall@k against
    exact search, measured by the export: :mod:`csmf_tf.serving.recall`), so a client can label the
    per-objective scores and judge the index without reading the assets.

The fused query is ``u * w`` with ``w = weights @ M`` where ``M[t, j] = 1[s(j) <= t]``
(:func:`csmf_tf.scoring.stage_query_masks`), so the index is built once over the item vectors and the
objective weights only rescale the query (docs/method.md section 5). With ScaNN the index returns
``k_max`` candidate rows; the graph then gathers their exact vectors, re-scores them exactly (ScaNN's
quantised distances are approximations) and keeps the best ``k``. ``objective_scores`` come from the
same gathered vectors, so the three outputs always describe the same items consistently.

With a popularity prior (:mod:`csmf_tf.metrics.prior`: ``s_t + alpha_t L_t(i)``) the index holds
``[v, L]`` (``D + S`` columns) and the query is ``[u * w, k * alpha]``: still one inner product, one
index, and the weights still only rescale the query.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.scoring import fusion_scales_tf, stage_query_masks, stage_scores_tf
from csmf_tf.serving.constants import (ITEM_EMBEDDING_SIGNATURE, K_INPUT, MODEL_INFO_SIGNATURE,
                                       OUTPUT_ITEM_IDS, OUTPUT_OBJECTIVE_SCORES, OUTPUT_SCORES,
                                       RETRIEVAL_SIGNATURE, USER_EMBEDDING_SIGNATURE, WEIGHTS_INPUT)
from csmf_tf.serving.tower_inputs import keyword_function


class RetrievalServingModule(tf.Module):
    """The exported object: both towers, the item table and (optionally) the ScaNN index.

    Built by :func:`csmf_tf.serving.export.build_serving_module`, so tests and benchmarks can query
    the same graph in memory. ``index`` is ``None`` for the exact (matmul + top_k) variant, which needs
    no custom op and therefore also runs on stock TF Serving.
    """

    def __init__(self, user_model: tf.keras.Model, item_model: tf.keras.Model,
                 item_ids: np.ndarray, item_vectors: np.ndarray, owner_stage: np.ndarray,
                 objectives: Sequence[str], default_weights: np.ndarray, k_max: int, default_k: int,
                 user_spec: Mapping[str, tf.TensorSpec], item_spec: Mapping[str, tf.TensorSpec],
                 index: tf.keras.layers.Layer | None = None, prior_alphas: np.ndarray | None = None) -> None:
        super().__init__(name="csmf_retrieval")
        self.user_model = user_model
        self.item_model = item_model
        self.index = index
        self.num_stages = len(objectives)
        self.dim = int(item_vectors.shape[1])
        # item_vectors are [v, L] when the export carries a popularity prior: the towers' D columns first.
        self.tower_dim = len(owner_stage)
        self.prior_alphas = None if prior_alphas is None else tf.Variable(
            np.asarray(prior_alphas, np.float32), trainable=False, name="prior_alphas")
        self.k_max = int(k_max)
        self.default_k = int(default_k)
        self.item_ids = tf.Variable(np.asarray(item_ids, dtype=object).astype(bytes), trainable=False,
                                    name="item_ids")
        self.item_vectors = tf.Variable(np.asarray(item_vectors, np.float32), trainable=False,
                                        name="item_vectors")
        # M[t, j] = 1[s(j) <= t]; fusion vector w = weights @ M, stage scores s = (u * v) @ M^T.
        self.stage_masks = tf.Variable(stage_query_masks(owner_stage, self.num_stages), trainable=False,
                                       name="stage_masks")
        self.objective_names = tf.Variable(np.asarray(list(objectives), dtype=object).astype(bytes),
                                           trainable=False, name="objective_names")
        self.default_weights = tf.Variable(np.asarray(default_weights, np.float32), trainable=False,
                                           name="default_weights")
        # Set by record_ann_recall before the export is saved; NaN / 0 until measured.
        self.ann_recall = tf.Variable(np.float32(np.nan), trainable=False, name="ann_recall")
        self.ann_recall_k = tf.Variable(0, dtype=tf.int32, trainable=False, name="ann_recall_k")
        self.user_spec = dict(user_spec)
        self.item_spec = dict(item_spec)
        self._build_functions()

    # -- graph bodies -------------------------------------------------------------------------------
    def _user_vectors(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        # training=False: inference mode for dropout/BN. The towers are wrapper-free inference copies
        # (csmf_tf.serving.folding), so no call writes a variable.
        return tf.cast(self.user_model(dict(features), training=False), tf.float32)

    def _item_vectors_of(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return tf.cast(self.item_model(dict(features), training=False), tf.float32)

    def _batch_weights(self, weights: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        """Validate ``objective_weights`` ([S] or [B, S], finite) and broadcast it to [B, S]."""
        s = self.num_stages
        rank_ok = tf.debugging.assert_rank_in(
            weights, [1, 2], message=f"{WEIGHTS_INPUT} must have shape [{s}] or [batch, {s}]")
        with tf.control_dependencies([rank_ok]):
            shape = tf.shape(weights)
            last_ok = tf.debugging.assert_equal(
                shape[-1], s, message=f"{WEIGHTS_INPUT} must have {s} values (one per objective)")
        with tf.control_dependencies([last_ok]):
            w2 = tf.reshape(weights, [-1, s])
            rows = tf.shape(w2)[0]
            rows_ok = tf.debugging.Assert(
                tf.logical_or(tf.equal(rows, 1), tf.equal(rows, batch)),
                [f"{WEIGHTS_INPUT} must have 1 row or one row per query (batch size):", rows, batch])
            finite_ok = tf.debugging.assert_all_finite(w2, f"{WEIGHTS_INPUT} must be finite")
        with tf.control_dependencies([rows_ok, finite_ok]):
            return tf.broadcast_to(w2, [batch, s])

    def _check_k(self, k: tf.Tensor) -> tf.Tensor:
        ok = tf.debugging.Assert(
            tf.logical_and(k >= 1, k <= self.k_max),
            [f"k must be in [1, k_max={self.k_max}]; got", k])
        with tf.control_dependencies([ok]):
            return tf.identity(k)

    def _retrieve(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        weights = tf.convert_to_tensor(inputs.pop(WEIGHTS_INPUT), tf.float32)
        k = self._check_k(tf.convert_to_tensor(inputs.pop(K_INPUT), tf.int32))
        u = self._user_vectors(inputs)                              # [B, D]
        batch = tf.shape(u)[0]
        w = self._batch_weights(weights, batch)                     # [B, S]
        query = self.fused_query(u, w)
        # A NaN/inf feature (or weights so large that u * w overflows) would otherwise reach ScaNN,
        # which fails with an internal RET_CHECK, or the exact top_k, which ranks NaNs arbitrarily:
        # either way the request is at fault, so say so (InvalidArgument) before searching.
        query = tf.debugging.assert_all_finite(
            query, "the fused query u * w is not finite (NaN/inf in a user feature, or objective_weights "
                   "so large that the product overflows)")
        # Read the tables once as dense tensors and gather from those. tf.gather on the *variable*
        # (ResourceGather) switches it to copy-on-read mode, after which every dense read (the exact
        # matmul) copies the whole table: 200+ ms per query at 1M items instead of ~25 ms.
        table = tf.convert_to_tensor(self.item_vectors)
        ids = tf.convert_to_tensor(self.item_ids)
        scores, rows = self._search(query, k, table, exact=False)
        vectors = tf.gather(table, rows)                            # [B, k, D (+ S)]
        objective_scores = stage_scores_tf(vectors[:, :, :self.tower_dim] * u[:, None, :], self.stage_masks)
        if self.prior_alphas is not None:                           # + alpha_t L_t(i)
            objective_scores += vectors[:, :, self.tower_dim:] * self.prior_alphas
        return {OUTPUT_ITEM_IDS: tf.reshape(tf.gather(ids, rows), tf.shape(rows)), OUTPUT_SCORES: scores,
                OUTPUT_OBJECTIVE_SCORES: objective_scores}

    def fused_query(self, u: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """The one query of user vectors ``u`` [B, D] for ``weights`` [B, S]: ``u * w`` [B, D], or
        ``[u * w, k * alpha]`` [B, D + S] with a popularity prior."""
        query = u * fusion_scales_tf(weights, self.stage_masks)
        if self.prior_alphas is not None:
            query = tf.concat([query, weights * self.prior_alphas], axis=1)
        return query

    def search(self, query: tf.Tensor, k: int, exact: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """``(scores [B, k], rows [B, k])`` of the best items for ``query``: the search a request gets
        (the index, candidates re-scored exactly), or with ``exact`` the brute-force matmul + top_k."""
        return self._search(query, tf.constant(k, tf.int32), tf.convert_to_tensor(self.item_vectors), exact)

    def record_ann_recall(self, recall: float, k: int) -> None:
        """Store the measured recall@k for the ``model_info`` signature (call before saving)."""
        self.ann_recall.assign(recall)
        self.ann_recall_k.assign(k)

    def _search(self, query: tf.Tensor, k: tf.Tensor, table: tf.Tensor, exact: bool) -> tuple[tf.Tensor, tf.Tensor]:
        if exact or self.index is None:
            return self._exact_top_k(query, k, table)
        return self._approximate_top_k(query, k, table)

    @staticmethod
    def _exact_top_k(query: tf.Tensor, k: tf.Tensor, table: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        scores, rows = tf.math.top_k(tf.matmul(query, table, transpose_b=True), k=k)
        return scores, rows

    def _approximate_top_k(self, query: tf.Tensor, k: tf.Tensor, table: tf.Tensor
                           ) -> tuple[tf.Tensor, tf.Tensor]:
        """ScaNN candidates re-scored exactly; exact search for the batch if a row got fewer than k.

        ScaNN returns as many columns as the best row found (at most k_max) and pads shorter rows with
        row 0 and a NaN distance, so padding is masked out and the candidates are padded to k_max
        columns. A row with fewer than k real candidates (tiny corpora, too few leaves searched) falls
        back to the exact search rather than returning padding.
        """
        distances, candidates = self.index(query, k=self.k_max)
        candidates = tf.cast(candidates, tf.int32)
        n = tf.shape(table)[0]
        valid = tf.logical_and(tf.logical_not(tf.math.is_nan(distances)),
                               tf.logical_and(candidates >= 0, candidates < n))
        pad = [[0, 0], [0, self.k_max - tf.shape(candidates)[1]]]
        candidates = tf.pad(tf.where(valid, candidates, 0), pad)
        valid = tf.pad(valid, pad, constant_values=False)
        exact = tf.einsum("bd,bcd->bc", query, tf.gather(table, candidates))
        masked = tf.where(valid, exact, tf.constant(-np.inf, tf.float32))
        short = tf.reduce_any(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1) < k)

        def rescored() -> tuple[tf.Tensor, tf.Tensor]:
            scores, pos = tf.math.top_k(masked, k=k)
            return scores, tf.gather(candidates, pos, batch_dims=1)

        return tf.cond(short, lambda: self._exact_top_k(query, k, table), rescored)

    def _build_functions(self) -> None:
        user_names = list(self.user_spec)
        item_names = list(self.item_spec)
        defaults = {WEIGHTS_INPUT: tf.constant(self.default_weights.numpy()),
                    K_INPUT: tf.constant(self.default_k, tf.int32)}
        retrieve_py = keyword_function("retrieve", user_names + [WEIGHTS_INPUT, K_INPUT],
                                       self._retrieve, defaults)
        self.retrieve = tf.function(retrieve_py, input_signature=[
            *self.user_spec.values(),
            tf.TensorSpec(None, tf.float32, name=WEIGHTS_INPUT),   # [S] or [B, S]: rank checked in-graph
            tf.TensorSpec([], tf.int32, name=K_INPUT)], autograph=False)
        self.user_embedding = tf.function(
            keyword_function("user_embedding", user_names,
                             lambda d: {"user_embedding": self._user_vectors(d)}),
            input_signature=list(self.user_spec.values()), autograph=False)
        self.item_embedding = tf.function(
            keyword_function("item_embedding", item_names,
                             lambda d: {"item_embedding": self._item_vectors_of(d)}),
            input_signature=list(self.item_spec.values()), autograph=False)
        self.model_info = tf.function(lambda: {
            "objectives": tf.identity(self.objective_names),
            "default_weights": tf.identity(self.default_weights),
            "k_max": tf.constant(self.k_max, tf.int32),
            "default_k": tf.constant(self.default_k, tf.int32),
            "prior_alphas": (tf.identity(self.prior_alphas) if self.prior_alphas is not None
                             else tf.zeros([self.num_stages])),
            "ann_recall": tf.identity(self.ann_recall),
            "ann_recall_k": tf.identity(self.ann_recall_k)}, input_signature=[], autograph=False)

    def signatures(self) -> dict[str, Any]:
        """The ``signatures=`` mapping for :func:`tf.saved_model.save`."""
        return {RETRIEVAL_SIGNATURE: self.retrieve, USER_EMBEDDING_SIGNATURE: self.user_embedding,
                ITEM_EMBEDDING_SIGNATURE: self.item_embedding, MODEL_INFO_SIGNATURE: self.model_info}
