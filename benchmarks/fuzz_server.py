"""Fuzz the model server over gRPC and REST: every request must get a status, none may crash the server.

    python benchmarks/fuzz_server.py                         # 10,000 requests, seed 0
    python benchmarks/fuzz_server.py --requests 500          # the short version the tests run
    python benchmarks/fuzz_server.py --model_base_path DIR   # fuzz a copy of DIR's model instead of a demo

The server runs as its own process (``python -m pipelines.serve``). Request ``i`` is generated from
``numpy.random.default_rng([seed, i])`` alone, so any case can be replayed (``--only I``) whatever the
thread interleaving. Generators (see ``GRPC_CASES`` / ``REST_CASES``):

- valid requests (random users incl. invalid UTF-8 / empty / 10 kB ids, per-row or shared weights incl.
  zero and negative ones, random ``k``, output filters, all four signatures): must answer OK, and
  every row of a retrieval answer must be *that request's* answer: the returned items' scores equal
  the exact fused scores of the request's own user vector (computed here from the exported tables),
  objective scores likewise, sorted, mostly the exact top-k. They run concurrently with the bad
  ones, so this also checks that micro-batching never mixes rows up. (Equality with the SavedModel's
  answer for the request alone is not required: ScaNN's candidates depend on the batch a query is
  searched in, which micro-batching changes.)
- wrong dtypes, ranks, shapes, batch sizes; oversized batches and messages; declared shapes of 2**62
  elements with one value; negative dimensions; tensor_content of the wrong length; unknown dtype
  enums; ``k`` of 0 / negative / int32 max; NaN / inf / huge weights; NaN / inf features; missing and
  extra inputs; unknown model / version / label / signature / output filter; undecodable protobuf
  bytes; the unimplemented RPCs; random GetModelMetadata / GetModelStatus requests;
- REST: random type swaps, ragged and 100,000-deep nesting, integers beyond int32/int64, NaN /
  Infinity literals, lone surrogates, bad base64, garbage / truncated / non-UTF-8 / non-object bodies,
  bodies above the limit, missing or chunked Content-Length, unknown paths, verbs, methods and
  versions, and raw bytes that are not HTTP at all.

Each case carries the set of statuses TF Serving's contract allows for it (e.g. only INVALID_ARGUMENT for
a dtype mismatch; the union when several faults are combined). A request *fails* the fuzz when its
status is outside that set, when it is a server fault (gRPC INTERNAL / UNKNOWN / DATA_LOSS, HTTP 500 /
502 / 503 / 504) or when no status arrives within ``--deadline_s``. At the end the server must still
be alive and answer a reference request exactly as before the fuzz. Prints the status distribution,
writes JSON (``--out``), exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_server import ServerProcess, export_demo, proc_status  # noqa: E402  (importing it puts the repo on sys.path)

from results_io import write_results  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
import csmf_tf  # noqa: E402,F401  (tf-keras before TensorFlow)
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     inference_pb2, model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

OK = "OK"
INVALID = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
EXHAUSTED = "RESOURCE_EXHAUSTED"
UNIMPLEMENTED = "UNIMPLEMENTED"
#: Statuses that mean the server failed (never acceptable for any request).
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "HTTP_500", "HTTP_502", "HTTP_503", "HTTP_504"}
CITIES = ("paris", "lyon", "nice", "lille")
NUMERIC_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                  np.uint16, np.uint32, np.uint64, np.bool_, np.complex64]


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


# -- gRPC generators ----------------------------------------------------------------------------------------
def _random_id(rng: np.random.Generator, ctx: Ctx) -> bytes:
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
    return {"user_id": np.array([_random_id(rng, ctx) for _ in range(b)], dtype=object),
            "age": rng.uniform(0, 100, b).astype(np.float32),
            "city": np.array([CITIES[int(i)] if rng.random() < 0.9 else "atlantis"
                              for i in rng.integers(0, len(CITIES), b)], dtype=object)}


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


def _grpc_predict(req: predict_pb2.PredictRequest | bytes) -> Callable[[Any], tuple[str, Any]]:
    def send(clients: "Clients") -> tuple[str, Any]:
        if isinstance(req, bytes):
            return clients.grpc_call(clients.raw_predict, req)
        return clients.grpc_call(clients.predict.Predict, req)
    return send


#: The dtype each serving_default input expects (object = strings).
EXPECTED_DTYPES = {"user_id": np.dtype(object), "city": np.dtype(object), "age": np.dtype(np.float32),
                   "objective_weights": np.dtype(np.float32), "k": np.dtype(np.int32)}


def _mutate_dtype(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    name = str(rng.choice(sorted(inputs)))
    value = np.asarray(inputs[name])
    choices = [np.dtype(d) for d in NUMERIC_DTYPES] + [np.dtype(object)]
    choices = [d for d in choices if d != EXPECTED_DTYPES.get(name)]   # never the right one
    dtype = choices[int(rng.integers(len(choices)))]
    with warnings.catch_warnings():   # NaN / large / complex values cast: any value will do
        warnings.simplefilter("ignore")
        if dtype == object:
            inputs[name] = np.full(value.shape, b"s", dtype=object)
        elif value.dtype == object or value.dtype.kind in "SU":
            inputs[name] = np.zeros(value.shape, dtype)
        else:
            inputs[name] = value.astype(dtype)
    return {INVALID}


def _mutate_shape(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    name = str(rng.choice(sorted(inputs)))
    value = np.asarray(inputs[name])
    r = rng.random()
    if name == "k":
        inputs[name] = np.full([int(d) for d in rng.integers(0, 3, int(rng.integers(1, 3)))], value)
    elif name == "objective_weights":
        shapes = [(ctx.S + 1,), (max(1, ctx.S - 1),), (1, 1, ctx.S), (), (2, ctx.S + 2), (0,)]
        inputs[name] = np.ones(shapes[int(rng.integers(len(shapes)))], np.float32)
        if r < 0.3:   # rows that match neither 1 nor the batch
            b = len(inputs["user_id"])
            inputs[name] = np.ones((b + 1 if b > 0 else 2, ctx.S), np.float32)
    elif r < 0.5:     # batch size differs from the other features
        b = value.shape[0] if value.ndim else 1
        inputs[name] = np.resize(value, (b + int(rng.integers(1, 4)),))
    else:             # rank 0, 2 or 3
        rank = [0, 2, 3][int(rng.integers(3))]
        inputs[name] = np.resize(value, [int(d) for d in rng.integers(1, 4, rank)]) if rank else value.reshape(-1)[0] \
            if value.size else np.zeros((), value.dtype)
    return {INVALID}


def _mutate_k(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    inputs["k"] = np.int32([0, -1, ctx.k_max + 1, 2 ** 31 - 1, -2 ** 31, int(rng.integers(ctx.k_max + 1, 10 ** 6))]
                           [int(rng.integers(6))])
    return {INVALID}


def _mutate_weights(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    b = len(inputs["user_id"]) if np.ndim(inputs["user_id"]) == 1 else 1
    w = rng.uniform(0, 2, (b, ctx.S) if rng.random() < 0.5 else ctx.S).astype(np.float32)
    bad = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
    w.reshape(-1)[int(rng.integers(w.size))] = bad
    inputs["objective_weights"] = w
    return {INVALID}


def _mutate_nonfinite_feature(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    age = np.asarray(inputs["age"], np.float32).copy()
    if age.ndim == 1 and age.size:
        age[int(rng.integers(age.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        inputs["age"] = age
        return {INVALID}
    return {INVALID, OK}


def _mutate_missing(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    del inputs[str(rng.choice(["user_id", "age", "city"]))]
    return {INVALID}


def _mutate_extra(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    name = ["extra", "K", "weights", "user_id ", "ü", "a" * 300, "__saved_model_init_op"][int(rng.integers(7))]
    inputs[name] = rng.standard_normal(int(rng.integers(1, 4))).astype(np.float32)
    return {INVALID}


def _mutate_proto(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    """Malformed TensorProtos: inflated / negative shapes, wrong content length, unknown dtype enum."""
    name = str(rng.choice(["user_id", "age", "city", "extra"]))
    r = int(rng.integers(5))
    p = tensor_pb2.TensorProto()
    if r == 0:      # one value, a huge declared shape (TF fills the rest with the last value)
        p.dtype = types_pb2.DT_FLOAT if name == "age" else types_pb2.DT_STRING
        if name == "age":
            p.float_val.append(1.0)
        else:
            p.string_val.append(b"u1")
        p.tensor_shape.dim.add(size=2 ** int(rng.integers(25, 63)))
        return_codes = {EXHAUSTED}
        if name == "extra":
            return_codes = {EXHAUSTED, INVALID}
    elif r == 1:    # negative dimension
        p.dtype = types_pb2.DT_FLOAT if name == "age" else types_pb2.DT_STRING
        p.tensor_shape.dim.add(size=-int(rng.integers(1, 2 ** 40)))
        return_codes = {INVALID}
    elif r == 2:    # tensor_content not a multiple of / not equal to the shape's byte size
        p.dtype = types_pb2.DT_FLOAT
        p.tensor_shape.dim.add(size=int(rng.integers(1, 5)))
        p.tensor_content = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
        return_codes = {INVALID}
    elif r == 3:    # a dtype enum no TensorFlow knows, or a reference / resource type
        p.dtype = int(rng.choice([999, 12345, types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, 101]))
        p.tensor_shape.dim.add(size=1)
        return_codes = {INVALID}
    else:           # declared shape with far more values than it holds, or rank 70
        p.dtype = types_pb2.DT_FLOAT
        if rng.random() < 0.5:
            for _ in range(70):
                p.tensor_shape.dim.add(size=1)
        else:
            p.tensor_shape.dim.add(size=2)
            p.float_val.extend([1.0, 2.0, 3.0, 4.0, 5.0])
        return_codes = {INVALID}
    inputs[name] = p
    return return_codes


def _mutate_big_batch(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    b = ctx.max_rows + int(rng.integers(1, 3000))
    inputs.update(valid_user_inputs(rng, ctx, b))
    inputs["user_id"] = np.array([b"u1"] * b, dtype=object)
    inputs.pop("objective_weights", None)
    return {EXHAUSTED}


def _mutate_big_message(rng: np.random.Generator, inputs: dict, ctx: Ctx) -> set[str]:
    b = len(inputs["user_id"]) if np.ndim(inputs["user_id"]) == 1 else 1
    size = ctx.max_bytes // max(b, 1) + int(rng.integers(1, 100_000))
    inputs["user_id"] = np.array([b"x" * size] * max(b, 1), dtype=object)
    return {EXHAUSTED}


GRPC_MUTATIONS: list[tuple[str, Callable, float]] = [
    ("dtype", _mutate_dtype, 3), ("shape", _mutate_shape, 3), ("k", _mutate_k, 2), ("weights", _mutate_weights, 2),
    ("nonfinite_feature", _mutate_nonfinite_feature, 1), ("missing", _mutate_missing, 1.5),
    ("extra", _mutate_extra, 1.5), ("proto", _mutate_proto, 3), ("big_batch", _mutate_big_batch, 0.4),
    ("big_message", _mutate_big_message, 0.15),
]


def _check_retrieval(reference: Any, inputs: dict[str, np.ndarray], k: int, output_filter: list[str]
                     ) -> Callable[[dict[str, np.ndarray]], str | None]:
    def check(outputs: dict[str, np.ndarray]) -> str | None:
        names = output_filter or ["item_ids", "scores", "objective_scores"]
        if sorted(outputs) != sorted(names):
            return f"outputs {sorted(outputs)}, expected {sorted(names)}"
        return reference.check_answer(inputs, k, outputs.get("item_ids"), outputs.get("scores"),
                                      outputs.get("objective_scores"))
    return check


def grpc_case(rng: np.random.Generator, ctx: Ctx, reference: Any) -> Case:
    """One random gRPC case."""
    r = rng.random()
    if r < 0.25:                                   # valid retrieval, compared with the SavedModel
        inputs = valid_retrieval_inputs(rng, ctx)
        req = predict_request(ctx, inputs, "serving_default" if rng.random() < 0.5 else None)
        flt: list[str] = []
        if rng.random() < 0.2:
            flt = sorted(set(rng.choice(["item_ids", "scores", "objective_scores"], int(rng.integers(1, 3)))))
            req.output_filter.extend(flt)
        k = int(inputs.get("k", reference.default_k))
        return Case("grpc", "valid_retrieval", {OK}, _grpc_predict(req), _check_retrieval(reference, inputs, k, flt))
    if r < 0.30:                                   # valid other signatures
        sig = ["user_embedding", "item_embedding", "model_info"][int(rng.integers(3))]
        if sig == "user_embedding":
            inputs = valid_user_inputs(rng, ctx)
        elif sig == "item_embedding":
            b = int(rng.integers(0, 6))
            inputs = {"item_id": np.array([f"i{int(i)}".encode() for i in rng.integers(0, 500, b)], dtype=object),
                      "category": np.array([b"c1"] * b, dtype=object)}
        else:
            inputs = {}
        return Case("grpc", f"valid_{sig}", {OK}, _grpc_predict(predict_request(ctx, inputs, sig)))
    if r < 0.72:                                   # 1-3 faults in an otherwise valid retrieval request
        inputs: dict[str, Any] = valid_retrieval_inputs(rng, ctx)
        names, weights = zip(*[(n, w) for n, _, w in GRPC_MUTATIONS])
        p = np.asarray(weights) / sum(weights)
        picked = rng.choice(len(GRPC_MUTATIONS), size=int(rng.integers(1, 4)), p=p, replace=False)
        expect: set[str] = set()
        kinds = []
        # The raw-TensorProto fault goes last: the other faults edit numpy values, not protos.
        for j in sorted(picked, key=lambda j: GRPC_MUTATIONS[int(j)][0] == "proto"):
            name, fn, _ = GRPC_MUTATIONS[int(j)]
            if name in ("k", "weights") and isinstance(inputs.get("user_id"), tensor_pb2.TensorProto):
                continue
            try:
                expect |= fn(rng, inputs, ctx)
            except (KeyError, ValueError, IndexError, TypeError):   # an earlier fault removed / replaced
                continue                                             # (by a raw TensorProto) what this edits
            kinds.append(name)
        if not kinds:
            expect = {OK}
        return Case("grpc", "fault:" + "+".join(sorted(set(kinds))) if kinds else "valid_retrieval",
                    expect, _grpc_predict(predict_request(ctx, inputs)))
    if r < 0.80:                                   # unknown model / version / label / signature / filter
        req = predict_request(ctx, valid_user_inputs(rng, ctx))
        what = int(rng.integers(5))
        if what == 0:
            req.model_spec.name = ["", "other", ctx.model_name.upper(), ctx.model_name + " ", "ü" * 50][int(rng.integers(5))]
        elif what == 1:
            req.model_spec.version.value = int(rng.choice([0, ctx.version + 1, 99, -1, 2 ** 63 - 1, -2 ** 63]))
        elif what == 2:
            req.model_spec.version_label = ["stable", "canary", "", "x" * 1000][int(rng.integers(4))] or "none"
        elif what == 3:
            req.model_spec.signature_name = ["ranking", "serving", "SERVING_DEFAULT", "__saved_model_init_op",
                                             "user_embedding "][int(rng.integers(5))]
        else:
            req.output_filter.append(["logits", "", "item_ids ", "scores\x00"][int(rng.integers(4))])
            return Case("grpc", "unknown_output_filter", {INVALID}, _grpc_predict(req))
        return Case("grpc", ["unknown_model", "unknown_version", "unknown_label", "unknown_signature"][what],
                    {NOT_FOUND}, _grpc_predict(req))
    if r < 0.88:                                   # bytes that are not (quite) a PredictRequest
        good = predict_request(ctx, valid_retrieval_inputs(rng, ctx)).SerializeToString()
        what = int(rng.integers(4))
        if what == 0:
            data = bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8))
        elif what == 1:
            data = good[: int(rng.integers(1, len(good)))]
        elif what == 2:   # model name with invalid UTF-8 (proto3 strings must be UTF-8)
            data = b"\x0a\x06\x0a\x04\xff\xfe\xfd\xfc"
        else:
            data = bytearray(good)
            for _ in range(int(rng.integers(1, 10))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            data = bytes(data)
        # Random bytes may happen to parse (unknown fields are skipped): then the model spec or the
        # inputs are what is wrong, or -- rarely -- a flipped byte landed in a value and it is valid.
        return Case("grpc", "undecodable_bytes", {INVALID, NOT_FOUND, EXHAUSTED, OK}, _grpc_predict(data))
    return _grpc_other_rpc(rng, ctx)


def _grpc_other_rpc(rng: np.random.Generator, ctx: Ctx) -> Case:
    what = int(rng.integers(6))
    if what == 0:
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = ctx.model_name if rng.random() < 0.7 else "other"
        fields = [f for f in ["signature_def", "signature_def", "x", ""] if rng.random() < 0.5]
        req.metadata_field.extend(fields)
        if req.model_spec.name != ctx.model_name:
            expect = {NOT_FOUND, INVALID}
        else:
            expect = {OK} if fields and all(f == "signature_def" for f in fields) else {INVALID}
        return Case("grpc", "get_model_metadata", expect,
                    lambda c: c.grpc_call(c.predict.GetModelMetadata, req))
    if what == 1:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = ctx.model_name if rng.random() < 0.7 else "other"
        v = int(rng.choice([0, ctx.version, ctx.version, ctx.version + 1, -3]))
        if rng.random() < 0.5:
            req.model_spec.version.value = v
        ok = req.model_spec.name == ctx.model_name and (not req.model_spec.HasField("version") or v == ctx.version)
        return Case("grpc", "get_model_status", {OK} if ok else {NOT_FOUND},
                    lambda c: c.grpc_call(c.model.GetModelStatus, req))
    stubs = [("Classify", classification_pb2.ClassificationRequest()), ("Regress", regression_pb2.RegressionRequest()),
             ("MultiInference", inference_pb2.MultiInferenceRequest()),
             ("HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest())]
    name, req = stubs[what - 2]
    return Case("grpc", f"unimplemented_{name}", {UNIMPLEMENTED},
                lambda c: c.grpc_call(getattr(c.model if name.startswith("Handle") else c.predict, name), req))


# -- REST generators ------------------------------------------------------------------------------------------
def _json_user_columns(rng: np.random.Generator, ctx: Ctx) -> dict[str, list]:
    b = int(rng.integers(1, 6))
    ids: list[Any] = []
    for _ in range(b):
        raw = _random_id(rng, ctx)
        try:
            ids.append(raw.decode("utf-8") if rng.random() < 0.8 else {"b64": base64.b64encode(raw).decode()})
        except UnicodeDecodeError:
            ids.append({"b64": base64.b64encode(raw).decode()})
    return {"user_id": ids, "age": [float(np.float32(x)) for x in rng.uniform(0, 100, b)],
            "city": [CITIES[int(i)] for i in rng.integers(0, len(CITIES), b)]}


def _random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    """Any JSON value (nested up to a few levels)."""
    r = int(rng.integers(10 if depth < 3 else 7))
    if r < 7:
        return [None, True, "x", 1, 2.5, "", {"b64": "AAAA"}][r]
    if r == 7:
        return {"a": _random_json(rng, depth + 1)}
    return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]


def _wrong_json(rng: np.random.Generator, is_string: bool, rows: int) -> Any:
    """A JSON value that can never be a valid [rows] column of the given kind."""
    leaves = [None, True, False, 1, 2.5, {"a": 1}, {"b64": 5}, []] if is_string else \
        [None, True, "x", "", {"a": 1}, {"b64": "AAAA"}, []]
    bad = leaves[int(rng.integers(len(leaves)))]
    r = int(rng.integers(4))
    if r == 0:
        return bad                                    # a scalar (or object) instead of a list
    if r == 1:
        return [bad] * max(rows, 1)                   # right length, wrong leaf type
    if r == 2:
        return [[bad]] * max(rows, 1)                 # one level too deep
    return [bad] * (rows + 1)                         # wrong length and type


def _rest_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[Any], tuple[str, Any]]:
    return lambda c: c.http("POST", path, body, headers)


def rest_case(rng: np.random.Generator, ctx: Ctx, reference: Any) -> Case:
    """One random REST case."""
    path = f"/v1/models/{ctx.model_name}:predict"
    r = rng.random()
    if r < 0.25:                                    # valid, columnar or row format
        cols = _json_user_columns(rng, ctx)
        b = len(cols["user_id"])
        inputs = {"user_id": np.array([base64.b64decode(u["b64"]) if isinstance(u, dict) else u.encode()
                                       for u in cols["user_id"]], dtype=object),
                  "age": np.asarray(cols["age"], np.float32), "city": np.array([c.encode() for c in cols["city"]],
                                                                               dtype=object)}
        if rng.random() < 0.5:
            body: dict[str, Any] = {"inputs": dict(cols)}
            if rng.random() < 0.5:
                w = rng.uniform(-1, 2, ctx.S).astype(np.float32)
                body["inputs"]["objective_weights"] = w.tolist()
                inputs["objective_weights"] = w
            if rng.random() < 0.6:
                k = int(rng.integers(1, ctx.k_max + 1))
                body["inputs"]["k"] = k
                inputs["k"] = np.int32(k)
            fmt = "columnar"
        else:
            body = {"instances": [{n: cols[n][i] for n in cols} for i in range(b)]}
            if rng.random() < 0.5:
                w = rng.uniform(-1, 2, (b, ctx.S)).astype(np.float32)
                for i in range(b):
                    body["instances"][i]["objective_weights"] = w[i].tolist()
                inputs["objective_weights"] = w
            fmt = "rows"
        if rng.random() < 0.3:
            body["signature_name"] = "serving_default"
        k = int(inputs.get("k", reference.default_k))
        return Case("rest", f"valid_{fmt}", {"HTTP_200"}, _rest_post(path, json.dumps(body).encode()),
                    _rest_check(reference, inputs, k, fmt))
    if r < 0.55:                                    # wrong JSON types / values
        cols: dict[str, Any] = _json_user_columns(rng, ctx)
        what = int(rng.integers(10))
        expect = {"HTTP_400"}
        if what == 0:
            name = str(rng.choice(sorted(cols)))
            cols[name] = _wrong_json(rng, name != "age", len(cols["age"]))
        elif what == 1:
            cols["age"] = [[1.0], [2.0, 3.0]]
        elif what == 2:
            depth = int(rng.choice([33, 100, 900, 5000, 100_000]))
            cols["age"] = "DEEP"
            text = json.dumps({"inputs": cols}).replace('"DEEP"', "[" * depth + "1" + "]" * depth)
            return Case("rest", "deep_nesting", expect, _rest_post(path, text.encode()))
        elif what == 3:
            cols["k"] = int(rng.choice([2 ** 31, 2 ** 32 + 5, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -2 ** 31 - 1, 0, -5]))
        elif what == 4:
            cols["k"] = [1.5, "5", True, None, [5], {"b64": "AAAA"}][int(rng.integers(6))]
        elif what == 5:
            text = json.dumps({"inputs": dict(cols, objective_weights=[1, 1, 1])}).replace(
                "[1, 1, 1]", ["[NaN, 1, 1]", "[1, Infinity, 1]", "[-Infinity, 0, 0]"][int(rng.integers(3))])
            return Case("rest", "nonfinite_literal", expect, _rest_post(path, text.encode()))
        elif what == 6:
            cols["age"] = [float(x) for x in rng.choice([1e39, -1e308, 1e308], len(cols["age"]))]
        elif what == 7:   # "\ud800" is valid JSON but no Unicode string: it has no UTF-8 form
            one = {k: v[:1] for k, v in cols.items()}
            text = json.dumps({"inputs": dict(one, user_id="SURR")}).replace('"SURR"', '["\\ud800"]')
            return Case("rest", "lone_surrogate", expect, _rest_post(path, text.encode()))
        elif what == 8:
            cols["user_id"] = [{"b64": s} for s in ["!!!", "AAA", "====", "\u00e9"][: len(cols["user_id"])]] or [{"b64": "!"}]
        else:
            cols[["extra", "K", ""][int(rng.integers(3))]] = [1.0]
        return Case("rest", f"bad_value_{what}", expect, _rest_post(path, json.dumps({"inputs": cols}).encode()))
    if r < 0.72:                                    # garbage bodies
        what = int(rng.integers(8))
        good = json.dumps({"inputs": _json_user_columns(rng, ctx)}).encode()
        if what == 0:
            body = bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8))
            return Case("rest", "garbage_body", {"HTTP_400"}, _rest_post(path, body))
        if what == 1:
            return Case("rest", "truncated_json", {"HTTP_400"}, _rest_post(path, good[: int(rng.integers(0, len(good)))]))
        if what == 2:
            return Case("rest", "non_object_json", {"HTTP_400"},
                        _rest_post(path, json.dumps([None, 1, "s", [1, 2], True][int(rng.integers(5))]).encode()))
        if what == 3:
            return Case("rest", "invalid_utf8", {"HTTP_400"}, _rest_post(path, good.replace(b'"u', b'"\xff\xfe', 1)))
        if what == 4:
            body = {"instances": _random_json(rng)} if rng.random() < 0.5 else {"inputs": _random_json(rng)}
            if rng.random() < 0.3:
                body = {"inputs": {}, "instances": []}
            return Case("rest", "bad_structure", {"HTTP_400"}, _rest_post(path, json.dumps(body).encode()))
        if what == 5:
            return Case("rest", "body_over_limit", {"HTTP_413"},
                        _rest_post(path, b" " * (ctx.max_bytes + int(rng.integers(1, 100_000)))))
        if what == 6:
            return Case("rest", "no_content_length", {"HTTP_411"},
                        lambda c: c.raw_http(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
        return Case("rest", "signature_name_type", {"HTTP_400"},
                    _rest_post(path, json.dumps({"signature_name": [1], "inputs": {}}).encode()))
    if r < 0.92:                                    # paths, verbs, methods, versions
        cols = _json_user_columns(rng, ctx)
        body = json.dumps({"inputs": cols}).encode()
        m = ctx.model_name
        options: list[tuple[str, str, bytes | None, set[str]]] = [
            ("POST", f"/v1/models/other:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/{ctx.version + 1}:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/{ctx.version}:predict", body, {"HTTP_200"}),
            ("POST", f"/v1/models/{m}/versions/99999999999999999999999:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/abc:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/versions/%C2%B2:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/versions/²:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/labels/stable:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}:classify", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}:regress", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}:explode", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}", body, {"HTTP_501"}),
            ("POST", f"/v2/models/{m}:predict", body, {"HTTP_404"}),
            ("POST", "/" + "a" * 5000, body, {"HTTP_404"}),
            ("GET", f"/v1/models/{m}", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version}", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version + 1}", None, {"HTTP_404"}),
            ("GET", f"/v1/models/{m}/metadata", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version}/metadata", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/labels/x", None, {"HTTP_400"}),
            ("GET", f"/v1/models/{m}:predict", None, {"HTTP_501"}),
            ("GET", "/", None, {"HTTP_404"}),
            ("PUT", f"/v1/models/{m}:predict", body, {"HTTP_405"}),
            ("DELETE", f"/v1/models/{m}", None, {"HTTP_405"}),
            ("PATCH", f"/v1/models/{m}", body, {"HTTP_405"}),
        ]
        method, p, b, expect = options[int(rng.integers(len(options)))]
        return Case("rest", f"route_{method}", expect, lambda c: c.http(method, p, b, None))
    # not HTTP at all: the HTTP layer must still answer with a status
    what = int(rng.integers(4))
    if what == 0:
        data = b"FROB /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        expect = {"HTTP_501"}
    elif what == 1:
        data = bytes(rng.integers(32, 127, int(rng.integers(5, 200)), dtype=np.uint8)) + b"\r\n\r\n"
        expect = {"HTTP_400", "HTTP_501"}     # malformed request line / unknown method
    elif what == 2:
        data = b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"
        expect = {"HTTP_414"}
    else:
        data = b"POST /v1/models/x:predict HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n"
        expect = {"HTTP_431"}
    return Case("rest", "not_http", expect, lambda c: c.raw_http(data))


def _rest_check(reference: Any, inputs: dict[str, np.ndarray], k: int, fmt: str) -> Callable[[Any], str | None]:
    def check(payload: bytes) -> str | None:
        body = json.loads(payload)
        rows = body["predictions"] if fmt == "rows" else None
        out = body["outputs"] if fmt == "columnar" else {n: [r[n] for r in rows] for n in rows[0]} if rows else {}
        ids = np.array([[x.encode() for x in row] for row in out["item_ids"]], dtype=object).reshape(-1, k)
        return reference.check_answer(inputs, k, ids, np.asarray(out["scores"], np.float32),
                                      np.asarray(out["objective_scores"], np.float32))
    return check


# -- transports -----------------------------------------------------------------------------------------------
class Clients:
    """Per-thread clients: one gRPC channel, fresh HTTP connections (some cases close them)."""

    def __init__(self, grpc_target: str, rest_host: str, rest_port: int, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.channel = grpc.insecure_channel(grpc_target, options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024)])
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.raw_predict = self.channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                                    request_serializer=lambda b: b,
                                                    response_deserializer=predict_pb2.PredictResponse.FromString)
        self.rest_host, self.rest_port = rest_host, rest_port

    def close(self) -> None:
        self.channel.close()

    def grpc_call(self, method: Callable, request: Any) -> tuple[str, Any]:
        """(status name, outputs as numpy or the response) -- ``NO_ANSWER`` when the deadline passed."""
        try:
            response = method(request, timeout=self.deadline_s)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "NO_ANSWER(deadline)", e.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                return "NO_ANSWER(unavailable)", e.details()
            return code.name, e.details()
        if isinstance(response, predict_pb2.PredictResponse):
            return OK, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        return OK, response

    def raw_http(self, data: bytes) -> tuple[str, Any]:
        """Send raw bytes on a new connection; the status from the first response line."""
        try:
            with socket.create_connection((self.rest_host, self.rest_port), timeout=self.deadline_s) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                buf = b""
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            return f"NO_ANSWER({type(e).__name__})", str(e)
        parts = buf.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return f"HTTP_{int(parts[1])}", buf
        return "NO_ANSWER(closed)", buf[:200]

    def http(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> tuple[str, Any]:
        """One request on a new connection; the body is sent while the answer is read, so a server that
        answers early (413) is heard even if it stops reading."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.rest_host}", "Connection: close"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + (body or b"")
        try:
            with socket.create_connection((self.rest_host, self.rest_port), timeout=self.deadline_s) as s:
                sender_error: list[BaseException] = []

                def send() -> None:
                    try:
                        s.sendall(data)
                    except OSError as e:   # the server answered and closed early; the answer is what counts
                        sender_error.append(e)

                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                chunks = []
                deadline = time.monotonic() + self.deadline_s
                while time.monotonic() < deadline:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                sender.join(timeout=self.deadline_s)
        except OSError as e:
            return f"NO_ANSWER({type(e).__name__})", str(e)
        raw = b"".join(chunks)
        head_end = raw.find(b"\r\n\r\n")
        first = raw.split(b"\r\n", 1)[0].split(b" ", 2)
        if head_end < 0 or len(first) < 2 or not first[1].isdigit():
            return "NO_ANSWER(incomplete)", raw[:200]
        return f"HTTP_{int(first[1])}", raw[head_end + 4:]


# -- reference answers ---------------------------------------------------------------------------------------
class Reference:
    """The exported model's own tables, to check each answer row against *its* request (see check_answer)."""

    def __init__(self, version_dir: Path) -> None:
        from scann import scann_ops  # noqa: F401  (registers the Scann ops the graph uses)

        loaded = tf.saved_model.load(str(version_dir))
        self._user_fn = loaded.signatures["user_embedding"]
        self.items = loaded.item_vectors.numpy().astype(np.float64)          # [N, D]
        self.masks = loaded.stage_masks.numpy().astype(np.float64)           # [S, D], M[t, j] = 1[s(j) <= t]
        self.row_of = {i: r for r, i in enumerate(loaded.item_ids.numpy())}  # item id (bytes) -> row
        config = json.loads((version_dir / "assets" / "config.json").read_text())
        self.k_max = int(config["k_max"])
        self.default_k = int(config["default_k"])
        self.num_objectives = int(config["num_objectives"])
        objectives = json.loads((version_dir / "assets" / "objectives.json").read_text())
        self.default_weights = np.asarray(objectives["default_weights"], np.float32)
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
        query = u * (w @ self.masks)                                                    # [B, D]
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


# -- the run ------------------------------------------------------------------------------------------------
def make_case(seed: int, i: int, ctx: Ctx, reference: Reference, rest_share: float) -> Case:
    """Case ``i`` of the run with ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, i])
    return rest_case(rng, ctx, reference) if rng.random() < rest_share else grpc_case(rng, ctx, reference)


def _mean_where(values: list[float], flags: list[bool], flag: bool) -> float | None:
    picked = [v for v, f in zip(values, flags) if f == flag]
    return float(np.mean(picked)) if picked else None


def run_fuzz(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole fuzz (see module docstring); returns JSON-able results with ``passed``."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fuzz_server_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "models"
    if args.model_base_path:
        shutil.copytree(Path(args.model_base_path) / args.model_name, base / args.model_name,
                        ignore=shutil.ignore_patterns(".tmp-*"))
    else:
        export_demo(base, args.model_name, args.num_items, args.num_users, args.dim, 0, workdir / "export.log")
    versions = sorted(int(p.name) for p in (base / args.model_name).iterdir() if p.name.isdigit())
    version_dir = base / args.model_name / str(versions[-1])
    reference = Reference(version_dir)
    ctx = Ctx(args.model_name, versions[-1], reference.k_max, reference.num_objectives, args.num_users, args.max_message_bytes,
              args.max_request_batch_size)
    server = ServerProcess(base, args.model_name, workdir, [
        "--file_system_poll_wait_seconds", "0", "--max_message_bytes", str(args.max_message_bytes),
        "--max_request_batch_size", str(args.max_request_batch_size), "--request_timeout_s", "30"])
    log(f"server pid {server.pid}: gRPC {server.grpc_target}, REST {server.rest_host}:{server.rest_port}")
    rss_before = proc_status(server.pid)

    # A reference request answered before the fuzz; the same request must get the same answer after.
    probe_inputs = {"user_id": np.array([b"u1", b"u2"], dtype=object), "age": np.array([30.0, 41.5], np.float32),
                    "city": np.array([b"paris", b"nice"], dtype=object),
                    "objective_weights": np.array([1.0, 0.5, 2.0], np.float32)[: ctx.S], "k": np.int32(min(7, ctx.k_max))}
    probe = Clients(server.grpc_target, server.rest_host, server.rest_port, args.deadline_s)
    status, before = probe.grpc_call(probe.predict.Predict, predict_request(ctx, probe_inputs))
    if status != OK:
        raise RuntimeError(f"the server did not answer the reference request: {status} {before}")

    indices = [args.only] if args.only is not None else list(range(args.requests))
    records: list[dict[str, Any] | None] = [None] * len(indices)
    next_index = iter(range(len(indices)))
    index_lock = threading.Lock()
    t0 = time.monotonic()

    def worker() -> None:
        clients = Clients(server.grpc_target, server.rest_host, server.rest_port, args.deadline_s)
        try:
            while True:
                with index_lock:
                    j = next(next_index, None)
                if j is None or not server.alive():
                    return
                i = indices[j]
                try:
                    case = make_case(args.seed, i, ctx, reference, args.rest_share)
                except Exception as e:  # noqa: BLE001 - a bug in a generator must not end the run silently
                    records[j] = {"i": i, "transport": "?", "kind": "generator", "status": "GENERATOR_ERROR",
                                  "expected": [], "seconds": 0.0, "problem": None, "detail": repr(e)[:300]}
                    continue
                start = time.monotonic()
                try:
                    status, payload = case.send(clients)
                except Exception as e:  # noqa: BLE001 - a client-side failure to send is recorded as such
                    status, payload = f"CLIENT_ERROR({type(e).__name__})", str(e)
                took = time.monotonic() - start
                problem = None
                if status in (OK, "HTTP_200") and case.check is not None and status in case.expect:
                    try:
                        problem = case.check(payload)
                    except Exception as e:  # noqa: BLE001
                        problem = f"answer check raised {type(e).__name__}: {e}"
                records[j] = {"i": i, "transport": case.transport, "kind": case.kind, "status": status,
                              "expected": sorted(case.expect), "seconds": took, "problem": problem,
                              "detail": (payload if isinstance(payload, str) else
                                         payload.decode(errors="replace") if isinstance(payload, bytes) else "")[:300]
                              if status not in (OK, "HTTP_200") else ""}
        finally:
            clients.close()

    threads = [threading.Thread(target=worker, name=f"fuzz-{n}") for n in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0

    alive = server.alive()
    after_status, after = (probe.grpc_call(probe.predict.Predict, predict_request(ctx, probe_inputs))
                           if alive else ("NO_ANSWER(dead)", None))
    same_answer = (after_status == OK and np.array_equal(after["item_ids"], before["item_ids"])
                   and np.allclose(after["scores"], before["scores"], atol=1e-6))
    probe.close()
    rss_after = proc_status(server.pid) if alive else {}
    exit_code = server.terminate()
    server.kill()

    done = [r for r in records if r is not None]
    by_status = collections.Counter(f"{r['transport']}:{r['status']}" for r in done)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in done:
        by_kind[f"{r['transport']}:{r['kind'].split(':')[0]}"][r["status"]] += 1
    failures = []
    for r in done:
        reason = None
        if r["status"].startswith("NO_ANSWER") or r["status"].startswith("CLIENT_ERROR"):
            reason = "no status within the deadline"
        elif r["status"] in SERVER_FAULTS:
            reason = "server fault status"
        elif r["status"] not in r["expected"]:
            reason = "unexpected status"
        elif r["problem"]:
            reason = "wrong answer"
        if reason:
            failures.append(dict(r, reason=reason))
    slowest = sorted(done, key=lambda r: -r["seconds"])[:5]
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: v for k, v in vars(args).items()},
        "requests": len(done), "requests_planned": len(indices), "seconds": elapsed,
        "status_distribution": dict(sorted(by_status.items())),
        "status_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failures": len(failures), "failures_by_reason": dict(collections.Counter(f["reason"] for f in failures)),
        "failure_examples": failures[:30],
        "server_fault_statuses": sum(1 for r in done if r["status"] in SERVER_FAULTS),
        "no_answer": sum(1 for r in done if r["status"].startswith(("NO_ANSWER", "CLIENT_ERROR"))),
        "slowest": [{k: r[k] for k in ("i", "transport", "kind", "status", "seconds")} for r in slowest],
        "max_seconds": max((r["seconds"] for r in done), default=0.0),
        "answer_rows_checked": len(reference.recalls),
        "mean_recall_vs_exact": float(np.mean(reference.recalls)) if reference.recalls else None,
        "min_recall_vs_exact": float(np.min(reference.recalls)) if reference.recalls else None,
        "rows_recall_below_half": int(np.sum(np.asarray(reference.recalls) < 0.5)),
        "mean_recall_rows_with_negative_weights": _mean_where(reference.recalls, reference.recall_negative_weights, True),
        "mean_recall_rows_without_negative_weights": _mean_where(reference.recalls, reference.recall_negative_weights,
                                                                 False),
        "server_alive_at_end": alive, "reference_answer_after": after_status,
        "reference_answer_unchanged": bool(same_answer), "server_exit_code": exit_code,
        "rss_before_mb": rss_before.get("rss_mb"), "rss_after_mb": rss_after.get("rss_mb"),
        "threads_before": rss_before.get("threads"), "threads_after": rss_after.get("threads"),
        "workdir": str(workdir),
    }
    results["crashes"] = 0 if alive and exit_code == 0 else 1
    recall_ok = results["mean_recall_vs_exact"] is None or results["mean_recall_vs_exact"] >= args.min_mean_recall
    results["passed"] = (not failures and alive and bool(same_answer) and exit_code == 0
                         and len(done) == len(indices) and recall_ok)
    if not alive or exit_code != 0:
        results["server_log_tail"] = server.log_tail()
    return results


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def report(r: dict[str, Any]) -> str:
    """Human-readable summary."""
    lines = [f"requests           {r['requests']:,} in {r['seconds']:.1f}s (slowest {r['max_seconds']:.2f}s)",
             "status distribution:"]
    for k, v in r["status_distribution"].items():
        lines.append(f"  {k:<40} {v:>6}")
    lines += [f"server faults      {r['server_fault_statuses']} (INTERNAL/UNKNOWN/5xx)",
              f"no status in time  {r['no_answer']}",
              f"failures           {r['failures']} {r['failures_by_reason'] or ''}"]
    for f in r["failure_examples"][:10]:
        lines.append(f"  #{f['i']} {f['transport']} {f['kind']}: {f['status']} (expected {f['expected']}) "
                     f"{f['reason']} {f['problem'] or ''} {f['detail'][:150]!r}")
    lines += [f"server             alive at end: {r['server_alive_at_end']}, reference answer after the fuzz: "
              f"{r['reference_answer_after']} (unchanged: {r['reference_answer_unchanged']}), exit code after "
              f"SIGTERM: {r['server_exit_code']}, crashes: {r['crashes']}",
              f"answers checked    {r['answer_rows_checked']} rows of valid retrievals: scores exact for the "
              f"request; share of items in the exact top-k: mean {_fmt(r['mean_recall_vs_exact'])} (rows with a "
              f"negative weight {_fmt(r['mean_recall_rows_with_negative_weights'])}, others "
              f"{_fmt(r['mean_recall_rows_without_negative_weights'])}), {r['rows_recall_below_half']} rows below 0.5",
              f"server RSS         {r['rss_before_mb']} MB -> {r['rss_after_mb']} MB, threads "
              f"{r['threads_before']} -> {r['threads_after']}",
              "PASSED" if r["passed"] else "FAILED"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, help="replay only case I of this seed")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (bad and good requests interleave)")
    p.add_argument("--rest_share", type=float, default=0.4)
    p.add_argument("--deadline_s", type=float, default=30.0, help="a request without a status by then fails")
    p.add_argument("--max_message_bytes", type=int, default=4 * 1024 * 1024, help="server flag")
    p.add_argument("--max_request_batch_size", type=int, default=256, help="server flag")
    p.add_argument("--min_mean_recall", type=float, default=0.8,
                   help="fail when valid answers hold fewer exact top-k items than this on average (the index "
                        "is approximate; random items would score about k / num_items)")
    p.add_argument("--model_base_path", help="fuzz a copy of <this>/<model_name> instead of a new demo export")
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--num_items", type=int, default=2000)
    p.add_argument("--num_users", type=int, default=200)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--workdir")
    p.add_argument("--out", default="results/fuzz_server.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz, print the summary, write JSON; exit status 0 only if it passed."""
    args = build_parser().parse_args(argv)
    results = run_fuzz(args, log=lambda s: print(s, flush=True))
    print(report(results), flush=True)
    write_results(results, args.out)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
