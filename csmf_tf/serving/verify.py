"""Load a written SavedModel back and check it answers exactly like the in-memory module it came from.

Run on the scratch directory before publication (:mod:`csmf_tf.serving.publish`), so a version whose
serialisation lost something (a tower layer, a lookup table, the index) is never published.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import tensorflow as tf
from scann import scann_ops  # noqa: F401  (registers the Scann ops a ScaNN export's graph uses)

from csmf_tf.serving.constants import (ITEM_EMBEDDING_SIGNATURE, OUTPUT_ITEM_IDS, OUTPUT_SCORES,
                                       RETRIEVAL_SIGNATURE, USER_EMBEDDING_SIGNATURE)
from csmf_tf.serving.module import RetrievalServingModule
from csmf_tf.serving.tower_inputs import to_tensor


def verify_export(export_dir: Path, module: RetrievalServingModule, request: Mapping[str, tf.Tensor],
                  item_inputs: Mapping[str, np.ndarray], tolerance: float = 1e-5) -> None:
    """Raise ``RuntimeError`` unless the SavedModel at ``export_dir`` matches ``module``.

    Compared: the user embedding of ``request``'s users, the item embedding of the first catalog rows
    (``item_inputs``) against the indexed vectors, and ``serving_default`` on the complete ``request``.
    """
    sigs = tf.saved_model.load(str(export_dir)).signatures
    user_inputs = {n: v for n, v in request.items() if n in module.user_spec}
    got_u = sigs[USER_EMBEDDING_SIGNATURE](**user_inputs)["user_embedding"].numpy()
    want_u = module.user_embedding(**user_inputs)["user_embedding"].numpy()
    if not np.allclose(got_u, want_u, atol=tolerance, rtol=0):
        raise RuntimeError("exported user_embedding differs from the in-memory user tower")
    probe = {n: to_tensor(v[:8], module.item_spec[n]) for n, v in item_inputs.items()
             if n in module.item_spec}
    got_v = sigs[ITEM_EMBEDDING_SIGNATURE](**probe)["item_embedding"].numpy()
    indexed = module.item_vectors.numpy()[:len(got_v), :module.tower_dim]   # without prior columns
    if not np.allclose(got_v, indexed, atol=tolerance, rtol=0):
        raise RuntimeError("exported item_embedding differs from the indexed item vectors")
    got = sigs[RETRIEVAL_SIGNATURE](**request)
    want = module.retrieve(**request)
    if got[OUTPUT_ITEM_IDS].shape != want[OUTPUT_ITEM_IDS].shape:
        raise RuntimeError(f"exported retrieval returned shape {got[OUTPUT_ITEM_IDS].shape}, "
                           f"expected {want[OUTPUT_ITEM_IDS].shape}")
    if not np.allclose(got[OUTPUT_SCORES].numpy(), want[OUTPUT_SCORES].numpy(), atol=1e-4, rtol=1e-5):
        raise RuntimeError("exported retrieval scores differ from the in-memory module")
