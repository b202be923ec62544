"""SignatureDef-driven request validation, shared by the gRPC and REST front ends.

Everything here is read from the SavedModel's own ``saved_model.pb`` (the SignatureDefs TF Serving
reports in GetModelMetadata), so the server validates requests for any exported model, not only CSMF's.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from csmf_tf.serving.errors import ServingError, invalid


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    """Dtype and shape of one signature input/output (``shape`` is ``None`` for unknown rank)."""

    name: str
    dtype: tf.DType
    shape: tuple[int | None, ...] | None
    # Looked up once: tf.DType comparisons and conversions cost microseconds on every request.
    numpy_dtype: np.dtype = dataclasses.field(init=False, repr=False, compare=False)
    dtype_enum: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numpy_dtype", numpy_dtype(self.dtype))
        object.__setattr__(self, "dtype_enum", self.dtype.as_datatype_enum)

    @staticmethod
    def from_proto(name: str, info: meta_graph_pb2.TensorInfo) -> "TensorSpecInfo":
        """From a SignatureDef's TensorInfo."""
        shape = None if info.tensor_shape.unknown_rank else tuple(
            None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
        return TensorSpecInfo(name, tf.as_dtype(info.dtype), shape)

    @property
    def batched(self) -> bool:
        """True when dimension 0 is the (variable) batch dimension."""
        return self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None

    def describe(self) -> str:
        """``float32 [?, 3]`` style description for error messages."""
        dims = "unknown rank" if self.shape is None else "[" + ", ".join(
            "?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype.name} {dims}"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """One SignatureDef: its inputs, outputs and input defaults."""

    name: str
    method_name: str
    inputs: dict[str, TensorSpecInfo]
    outputs: dict[str, TensorSpecInfo]
    defaults: dict[str, np.ndarray]

    @staticmethod
    def from_proto(name: str, sig: meta_graph_pb2.SignatureDef) -> "SignatureInfo":
        """From a SavedModel SignatureDef (defaults decoded to numpy)."""
        defaults = {k: tf.make_ndarray(v) for k, v in sig.defaults.items()}
        return SignatureInfo(
            name, sig.method_name,
            {k: TensorSpecInfo.from_proto(k, v) for k, v in sig.inputs.items()},
            {k: TensorSpecInfo.from_proto(k, v) for k, v in sig.outputs.items()},
            defaults)

    def required_inputs(self) -> list[str]:
        """Inputs a request must carry (the others have SignatureDef defaults)."""
        return sorted(k for k in self.inputs if k not in self.defaults)


def numpy_dtype(dtype: tf.DType) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` is held in (strings as ``object`` of ``bytes``)."""
    return np.dtype(object) if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)


def check_dtype_enum(name: str, spec: TensorSpecInfo, proto_dtype: int) -> None:
    """TF Serving refuses a tensor whose dtype differs from the signature's (no implicit casts)."""
    if proto_dtype != spec.dtype_enum:
        got = types_pb2.DataType.Name(proto_dtype) if proto_dtype in types_pb2.DataType.values() \
            else str(proto_dtype)
        raise invalid(f"input {name!r}: expects dtype {spec.dtype.name} "
                      f"({types_pb2.DataType.Name(spec.dtype.as_datatype_enum)}) but got {got}")


def validate_inputs(sig: SignatureInfo, inputs: Mapping[str, np.ndarray],
                    max_batch_size: int | None = None) -> tuple[dict[str, np.ndarray], int | None]:
    """Check a request against the signature and fill in defaults.

    Returns ``(inputs with defaults, batch size or None)``. Raises INVALID_ARGUMENT for unknown or
    missing inputs, wrong dtype or shape and inconsistent batch sizes, RESOURCE_EXHAUSTED above
    ``max_batch_size`` rows.
    """
    unknown = sorted(set(inputs) - set(sig.inputs))
    if unknown:
        raise invalid(f"input(s) {unknown} not in signature {sig.name!r}; expected "
                      f"{sorted(sig.inputs)}")
    missing = [k for k in sig.required_inputs() if k not in inputs]
    if missing:
        raise invalid(f"missing input(s) {missing} for signature {sig.name!r} (required: "
                      f"{sig.required_inputs()}, optional: {sorted(sig.defaults)})")
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    batch_of: str | None = None
    for name, spec in sig.inputs.items():
        if name not in inputs:
            out[name] = sig.defaults[name]
            continue
        value = np.asarray(inputs[name])
        want = spec.numpy_dtype
        if want == object:
            if value.dtype != object and value.dtype.kind not in ("S", "U"):
                raise invalid(f"input {name!r}: expects dtype string but got {value.dtype}")
        elif value.dtype != want:
            raise invalid(f"input {name!r}: expects dtype {spec.dtype.name} but got {value.dtype}")
        if spec.shape is not None:
            if value.ndim != len(spec.shape) or any(
                    d is not None and d != got for d, got in zip(spec.shape, value.shape)):
                raise invalid(f"input {name!r}: expects shape {spec.describe()} but got "
                              f"{list(value.shape)}")
        if spec.batched:
            if batch is None:
                batch, batch_of = value.shape[0], name
            elif value.shape[0] != batch:
                raise invalid(f"inputs {batch_of!r} and {name!r} have different batch sizes "
                              f"({batch} vs {value.shape[0]})")
        out[name] = value
    if max_batch_size is not None and batch is not None and batch > max_batch_size:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request batch size {batch} exceeds the server's limit of {max_batch_size}")
    return out, batch
