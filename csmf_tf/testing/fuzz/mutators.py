"""Faults injected into an otherwise valid gRPC retrieval request, each with the statuses it allows.

A mutator edits the request's inputs in place and returns the acceptable statuses; :data:`GRPC_MUTATIONS`
lists them with their sampling weights (:func:`csmf_tf.testing.fuzz.grpc_cases.grpc_case` combines 1-3).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from csmf_tf.testing.fuzz.cases import EXHAUSTED, INVALID, OK, Ctx, valid_user_inputs

NUMERIC_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                  np.uint16, np.uint32, np.uint64, np.bool_, np.complex64]


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
