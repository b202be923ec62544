"""A smoke check of a served export: start the server, query it once over gRPC and once over REST.

Used at the end of the main job (``pipelines/serve_demo.py``) and by the tests; the clients themselves
never start a server.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from csmf_tf.serving.client import GrpcRetrievalClient, RestRetrievalClient
from csmf_tf.serving.server import ModelServer


def serve_and_query_once(model_base_path: str | os.PathLike, model_name: str, user_inputs: Mapping[str, Any],
                         weights: Sequence[float] | None, k: int, verbose: bool = True) -> dict:
    """Serve ``model_base_path`` (the model's directory, holding its versions) as ``model_name`` on
    ephemeral ports, query it once over gRPC and once over REST, stop it.

    Returns ``{"version", "grpc_port", "rest_port", "grpc": {...}, "rest": {...}, "agree": True}``;
    raises ``RuntimeError`` if the two answers differ (same ids in the same order, scores within 1e-5).
    """
    server = ModelServer(model_base_path, model_name, port=0, rest_api_port=0, poll_interval_s=0)
    grpc_port, rest_port = server.start()
    try:
        with GrpcRetrievalClient(server.grpc_target, model_name) as g:
            via_grpc = g.retrieve(user_inputs, weights, k)
        via_rest = RestRetrievalClient(server.rest_url, model_name).retrieve(user_inputs, weights, k)
        via_rest.version = via_grpc.version
    finally:
        server.stop()
    agree = (via_grpc.item_ids == via_rest.item_ids
             and np.allclose(via_grpc.scores, via_rest.scores, atol=1e-5)
             and np.allclose(via_grpc.objective_scores, via_rest.objective_scores, atol=1e-5))
    result = {"version": via_grpc.version, "grpc_port": grpc_port, "rest_port": rest_port,
              "grpc": via_grpc.to_dict(), "rest": via_rest.to_dict(), "agree": bool(agree)}
    if verbose:
        print(f"model {model_name} version {via_grpc.version}: gRPC (port {grpc_port})")
        print(via_grpc.format())
        print(f"REST (port {rest_port}): {'same results' if agree else 'DIFFERENT results'}")
    if not agree:
        raise RuntimeError("gRPC and REST returned different results:\n"
                           f"{via_grpc.format()}\nvs\n{via_rest.format()}")
    return result
