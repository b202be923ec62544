"""The gRPC front end's TensorProto codec agrees with TensorFlow's own on every shape and dtype it serves."""
import csmf_tf  # noqa: F401
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from csmf_tf.serving.errors import ServingError
from csmf_tf.serving.grpc_codec import numpy_to_tensor_proto, tensor_proto_to_numpy

VALUES = [
    np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    np.arange(6, dtype=np.float64).reshape(3, 2) / 3,
    np.arange(-3, 3, dtype=np.int32),
    np.array([2**40, -5], np.int64),
    np.float32(1.5).reshape(()),
    np.int32(10).reshape(()),
    np.array([[b"item1", b"x"], [b"", "é".encode()]], dtype=object),
    np.zeros((0, 4), np.float32),
    np.array([True, False]),                     # not a fast-path dtype: TensorFlow's own encoder
    np.arange(4, dtype=np.float16),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v.dtype}{list(v.shape)}")
def test_encode_matches_tensorflow(value):
    proto = numpy_to_tensor_proto(value)
    reference = tf.make_tensor_proto(value)
    assert proto.dtype == reference.dtype
    assert [d.size for d in proto.tensor_shape.dim] == list(value.shape)
    decoded = tf.make_ndarray(proto)
    assert decoded.dtype == tf.make_ndarray(reference).dtype
    np.testing.assert_array_equal(decoded, value)


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v.dtype}{list(v.shape)}")
def test_decode_matches_tensorflow(value):
    for proto in (tf.make_tensor_proto(value), numpy_to_tensor_proto(value)):
        decoded = tensor_proto_to_numpy(proto)
        reference = tf.make_ndarray(proto)
        assert decoded.dtype == reference.dtype and decoded.shape == reference.shape
        np.testing.assert_array_equal(decoded, reference)
        if decoded.size:
            decoded.flat[0] = decoded.flat[-1]       # a writable copy, not a view of the message


def test_decode_keeps_tensorflow_fill_rule_and_limits():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    proto.tensor_shape.dim.add(size=4)
    proto.float_val.extend([1.0, 2.0])                 # TF repeats the last value
    np.testing.assert_array_equal(tensor_proto_to_numpy(proto), [1, 2, 2, 2])
    strings = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    strings.tensor_shape.dim.add(size=3)
    strings.string_val.append(b"a")
    assert tensor_proto_to_numpy(strings).tolist() == [b"a", b"a", b"a"]
    short = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 12)
    short.tensor_shape.dim.add(size=4)                 # 3 floats of content for 4 elements
    with pytest.raises(ServingError, match="cannot decode input 'w'"):
        tensor_proto_to_numpy(short, name="w")
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    huge.tensor_shape.dim.add(size=2**31)
    huge.float_val.append(0.0)
    with pytest.raises(ServingError, match="more than the server's limit"):
        tensor_proto_to_numpy(huge, max_elements=1000, name="w")


@pytest.mark.parametrize("dtype,field,values", [
    (types_pb2.DT_FLOAT, "float_val", [0.5, -1.25, 3.0, 1e-3]),
    (types_pb2.DT_DOUBLE, "double_val", [0.1, 2.0, -3.5, 1e300]),
    (types_pb2.DT_INT32, "int_val", [1, -2, 2**31 - 1, 0]),
    (types_pb2.DT_INT64, "int64_val", [2**40, -1, 0, 7]),
])
def test_decode_of_value_lists_matches_tensorflow(dtype, field, values):
    """Hand-built protos (other languages' clients) carry values in the typed repeated fields."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=2)
    getattr(proto, field).extend(values)
    decoded, reference = tensor_proto_to_numpy(proto), tf.make_ndarray(proto)
    assert decoded.dtype == reference.dtype and decoded.shape == (2, 2)
    np.testing.assert_array_equal(decoded, reference)
    scalar = tensor_pb2.TensorProto(dtype=dtype)
    getattr(scalar, field).append(values[0])
    assert tensor_proto_to_numpy(scalar).shape == () and tensor_proto_to_numpy(scalar) == tf.make_ndarray(scalar)
