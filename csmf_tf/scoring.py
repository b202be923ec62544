"""Stage scores and the fused score from one D-dimensional user and item vector.

Output dimension ``j`` is owned by stage ``s(j)`` (1-based, ``owner_stage``). With ``u = f_u(user)``,
``v = f_i(item)`` and blocks ``B_b = {j : s(j) = b}``:

    s_t(u, i) = sum_{b <= t} <u[B_b], v[B_b]> = <u * m_t, v>,      m_t[j] = 1[s(j) <= t]
    F(u, i)   = sum_t k_t * s_t(u, i)       = <u * w, v>,         w[j]   = sum_{t >= s(j)} k_t

so every stage score and the fused score are inner products with a rescaled query: the item index is
built once and the weights only scale the query (see docs/method.md, section 5). ``m_t`` is the
active mask of stage ``t`` (:mod:`csmf_tf.masks.ownership`). This module has no training code in it
so that serving can import it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from csmf_tf.masks import ownership


def stage_query_masks(owner_stage: np.ndarray, num_stages: int) -> np.ndarray:
    """``m[t-1, j] = 1[s(j) <= t]``; shape ``[S, D]``, float32."""
    stages = np.arange(1, num_stages + 1)[:, None]
    return ownership.active_mask(np.asarray(owner_stage)[None, :], stages)


def fusion_vector(owner_stage: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``w[j] = sum_{t >= s(j)} k_t``; shape ``[D]``, float32.

    ``weights`` holds one ``k_t`` per stage in cascade order (``k_d, k_o, k_r`` by default).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1:
        raise ValueError(f"weights must be one value per objective, got shape {weights.shape}")
    return (stage_query_masks(owner_stage, len(weights)).T @ weights).astype(np.float32)


def fused_query(user_vectors: np.ndarray, owner_stage: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The query whose inner product with item vectors is the fused score ``F``; ``[B, D]``."""
    return np.asarray(user_vectors, dtype=np.float32) * fusion_vector(owner_stage, weights)[None, :]


def stage_queries(user_vectors: np.ndarray, owner_stage: np.ndarray, stage: int) -> np.ndarray:
    """The query whose inner product with item vectors is ``s_stage`` (1-based); ``[B, D]``."""
    mask = ownership.active_mask(owner_stage, stage)
    return np.asarray(user_vectors, dtype=np.float32) * mask[None, :]


def fusion_scales(weights: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-query fusion scales ``W = K M``: ``[B, S] x [S, D] -> [B, D]`` (numpy)."""
    return np.asarray(weights, np.float64) @ np.asarray(masks, np.float64)


def fusion_scales_tf(weights, masks):
    """:func:`fusion_scales` in TensorFlow (the exported graph): ``tf.matmul(K, M)``."""
    import tensorflow as tf

    return tf.matmul(weights, masks)


def stage_scores_tf(products, masks):
    """Stage scores from element-wise products ``u * v`` (``[..., D]``): ``[..., S]`` (TensorFlow)."""
    import tensorflow as tf

    return tf.einsum("...d,td->...t", products, masks)
