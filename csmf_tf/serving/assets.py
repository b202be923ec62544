"""The files of a version beside its SavedModel: ``assets/`` and the warm-up request.

``assets/config.json`` is the export's own description (:func:`csmf_tf.serving.export.build_serving_module`);
``objectives.json`` and ``ownership.json`` are views of it for readers that want only that part;
``item_vocab.txt`` lists the item ids in index row order. ``assets.extra/tf_serving_warmup_requests``
holds one ``PredictionLog`` that TF Serving (and our server) replays before the version goes live.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from csmf_tf.serving.constants import CONFIG_ASSET, K_INPUT, RETRIEVAL_SIGNATURE, WARMUP_FILE, WEIGHTS_INPUT
from csmf_tf.serving.module import RetrievalServingModule
from csmf_tf.serving.tower_inputs import placeholder_inputs, to_tensor

_RESERVED_ASSETS = (CONFIG_ASSET, "objectives.json", "ownership.json", "item_vocab.txt")


def write_assets(export_dir: Path, config: Mapping[str, Any], item_ids: np.ndarray,
                 extra_assets: Mapping[str, Any] | None) -> None:
    """Write ``assets/`` (see module docstring); ``extra_assets`` as for ``export_retrieval_model``."""
    assets = export_dir / "assets"
    assets.mkdir(exist_ok=True)
    ownership = config["ownership"]
    (assets / CONFIG_ASSET).write_text(json.dumps(config, indent=2, sort_keys=True))
    (assets / "objectives.json").write_text(json.dumps(
        {"objectives": config["objectives"], "default_weights": config["default_weights"]}, indent=2))
    (assets / "ownership.json").write_text(json.dumps(
        {"owner_stage": ownership["owner_stage"], "blocks": ownership["blocks"],
         "dims_per_stage": {o: len(d) for o, d in ownership["blocks"].items()}}, indent=2))
    # One id per line, row order = index row order (what the index returns before the id lookup).
    (assets / "item_vocab.txt").write_text("".join(f"{i}\n" for i in item_ids))
    for name, value in (extra_assets or {}).items():
        if name in _RESERVED_ASSETS or "/" in name or "\\" in name or name.startswith(".") or not name:
            raise ValueError(f"extra asset name {name!r} is reserved or not a plain file name")
        path = assets / name
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif isinstance(value, str):
            path.write_text(value)
        elif name.endswith(".txt") and isinstance(value, (list, tuple, np.ndarray)):
            path.write_text("".join(f"{v}\n" for v in value))   # a vocabulary, one entry per line
        else:
            path.write_text(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"extra asset value of type {type(obj).__name__} is not JSON serialisable")


def warmup_request(module: RetrievalServingModule, user_inputs: Mapping[str, Any] | None) -> dict[str, tf.Tensor]:
    """A complete ``serving_default`` request for one user: ``user_inputs`` (out-of-vocabulary
    placeholders when ``None``) plus the default weights and ``k`` spelled out, so that servers
    without SignatureDef defaults replay it too."""
    if user_inputs is None:
        request = placeholder_inputs(module.user_spec)
    else:
        request = {n: to_tensor(np.atleast_1d(np.asarray(user_inputs[n], dtype=object
                                                         if s.dtype == tf.string else None)), s)
                   for n, s in module.user_spec.items()}
    request[WEIGHTS_INPUT] = tf.constant(module.default_weights.numpy())
    request[K_INPUT] = tf.constant(module.default_k, tf.int32)
    return request


def write_warmup(export_dir: Path, model_name: str, inputs: Mapping[str, tf.Tensor]) -> None:
    """Write TF Serving's warm-up file: one PredictLog for ``serving_default``."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = RETRIEVAL_SIGNATURE
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value.numpy() if hasattr(value, "numpy")
                                                           else value))
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    (export_dir / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(export_dir / WARMUP_FILE)) as writer:
        writer.write(record.SerializeToString())
