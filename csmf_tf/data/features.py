"""The batch contract: every key a training batch carries, defined once.

A training batch is a dict of ``[B]`` tensors. The data pipelines (:mod:`csmf_tf.data.tfdata`,
:mod:`csmf_tf.data.streaming`) write these keys and the models (:mod:`csmf_tf.models.cascade`,
:mod:`csmf_tf.models.multitask`) read them; both sides import the names from here so that a key
cannot be spelled two ways (an earlier split between ``"hard_negative_item_id"`` and
``"hard_negative/item_id"`` silently kept hard negatives out of the loss).

- :data:`USER_ID`, :data:`ITEM_ID` and every feature under its own name (``[B]`` tf.string for ids and
  categorical features, tf.float32 for numeric ones);
- :data:`SAMPLING_PROBABILITY`: ``p(i)``, the positive item's share of the objective's positives, for
  the log-Q correction;
- cascade hard negatives (stages ``t > 1``): the negative's id and features under :func:`hard_negative`
  of their names, and :data:`HARD_NEGATIVE_MASK` (1.0 when the row has a hard negative, 0.0 when the
  user has none: such a row adds no candidate), and :data:`HARD_NEGATIVE_SAMPLING_PROBABILITY`: the
  hard negative's item share of the objective's positives, as :data:`SAMPLING_PROBABILITY` would give it
  (the smallest share of any item when the item has no positive of the objective), read by the loss
  when hard negatives take the in-batch log-Q correction (:mod:`csmf_tf.models.cascade`).
"""
from __future__ import annotations

USER_ID = "user_id"
ITEM_ID = "item_id"
SAMPLING_PROBABILITY = "candidate_sampling_probability"
HARD_NEGATIVE_PREFIX = "hard_negative/"
HARD_NEGATIVE_MASK = "hard_negative_mask"


def hard_negative(key: str) -> str:
    """The batch key of the hard negative's ``key`` (its id or one of its item features)."""
    return HARD_NEGATIVE_PREFIX + key


def strip_hard_negative(key: str) -> str:
    """``hard_negative(name) -> name``; other keys unchanged."""
    return key[len(HARD_NEGATIVE_PREFIX):] if key.startswith(HARD_NEGATIVE_PREFIX) else key


HARD_NEGATIVE_ITEM_ID = hard_negative(ITEM_ID)
HARD_NEGATIVE_SAMPLING_PROBABILITY = hard_negative(SAMPLING_PROBABILITY)
#: Keys whose values are float32 whatever the features are.
FLOAT_KEYS = (SAMPLING_PROBABILITY, HARD_NEGATIVE_MASK, HARD_NEGATIVE_SAMPLING_PROBABILITY)
#: Keys whose values are string ids.
ID_KEYS = (USER_ID, ITEM_ID, HARD_NEGATIVE_ITEM_ID)
