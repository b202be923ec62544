"""What every fuzz case is made of: the statuses it may get, the context, valid requests to start from.

A case (:class:`Case`) knows how to send itself and which statuses TF Serving's contract allows for
it; the generators (:mod:`.grpc_cases`, :mod:`.rest_cases`) start from the valid requests built here
and break them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from csmf_tf.testing.demo import DEMO_CITIES

OK = "OK"
INVALID = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
EXHAUSTED = "RESOURCE_EXHAUSTED"
UNIMPLEMENTED = "UNIMPLEMENTED"
#: Statuses that mean the server failed (never acceptable for any request).
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "HTTP_500", "HTTP_502", "HTTP_503", "HTTP_504"}


class Ctx:
    """What the generators need to know about the served model and the server's limits."""

    def __init__(self, model_name: str, version: int, k_max: int, num_objectives: int, num_users: int,
                 max_bytes: int, max_rows: int) -> None:
        self.model_name = model_name
        self.version = version          # the one served version
        self.k_max = k_max
        self.S = num_objectives
        self.num_users = num_users
        self.max_bytes = max_bytes
        self.max_rows = max_rows


class Case:
    """One fuzzed request: how to send it and which statuses are acceptable."""

    def __init__(self, transport: str, kind: str, expect: set[str], send: Callable[[Any], tuple[str, Any]],
                 check: Callable[[Any], str | None] | None = None) -> None:
        self.transport = transport
        self.kind = kind
        self.expect = expect
        self.send = send        # (clients) -> (status, payload)
        self.check = check      # payload of an OK answer -> None or what is wrong


def random_id(rng: np.random.Generator, ctx: Ctx) -> bytes:
    """A user id: mostly known, else empty, random bytes (often invalid UTF-8), non-ASCII or 1-10 kB."""
    r = rng.random()
    if r < 0.6:
        return f"u{int(rng.integers(ctx.num_users))}".encode()
    if r < 0.7:
        return b""
    if r < 0.8:
        return bytes(rng.integers(0, 256, int(rng.integers(1, 20)), dtype=np.uint8))   # often invalid UTF-8
    if r < 0.9:
        return "用户-😀-ü".encode()
    return b"x" * int(rng.integers(1000, 10_000))


def valid_user_inputs(rng: np.random.Generator, ctx: Ctx, rows: int | None = None) -> dict[str, np.ndarray]:
    """Well-formed user features for ``rows`` query rows."""
    b = int(rows if rows is not None else rng.integers(1, 9))
    return {"user_id": np.array([random_id(rng, ctx) for _ in range(b)], dtype=object),
            "age": rng.uniform(0, 100, b).astype(np.float32),
            "city": np.array([DEMO_CITIES[int(i)] if rng.random() < 0.9 else "atlantis"
                              for i in rng.integers(0, len(DEMO_CITIES), b)], dtype=object)}


def valid_retrieval_inputs(rng: np.random.Generator, ctx: Ctx) -> dict[str, np.ndarray]:
    """User features plus (sometimes) weights [S] or [B, S] and k, all valid."""
    inputs = valid_user_inputs(rng, ctx)
    b = len(inputs["user_id"])
    r = rng.random()
    if r < 0.35:
        inputs["objective_weights"] = rng.uniform(-2, 3, ctx.S).astype(np.float32)
    elif r < 0.7:
        inputs["objective_weights"] = rng.uniform(-2, 3, (b, ctx.S)).astype(np.float32)
    elif r < 0.8:
        inputs["objective_weights"] = np.zeros(ctx.S, np.float32)
    if rng.random() < 0.7:
        inputs["k"] = np.int32(rng.integers(1, ctx.k_max + 1))
    return inputs


def predict_request(ctx: Ctx, inputs: dict[str, Any], signature: str | None = None) -> predict_pb2.PredictRequest:
    """A PredictRequest; values that are already TensorProtos are used as they are."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = ctx.model_name
    if signature is not None:
        req.model_spec.signature_name = signature
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(v if isinstance(v, tensor_pb2.TensorProto) else tf.make_tensor_proto(v))
    return req
