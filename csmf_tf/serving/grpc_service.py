"""TF Serving's gRPC services (PredictionService, ModelService) over :class:`PredictionCore`.

Any stock TF Serving client (``prediction_service_pb2_grpc.PredictionServiceStub``) works unchanged.
The services are coroutines on a ``grpc.aio`` server (:class:`GrpcServer`) with its own event-loop
thread, so waiting requests hold no threads; the model runs in the batching thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from typing import Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2, status_pb2)

from csmf_tf.serving.core import PredictionCore
from csmf_tf.serving.errors import ServingError, invalid
from csmf_tf.serving.signatures import SignatureInfo, check_dtype_enum

log = logging.getLogger(__name__)

_STATES = get_model_status_pb2.ModelVersionStatus.State


def _version_of(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return int(spec.version.value), None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def tensor_proto_to_numpy(proto: tensor_pb2.TensorProto, max_elements: int | None = None,
                          name: str = "") -> np.ndarray:
    """``tf.make_ndarray`` with malformed protos turned into INVALID_ARGUMENT.

    The declared shape is checked *before* decoding: a TensorProto may carry one value and a shape of
    ``[2**31]`` (TensorFlow fills the rest with the last value), so a 20-byte message would otherwise
    make the server allocate gigabytes. ``max_elements`` bounds the element count (RESOURCE_EXHAUSTED
    beyond it); negative dimensions are INVALID_ARGUMENT.
    """
    what = f"input {name!r}" if name else "tensor"
    count = 1
    for d in proto.tensor_shape.dim:
        if d.size < 0:
            raise invalid(f"{what}: dimension {d.size} in the tensor shape is negative")
        count *= d.size
    if max_elements is not None and count > max_elements:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{what}: shape {[d.size for d in proto.tensor_shape.dim]} has {count} elements, "
                           f"more than the server's limit of {max_elements}")
    shape = [d.size for d in proto.tensor_shape.dim]
    # Fast path for what retrieval requests carry (``tf.make_ndarray`` costs ~10 us per tensor in
    # dtype bookkeeping alone); anything else, including TF's fill-with-last-value rule, goes
    # through ``tf.make_ndarray`` itself.
    numeric = _NUMPY_OF_ENUM.get(proto.dtype)
    if numeric is not None and proto.tensor_content and len(proto.tensor_content) == count * numeric.itemsize:
        return np.frombuffer(proto.tensor_content, numeric).reshape(shape).copy()
    if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == count:
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    if numeric is not None and not proto.tensor_content:
        values = getattr(proto, _VALUE_FIELD[proto.dtype])
        if len(values) == count:
            return np.array(values, numeric).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001 - any decoding problem is the request's fault
        raise invalid(f"cannot decode {what}: {e}") from None


_NUMPY_OF_ENUM = {types_pb2.DT_FLOAT: np.dtype(np.float32), types_pb2.DT_DOUBLE: np.dtype(np.float64),
                  types_pb2.DT_INT32: np.dtype(np.int32), types_pb2.DT_INT64: np.dtype(np.int64)}
_ENUM_OF_NUMPY = {dtype: enum for enum, dtype in _NUMPY_OF_ENUM.items()}
_VALUE_FIELD = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val"}


def numpy_to_tensor_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """``tf.make_tensor_proto`` for the dtypes the retrieval signatures return, ~5x cheaper.

    Numeric arrays go into ``tensor_content`` (little-endian, as TF writes it), strings into
    ``string_val``; any other dtype falls back to ``tf.make_tensor_proto``.
    """
    value = np.asarray(value)
    enum = _ENUM_OF_NUMPY.get(value.dtype)
    if enum is None and value.dtype != object:
        return tf.make_tensor_proto(value)
    proto = tensor_pb2.TensorProto()
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in value.shape)
    if enum is None:
        flat = value.ravel().tolist()
        if not all(isinstance(v, bytes) for v in flat):
            return tf.make_tensor_proto(value)
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(flat)
    else:
        proto.dtype = enum
        proto.tensor_content = np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
    return proto


async def _abort(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    await context.abort(error.code, error.message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata; the rest UNIMPLEMENTED.

    The methods are coroutines for a ``grpc.aio`` server: decoding and encoding run on the event
    loop, the model in the batching thread (or ``executor`` for unbatched signatures), so no request
    holds a thread while it waits for its batch.
    """

    def __init__(self, core: PredictionCore, executor: futures.Executor | None = None) -> None:
        self.core = core
        self.executor = executor

    async def Predict(self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> predict_pb2.PredictResponse:
        try:
            version, label = _version_of(request.model_spec)

            def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
                # Dtypes are checked on the proto (before conversion), as TF Serving does.
                out = {}
                # Each element takes at least one byte on the wire unless TF's fill-with-last-value
                # rule is used, so a tensor of more elements than the message limit is an inflation.
                limit = self.core.limits.max_message_bytes
                for name, proto in request.inputs.items():
                    if name in sig.inputs:
                        check_dtype_enum(name, sig.inputs[name], proto.dtype)
                    out[name] = tensor_proto_to_numpy(proto, limit, name)
                return out

            result = await self.core.predict_async(
                request.model_spec.name, decode, version=version, version_label=label,
                signature_name=request.model_spec.signature_name,
                output_filter=list(request.output_filter),
                deadline=self.core.deadline(context.time_remaining()), executor=self.executor)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = result.version
            response.model_spec.signature_name = result.signature_name
            for name, value in result.outputs.items():
                response.outputs[name].CopyFrom(numpy_to_tensor_proto(value))
            return response
        except ServingError as e:
            await _abort(context, e)
        except Exception as e:  # noqa: BLE001 - never crash the server on one request
            log.exception("Predict failed")
            await _abort(context, ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext
                               ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            fields = list(request.metadata_field)
            if not fields:
                raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
            unsupported = [f for f in fields if f != "signature_def"]
            if unsupported:
                raise invalid(f"Metadata field {unsupported[0]} is not supported")
            version, label = _version_of(request.model_spec)
            served, defs = self.core.metadata(request.model_spec.name, version, label)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for name, sd in defs.items():
                sig_map.signature_def[name].CopyFrom(sd)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = served
            response.metadata["signature_def"].Pack(sig_map)
            return response
        except ServingError as e:
            await _abort(context, e)
        except Exception as e:  # noqa: BLE001
            log.exception("GetModelMetadata failed")
            await _abort(context, ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    async def _unimplemented(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "only Predict and GetModelMetadata are served (the model has predict signatures)")

    Classify = _unimplemented
    Regress = _unimplemented
    MultiInference = _unimplemented


def status_response(core: PredictionCore, model_name: str, version: int | None
                    ) -> get_model_status_pb2.GetModelStatusResponse:
    """Build a GetModelStatusResponse (shared with the REST status endpoint)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for state in core.status(model_name, version):
        entry = response.model_version_status.add()
        entry.version = state.version
        entry.state = _STATES.Value(state.state)
        entry.status.CopyFrom(status_pb2.StatusProto(error_code=state.error_code.value[0],
                                                     error_message=state.error_message))
    return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus; config reloads are UNIMPLEMENTED."""

    def __init__(self, core: PredictionCore) -> None:
        self.core = core

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            version = request.model_spec.version.value if request.model_spec.HasField("version") else None
            return status_response(self.core, request.model_spec.name, version)
        except ServingError as e:
            await _abort(context, e)
        except Exception as e:  # noqa: BLE001
            log.exception("GetModelStatus failed")
            await _abort(context, ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    async def HandleReloadConfigRequest(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "model config reloads are not supported; new versions are picked up from disk")


class _Undecodable:
    """Stands in for a request whose bytes did not parse (see :func:`_add_service`)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient_deserializer(message_cls: type) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return message_cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(f"cannot parse the request as {message_cls.DESCRIPTOR.full_name}: {e}")
    return deserialize


def _guarded(method: Callable) -> Callable:
    async def behaviour(request: object, context: grpc.aio.ServicerContext) -> object:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)
    return behaviour


def _add_service(server: grpc.aio.Server, service: str, servicer: object,
                 methods: dict[str, tuple[type, type]]) -> None:
    """Register ``servicer``'s unary methods like the generated ``add_*_to_server`` does, except that
    a request whose bytes do not parse (garbage, invalid UTF-8 in a proto3 string field such as the
    model name) gets INVALID_ARGUMENT: grpcio would answer INTERNAL ("Exception deserializing
    request!"), which reads as a server fault although the client sent it.
    """
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(getattr(servicer, name)), request_deserializer=_lenient_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString)
        for name, (request_cls, response_cls) in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


_PREDICTION_METHODS = {
    "Classify": (classification_pb2.ClassificationRequest, classification_pb2.ClassificationResponse),
    "Regress": (regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
    "Predict": (predict_pb2.PredictRequest, predict_pb2.PredictResponse),
    "MultiInference": (inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
    "GetModelMetadata": (get_model_metadata_pb2.GetModelMetadataRequest,
                         get_model_metadata_pb2.GetModelMetadataResponse),
}
_MODEL_METHODS = {
    "GetModelStatus": (get_model_status_pb2.GetModelStatusRequest, get_model_status_pb2.GetModelStatusResponse),
    "HandleReloadConfigRequest": (model_management_pb2.ReloadConfigRequest,
                                  model_management_pb2.ReloadConfigResponse),
}


class GrpcServer:
    """Both services on a ``grpc.aio`` server that runs on its own event-loop thread.

    ``start()`` binds ``host:port`` (0 picks a free port) and returns the port; ``stop(grace_s)``
    refuses new RPCs, lets in-flight ones finish for up to ``grace_s`` seconds, then cancels the rest.
    Unbatched signatures (the embedding signatures, or everything with batching off) run on a pool
    of ``max_workers`` threads; at most ``max_concurrent_rpcs`` RPCs are admitted at once, beyond
    which clients get RESOURCE_EXHAUSTED as from TF Serving.
    """

    def __init__(self, core: PredictionCore, host: str, port: int, max_workers: int = 32,
                 max_concurrent_rpcs: int | None = 256) -> None:
        self._core = core
        self._address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self, timeout_s: float = 60.0) -> int:
        """Bind and start serving; returns the bound port."""
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout_s)
        except BaseException:
            self.stop(0)
            raise

    async def _start(self) -> int:
        size = self._core.limits.max_message_bytes
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self._max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                     ("grpc.so_reuseport", 0)])
        _add_service(server, "tensorflow.serving.PredictionService",
                     PredictionServicer(self._core, self._executor), _PREDICTION_METHODS)
        _add_service(server, "tensorflow.serving.ModelService", ModelServicer(self._core), _MODEL_METHODS)
        try:
            port = server.add_insecure_port(self._address)
        except RuntimeError as e:   # grpc.aio raises where the sync server returned 0
            raise OSError(f"cannot bind gRPC to {self._address}: {e}") from None
        if port == 0:
            raise OSError(f"cannot bind gRPC to {self._address}")
        await server.start()
        self._server = server
        return port

    def stop(self, grace_s: float = 10.0) -> None:
        """Graceful stop (see class docstring); returns once the loop thread has ended."""
        if self._thread.is_alive():
            if self._server is not None:
                done = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
                try:
                    done.result(grace_s + 5)
                except futures.TimeoutError:
                    log.warning("gRPC server did not stop within %.1f s", grace_s + 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(grace_s + 5)
        if not self._thread.is_alive():
            self._loop.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["PredictionServicer", "ModelServicer", "GrpcServer", "status_response",
           "numpy_to_tensor_proto", "tensor_proto_to_numpy"]
