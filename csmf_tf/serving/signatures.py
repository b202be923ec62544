"""What a SavedModel's SignatureDefs say: input and output names, dtypes, shapes and input defaults.

Everything here is read from the SavedModel's own ``saved_model.pb`` (the SignatureDefs TF Serving
reports in GetModelMetadata), so the server validates requests (:mod:`csmf_tf.serving.validation`)
for any exported model, not only CSMF's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    """Dtype and shape of one signature input/output (``shape`` is ``None`` for unknown rank)."""

    name: str
    dtype: tf.DType
    shape: tuple[int | None, ...] | None
    # Looked up once: tf.DType comparisons and conversions cost microseconds on every request.
    numpy_dtype: np.dtype = dataclasses.field(init=False, repr=False, compare=False)
    dtype_enum: int = dataclasses.field(init=False, repr=False, compare=False)
    #: True when dimension 0 is the (variable) batch dimension.
    batched: bool = dataclasses.field(init=False, repr=False, compare=False)
    #: ``(axis, size)`` of every dimension of known size: what a value's shape must match.
    fixed_dims: tuple[tuple[int, int], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numpy_dtype", numpy_dtype(self.dtype))
        object.__setattr__(self, "dtype_enum", self.dtype.as_datatype_enum)
        object.__setattr__(self, "batched", self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None)
        object.__setattr__(self, "fixed_dims", () if self.shape is None else
                           tuple((axis, d) for axis, d in enumerate(self.shape) if d is not None))

    @staticmethod
    def from_proto(name: str, info: meta_graph_pb2.TensorInfo) -> "TensorSpecInfo":
        """From a SignatureDef's TensorInfo."""
        shape = None if info.tensor_shape.unknown_rank else tuple(
            None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
        return TensorSpecInfo(name, tf.as_dtype(info.dtype), shape)

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of ``shape`` has this spec's rank and known dimension sizes."""
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(shape[axis] == d for axis, d in self.fixed_dims)

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
    #: Inputs a request must carry (the others have SignatureDef defaults), sorted.
    required: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", tuple(sorted(k for k in self.inputs if k not in self.defaults)))

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
        return list(self.required)


def numpy_dtype(dtype: tf.DType) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` is held in (strings as ``object`` of ``bytes``)."""
    return np.dtype(object) if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)
