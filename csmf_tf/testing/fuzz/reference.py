"""Checks that a served answer row is the answer to *its own* request, from the export's own tables."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from csmf_tf.scoring import fusion_scales
from csmf_tf.serving.constants import MODEL_INFO_SIGNATURE


class Reference:
    """The exported model's own tables, to check each answer row against *its* request (see check_answer)."""

    def __init__(self, version_dir: Path) -> None:
        from scann import scann_ops  # noqa: F401  (registers the Scann ops the graph uses)

        loaded = tf.saved_model.load(str(version_dir))
        self._user_fn = loaded.signatures["user_embedding"]
        self.items = loaded.item_vectors.numpy().astype(np.float64)          # [N, D]
        self.masks = loaded.stage_masks.numpy().astype(np.float64)           # [S, D], M[t, j] = 1[s(j) <= t]
        self.row_of = {i: r for r, i in enumerate(loaded.item_ids.numpy())}  # item id (bytes) -> row
        info = loaded.signatures[MODEL_INFO_SIGNATURE]()   # what the server reads too: one source
        self.k_max = int(info["k_max"])
        self.default_k = int(info["default_k"])
        self.num_objectives = len(info["objectives"])
        self.default_weights = info["default_weights"].numpy().astype(np.float32)
        self._lock = threading.Lock()
        self.recalls: list[float] = []                 # per checked row: share of items in the exact top-k
        self.recall_negative_weights: list[bool] = []  # ... and whether that row had a negative weight

    def check_answer(self, inputs: dict[str, np.ndarray], k: int, item_ids: np.ndarray | None,
                     scores: np.ndarray | None, objective_scores: np.ndarray | None) -> str | None:
        """None when every row answers *this* request, else what is wrong.

        The served index is approximate (ScaNN), and ScaNN's candidates for a query depend on the other
        queries in its batch, so under micro-batching an answer need not equal the SavedModel's answer
        for the request alone. What must hold for every row: the returned items' scores are exactly
        this row's fused scores ``<u_b * w_b, v>`` (a row answered with another request's query fails
        here), ``objective_scores`` are its per-stage scores and scores are sorted. How many of the
        items are in the exact top-k (ties allowed) is recorded per row: an approximate index may miss
        some, so the run only requires a high *mean* (``--min_mean_recall``).
        """
        feed = {n: tf.constant(inputs[n]) for n in ("user_id", "age", "city")}
        with self._lock:   # one call at a time: the fuzzing threads share this interpreter
            u = self._user_fn(**feed)["user_embedding"].numpy().astype(np.float64)
        b = len(u)
        w = np.asarray(inputs.get("objective_weights", self.default_weights), np.float64)
        w = np.broadcast_to(w.reshape(-1, self.num_objectives), (b, self.num_objectives))
        query = u * fusion_scales(w, self.masks)                                        # [B, D]
        for name, arr in (("item_ids", item_ids), ("scores", scores), ("objective_scores", objective_scores)):
            if arr is not None and tuple(arr.shape[:2]) != (b, k):
                return f"{name} shape {arr.shape}, expected ({b}, {k}, ...)"
        for r in range(b):
            full = query[r] @ self.items.T                                              # exact scores, [N]
            kth = np.sort(full)[-k]
            tol = 1e-4 * max(1.0, float(np.abs(full).max()))
            if scores is not None and np.any(np.diff(scores[r]) > tol):
                return f"row {r}: scores not sorted"
            if item_ids is None:
                continue
            rows = [self.row_of.get(x if isinstance(x, bytes) else str(x).encode()) for x in item_ids[r]]
            if None in rows:
                return f"row {r}: unknown item id in {item_ids[r][:5]}"
            if len(set(rows)) != k:
                return f"row {r}: duplicate items"
            exact = full[rows]
            if scores is not None and not np.allclose(scores[r], exact, atol=tol, rtol=1e-5):
                return f"row {r}: scores are not this request's fused scores (max error " \
                       f"{np.abs(scores[r] - exact).max():.3g})"
            if objective_scores is not None:
                per_stage = (u[r] * self.items[rows]) @ self.masks.T                    # [k, S]
                if not np.allclose(objective_scores[r], per_stage, atol=tol, rtol=1e-5):
                    return f"row {r}: objective_scores are not this request's stage scores"
            recall = float(np.mean(exact >= kth - tol))
            with self._lock:
                self.recalls.append(recall)
                self.recall_negative_weights.append(bool(np.any(w[r] < 0)))
        return None
