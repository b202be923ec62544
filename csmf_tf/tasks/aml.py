"""Cross-Stage Adaptive Margin Loss (AML) as a TFRS retrieval task (docs/method.md section 6).

For a stage-``t`` positive ``(u, i+)`` among candidates ``C`` (in-batch items plus cascade hard
negatives), with temperature ``T`` and logits ``z(u, j) = s_t(u, j) / T`` (after the log-Q correction):

    L_t = -log( exp(z(u,i+) - m) / ( exp(z(u,i+) - m) + sum_{j in N} exp(z(u,j)) ) )
    m   = margin_fn( stop_gradient( p_{t-1}(i+ | u) ) ),   default margin_fn(p) = eta * (1 - p)

The margin is in logit units (nats) [ours]: ``eta = 0.5`` lowers the positive's logit by at most half
a nat whatever the temperature (a margin in score units, divided by ``T``, would mean ten nats at
``T = 0.05`` and one at ``T = 0.5``). ``p_{t-1}`` is the upstream (stage ``t-1``, frozen) softmax
probability of ``i+`` over the same candidates and corrections. Candidates whose ``candidate_mask``
is 0 (rows without a cascade hard negative) are removed from both softmaxes. With no upstream query (stage 1) or ``eta = 0`` this is exactly
``tfrs.tasks.Retrieval``: the logits go through the same TFRS layers (temperature, log-Q
``SamplingProbablityCorrection``, ``RemoveAccidentalHits``) and the same loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

#: The logit added to removed candidates (TFRS's value for accidental hits).
MIN_LOGIT = float(np.finfo(np.float32).min / 100.0)

MarginFn = Callable[[tf.Tensor], tf.Tensor]


def hit_keys(candidate_ids: tf.Tensor) -> tf.Tensor:
    """Integer keys that are equal exactly where ``candidate_ids`` are equal (``tf.unique``'s indices).

    TFRS's ``RemoveAccidentalHits`` compares every query's positive id with every candidate id: on
    string ids that is ``B x C`` string comparisons, about 40 % of a training step at batch 1024.
    The keys give the same mask from ``B x C`` integer comparisons after one ``O(C)`` hash pass.
    """
    return tf.unique(candidate_ids).idx if candidate_ids.dtype == tf.string else candidate_ids


def linear_margin(eta: float) -> MarginFn:
    """``m = eta * (1 - p_{t-1})``: small where upstream already ranks the positive high."""
    return lambda upstream_probability: eta * (1.0 - upstream_probability)


class AdaptiveMarginRetrieval(tfrs.tasks.Retrieval):
    """``tfrs.tasks.Retrieval`` with an upstream-driven margin on the positive logit.

    Args:
      eta: margin scale; ``0`` turns AML off (plain TFRS retrieval loss).
      margin_fn: optional ``p_{t-1} [B] -> m [B]``; defaults to :func:`linear_margin` ``(eta)``.
      **kwargs: forwarded to ``tfrs.tasks.Retrieval`` (``temperature``, ``metrics``,
        ``remove_accidental_hits``, ...).
    """

    def __init__(self, eta: float = 0.0, margin_fn: Optional[MarginFn] = None, **kwargs):
        super().__init__(**kwargs)
        self.eta = float(eta)
        self.margin_fn = margin_fn or linear_margin(self.eta)

    def _logits(self, query: tf.Tensor, candidates: tf.Tensor, labels: tf.Tensor,
                candidate_sampling_probability, candidate_ids, positive_margin=None,
                candidate_mask=None) -> tf.Tensor:
        scores = tf.linalg.matmul(query, candidates, transpose_b=True)
        if self._temperature is not None:
            scores = scores / self._temperature
        if positive_margin is not None:
            scores = scores - positive_margin[:, None] * labels
        if candidate_mask is not None:
            scores = scores + (1.0 - candidate_mask)[None, :] * MIN_LOGIT
        if candidate_sampling_probability is not None:
            scores = tfrs.layers.loss.SamplingProbablityCorrection()(scores, candidate_sampling_probability)
        if self._remove_accidental_hits:
            if candidate_ids is None:
                raise ValueError("remove_accidental_hits needs candidate_ids")
            scores = tfrs.layers.loss.RemoveAccidentalHits()(labels, scores, candidate_ids)
        return scores

    def positive_margin(self, upstream_query: tf.Tensor, candidates: tf.Tensor, labels: tf.Tensor,
                        candidate_sampling_probability=None, candidate_ids=None,
                        candidate_mask=None) -> tf.Tensor:
        """``m = margin_fn(stop_gradient(p_{t-1}(i+|u)))``, shape ``[B]``."""
        upstream = self._logits(upstream_query, candidates, labels, candidate_sampling_probability,
                                candidate_ids, candidate_mask=candidate_mask)
        probability = tf.reduce_sum(tf.nn.softmax(upstream, axis=1) * labels, axis=1)
        return self.margin_fn(tf.stop_gradient(probability))

    def call(self, query_embeddings: tf.Tensor, candidate_embeddings: tf.Tensor,
             sample_weight: Optional[tf.Tensor] = None,
             candidate_sampling_probability: Optional[tf.Tensor] = None,
             candidate_ids: Optional[tf.Tensor] = None, compute_metrics: bool = True,
             compute_batch_metrics: bool = True, upstream_query_embeddings: Optional[tf.Tensor] = None,
             candidate_mask: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Loss for ``[B, D]`` queries against ``[C, D]`` candidates (``C >= B``; row ``b``'s
        positive is candidate ``b``, the rest are negatives). ``upstream_query_embeddings``
        (``[B, D]``, the stage ``t-1`` query) switches the margin on when ``eta != 0``;
        ``candidate_mask`` (``[C]``, 1 keep / 0 remove; the first ``B`` must be 1) removes candidates
        from every query's softmax."""
        num_queries = tf.shape(query_embeddings)[0]
        labels = tf.eye(num_queries, tf.shape(candidate_embeddings)[0])
        keys = None if candidate_ids is None else hit_keys(candidate_ids)
        margin = None
        if upstream_query_embeddings is not None and self.eta != 0.0:
            margin = self.positive_margin(upstream_query_embeddings, candidate_embeddings, labels,
                                          candidate_sampling_probability, keys, candidate_mask)
        scores = self._logits(query_embeddings, candidate_embeddings, labels,
                              candidate_sampling_probability, keys, margin, candidate_mask)
        loss = self._loss(y_true=labels, y_pred=scores, sample_weight=sample_weight)

        update_ops = [metric.update_state(loss) for metric in self._loss_metrics]
        if compute_metrics:
            true_ids = None if candidate_ids is None else candidate_ids[:num_queries]
            for metric in self._factorized_metrics:
                update_ops.append(metric.update_state(
                    query_embeddings, candidate_embeddings[:num_queries],
                    true_candidate_ids=true_ids, sample_weight=sample_weight))
        if compute_batch_metrics:
            for metric in self._batch_metrics:
                update_ops.append(metric.update_state(labels, scores, sample_weight=sample_weight))
        with tf.control_dependencies(update_ops):
            return tf.identity(loss)
