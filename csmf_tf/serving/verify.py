"""Load a written SavedModel back and check it answers exactly like the in-memory module it came from.

Run on the scratch directory before publication (:mod:`csmf_tf.serving.publish`), so a version whose
serialisation lost something (a tower layer, a lookup table, the index) is never published, and
neither is one whose signatures write state (:func:`state_writing_ops`): a served request must only
read variables and tables (a write per request races between concurrent requests, and tfmot's
``weight * mask`` assignment rewrote the whole user embedding table on every request).
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Mapping

import numpy as np
import tensorflow as tf
from scann import scann_ops  # noqa: F401  (registers the Scann ops a ScaNN export's graph uses)

from csmf_tf.serving.constants import (ITEM_EMBEDDING_SIGNATURE, OUTPUT_ITEM_IDS, OUTPUT_SCORES,
                                       RETRIEVAL_SIGNATURE, USER_EMBEDDING_SIGNATURE)
from csmf_tf.serving.module import RetrievalServingModule
from csmf_tf.serving.tower_inputs import to_tensor


#: Op types that write a variable, a table or a TF1 ref variable (``Assign*``, ``Scatter*`` / ``ResourceScatter*``,
#: optimizer ``*Apply*`` updates, strided-slice assignment, table insert/remove/import/initialise).
#: ``TensorScatter*`` ops return a new tensor and write nothing.
_STATE_WRITING_PREFIXES = ("Assign", "Scatter", "ResourceScatter", "Apply", "ResourceApply", "SparseApply",
                           "ResourceSparseApply", "StridedSliceAssign", "ResourceStridedSliceAssign",
                           "LookupTableInsert", "LookupTableRemove", "LookupTableImport", "InitializeTable")


def state_writing_ops(function: tf.types.experimental.ConcreteFunction) -> dict[str, int]:
    """``{op type: count}`` of the state-writing ops in ``function``'s graph and every function it calls
    (the graph's function library, where ``StatefulPartitionedCall`` bodies live)."""
    graph_def = function.graph.as_graph_def()
    ops = collections.Counter(node.op for node in graph_def.node)
    for library_function in graph_def.library.function:
        ops.update(node.op for node in library_function.node_def)
    return {op: n for op, n in sorted(ops.items()) if op.startswith(_STATE_WRITING_PREFIXES)}


def verify_export(export_dir: Path, module: RetrievalServingModule, request: Mapping[str, tf.Tensor],
                  item_inputs: Mapping[str, np.ndarray], tolerance: float = 1e-5) -> None:
    """Raise ``RuntimeError`` unless the SavedModel at ``export_dir`` matches ``module``.

    Checked: no signature writes state (:func:`state_writing_ops`). Compared: the user embedding of
    ``request``'s users, the item embedding of the first catalog rows (``item_inputs``) against the
    indexed vectors, and ``serving_default`` on the complete ``request``.
    """
    sigs = tf.saved_model.load(str(export_dir)).signatures
    for name, function in sigs.items():
        writes = state_writing_ops(function)
        if writes:
            raise RuntimeError(f"exported signature {name!r} writes state on every call: {writes}; a tower "
                               "layer assigns a variable in its forward pass (fold such state into "
                               "constants before export, as csmf_tf.serving.folding does for tfmot wrappers)")
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
