"""Serving for CSMF retrieval models: export, a TF Serving-compatible server, clients.

- :func:`export_retrieval_model` (``csmf_tf.serving.export``): towers + ScaNN / exact index -> SavedModel
  in TF Serving's ``<base>/<name>/<version>/`` layout (atomic, verified).
- :class:`ModelServer` (``csmf_tf.serving.server``): gRPC PredictionService / ModelService and the REST API,
  one model or a TF Serving model config file (reloaded while serving), hot-swapping new versions,
  micro-batching, limits, Prometheus metrics.
- :class:`GrpcRetrievalClient`, :class:`RestRetrievalClient` (``csmf_tf.serving.client``).

Test and demo support (untrained towers, a gRPC + REST smoke check, the fuzz harness) lives in
:mod:`csmf_tf.testing`.

Attributes are imported lazily so that importing a client does not pull in the exporter (TFRS) and the
server never imports training code.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_retrieval_model": "csmf_tf.serving.export",
    "build_serving_module": "csmf_tf.serving.export",
    "ScannOptions": "csmf_tf.serving.index",
    "RetrievalServingModule": "csmf_tf.serving.module",
    "ModelServer": "csmf_tf.serving.server",
    "ServerOptions": "csmf_tf.serving.server",
    "ModelConfigError": "csmf_tf.serving.model_config",
    "BatchingOptions": "csmf_tf.serving.batching",
    "Limits": "csmf_tf.serving.core",
    "GrpcRetrievalClient": "csmf_tf.serving.client",
    "RestRetrievalClient": "csmf_tf.serving.client",
    "RetrievalResult": "csmf_tf.serving.client",
    "ServingClientError": "csmf_tf.serving.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'csmf_tf.serving' has no attribute {name!r}")
