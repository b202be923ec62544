"""Ownership: which stage owns each parameter, and the masks that follow from it.

This is the one place where the CSMF mask rules live (docs/method.md, section 4). Every weight has an
owner stage ``o(w)`` in ``1..S`` or :data:`NEVER` (a connection that no stage may ever use):

- unit level (default): a unit ``j`` (Dense output neuron, embedding column, output dimension) has an
  owner ``s(j)``; a Dense weight ``W[i -> j]`` is owned by ``s(j)`` when ``s(i) <= s(j)`` (a unit reads
  only units of its own or earlier stages) and by :data:`NEVER` otherwise; an embedding weight
  ``E[r, c]`` is owned by its column ``s(c)``;
- weight level (ablation): every weight carries its own owner, set directly by weight-level CPP.

In stage ``t``:

    active(w)    = o(w) <= t        (inactive weights are exactly zero: the tfmot wrapper's mask)
    trainable(w) = o(w) == t        (the gradient mask; everything else is frozen or not yet born)
    upstream(w)  = o(w) <= t - 1    (what forms s_{t-1}: the AML upstream query mask)

A bias follows its unit: active iff ``s(j) <= t``, trainable iff ``s(j) == t``. The parameters a
stage owns (``o(w) == t``) are also the ones it re-initialises when it begins, the item block it
may start at zero, and CPP's candidates when it ends. CPP's hand-off is the only transition:

    o'(w) = t + 1 if w is freed by stage t, else o(w)
"""
from __future__ import annotations

import numpy as np

#: Owner value of a connection no stage may use (a unit reading a unit of a later stage).
NEVER = np.int32(2**30)


def dense_weight_owner(input_owner: np.ndarray, output_owner: np.ndarray) -> np.ndarray:
    """Unit-level owner of each Dense weight; ``[in, out]`` int32.

    ``o(W[i, j]) = s(j)`` if ``s(i) <= s(j)`` else :data:`NEVER`.
    """
    input_owner = np.asarray(input_owner, np.int32)[:, None]
    output_owner = np.asarray(output_owner, np.int32)[None, :]
    return np.where(input_owner <= output_owner, output_owner, NEVER).astype(np.int32)


def embedding_weight_owner(column_owner: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """Unit-level owner of each embedding weight ``E[r, c] -> s(c)``; ``[V, d]`` int32."""
    column_owner = np.asarray(column_owner, np.int32)
    return np.broadcast_to(column_owner[None, :], (vocabulary_size, len(column_owner))).astype(np.int32)


def owned_by(owner: np.ndarray, stage: int) -> np.ndarray:
    """``o(w) == stage`` as bool, same shape as ``owner``: the parameters ``stage`` owns."""
    return np.asarray(owner) == stage


def active_mask(owner: np.ndarray, stage: int | np.ndarray) -> np.ndarray:
    """``1[o(w) <= stage]`` as float32; ``stage`` may be an array that broadcasts against ``owner``."""
    return (np.asarray(owner) <= stage).astype(np.float32)


def trainable_mask(owner: np.ndarray, stage: int) -> np.ndarray:
    """``1[o(w) == stage]`` as float32, same shape as ``owner``."""
    return owned_by(owner, stage).astype(np.float32)


def upstream_mask(owner: np.ndarray, stage: int) -> np.ndarray:
    """``1[o(w) <= stage - 1]`` as float32: the parameters that form ``s_{stage-1}``."""
    return active_mask(owner, stage - 1)


def hand_off(owner: np.ndarray, freed: np.ndarray, stage: int) -> np.ndarray:
    """New owners after CPP frees ``freed`` (flat indices into ``owner``, all owned by ``stage``):
    they become ``stage + 1``'s. Returns a copy, int32, same shape as ``owner``."""
    owner = np.array(owner, np.int32)
    flat = owner.reshape(-1)  # a view: writing it writes ``owner``
    if not owned_by(flat[freed], stage).all():
        raise ValueError(f"only parameters owned by stage {stage} can be handed to stage {stage + 1}")
    flat[freed] = stage + 1
    return owner
