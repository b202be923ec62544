"""Names shared by the exporter, the server and the clients (kept free of heavy imports)."""
from __future__ import annotations

import os

#: Retrieval signature (TF Serving's default signature key) and its reserved inputs / outputs.
RETRIEVAL_SIGNATURE = "serving_default"
WEIGHTS_INPUT = "objective_weights"
K_INPUT = "k"
OUTPUT_ITEM_IDS = "item_ids"
OUTPUT_SCORES = "scores"
OUTPUT_OBJECTIVE_SCORES = "objective_scores"
#: The other signatures of an exported CSMF model.
USER_EMBEDDING_SIGNATURE = "user_embedding"
ITEM_EMBEDDING_SIGNATURE = "item_embedding"
MODEL_INFO_SIGNATURE = "model_info"
#: TF Serving replays this file (PredictionLog TFRecords) before a version goes live; so does our server.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
#: The export's own description of itself, under ``assets/``.
CONFIG_ASSET = "config.json"
#: Signature keys that are not servable functions.
INIT_OP_SIGNATURE = "__saved_model_init_op"
#: The export's recall check (csmf_tf.serving.recall): default floor, sample size, and what a recall below
#: the floor does.
DEFAULT_MIN_ANN_RECALL = 0.9
DEFAULT_ANN_RECALL_QUERIES = 500
ANN_RECALL_FAIL, ANN_RECALL_WARN = "fail", "warn"
ANN_RECALL_ACTIONS = (ANN_RECALL_FAIL, ANN_RECALL_WARN)
