"""TensorProto <-> numpy for the gRPC front end, with malformed protos refused as INVALID_ARGUMENT.

Dtypes are checked on the proto, before decoding, as TF Serving does (no implicit casts), and the
declared shape is bounded before anything is allocated. The fast paths cover what retrieval requests
and answers carry; anything else goes through TensorFlow's own ``make_ndarray`` / ``make_tensor_proto``.
"""
from __future__ import annotations

import math
import sys
from typing import Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from csmf_tf.serving.errors import ServingError, invalid
from csmf_tf.serving.signatures import SignatureInfo, TensorSpecInfo


def decode_inputs(protos: Mapping[str, tensor_pb2.TensorProto], sig: SignatureInfo,
                  max_elements: int | None) -> dict[str, np.ndarray]:
    """A PredictRequest's inputs as numpy; inputs the signature lacks are left to the validation."""
    out = {}
    specs = sig.inputs
    for name, proto in protos.items():
        spec = specs.get(name)
        if spec is not None and proto.dtype != spec.dtype_enum:
            _refuse_dtype(name, spec, proto.dtype)
        out[name] = tensor_proto_to_numpy(proto, max_elements, name)
    return out


def _refuse_dtype(name: str, spec: TensorSpecInfo, proto_dtype: int) -> None:
    """TF Serving refuses a tensor whose dtype differs from the signature's (no implicit casts)."""
    got = types_pb2.DataType.Name(proto_dtype) if proto_dtype in types_pb2.DataType.values() else str(proto_dtype)
    raise invalid(f"input {name!r}: expects dtype {spec.dtype.name} "
                  f"({types_pb2.DataType.Name(spec.dtype.as_datatype_enum)}) but got {got}")


def tensor_proto_to_numpy(proto: tensor_pb2.TensorProto, max_elements: int | None = None,
                          name: str = "") -> np.ndarray:
    """``tf.make_ndarray`` with malformed protos turned into INVALID_ARGUMENT.

    The declared shape is checked *before* decoding: a TensorProto may carry one value and a shape of
    ``[2**31]`` (TensorFlow fills the rest with the last value), so a 20-byte message would otherwise
    make the server allocate gigabytes. ``max_elements`` bounds the element count (RESOURCE_EXHAUSTED
    beyond it); negative dimensions are INVALID_ARGUMENT.
    """
    shape = [d.size for d in proto.tensor_shape.dim]
    if shape and min(shape) < 0:
        raise invalid(f"{_what(name)}: dimension {min(shape)} in the tensor shape is negative")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{_what(name)}: shape {shape} has {count} elements, "
                           f"more than the server's limit of {max_elements}")
    # Fast paths for what retrieval requests carry (``tf.make_ndarray`` costs ~10 us per tensor in
    # dtype bookkeeping alone); anything else, including TF's fill-with-last-value rule, goes
    # through ``tf.make_ndarray`` itself. (``list()`` first: numpy reads a plain list faster than
    # protobuf's repeated container.)
    dtype = proto.dtype
    if dtype == types_pb2.DT_STRING:
        if len(proto.string_val) == count:
            return np.array(list(proto.string_val), dtype=object).reshape(shape)
    elif (numeric := _NUMPY_OF_ENUM.get(dtype)) is not None:
        content = proto.tensor_content
        if content:
            if len(content) == count * numeric.itemsize:
                return np.frombuffer(content, numeric).reshape(shape).copy()
        else:
            values = getattr(proto, _VALUE_FIELD[dtype])
            if len(values) == count:
                return np.array(list(values), numeric).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001 - any decoding problem is the request's fault
        raise invalid(f"cannot decode {_what(name)}: {e}") from None


def _what(name: str) -> str:
    return f"input {name!r}" if name else "tensor"


_NUMPY_OF_ENUM = {types_pb2.DT_FLOAT: np.dtype(np.float32), types_pb2.DT_DOUBLE: np.dtype(np.float64),
                  types_pb2.DT_INT32: np.dtype(np.int32), types_pb2.DT_INT64: np.dtype(np.int64)}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_ENUM_OF_NUMPY = {dtype: enum for enum, dtype in _NUMPY_OF_ENUM.items()}
_VALUE_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val"}


def numpy_to_tensor_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """``tf.make_tensor_proto`` for the dtypes the retrieval signatures return, ~5x cheaper."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value)
    return proto


def fill_tensor_proto(proto: tensor_pb2.TensorProto, value: np.ndarray) -> None:
    """Write ``value`` into the empty ``proto`` in place (a response's ``outputs[name]``: no copy).

    Numeric arrays go into ``tensor_content`` (little-endian, as TF writes it), strings into
    ``string_val``; any other dtype goes through ``tf.make_tensor_proto``.
    """
    value = np.asarray(value)
    enum = _ENUM_OF_NUMPY.get(value.dtype)
    if enum is None and value.dtype != object:
        proto.CopyFrom(tf.make_tensor_proto(value))
        return
    if enum is None:
        flat = value.ravel().tolist()
        if not all(isinstance(v, bytes) for v in flat):
            proto.CopyFrom(tf.make_tensor_proto(value))
            return
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(flat)
    else:
        proto.dtype = enum
        if not (value.dtype.byteorder == "<" or (value.dtype.byteorder in "=|" and _LITTLE_ENDIAN_HOST)):
            value = value.astype(value.dtype.newbyteorder("<"))
        proto.tensor_content = value.tobytes()   # C order, whatever the array's strides
    dims = proto.tensor_shape.dim
    for d in value.shape:
        dims.add().size = d
