"""TF Serving's gRPC services (PredictionService, ModelService) over :class:`PredictionCore`.

Any stock TF Serving client (``prediction_service_pb2_grpc.PredictionServiceStub``) works unchanged.
The services are coroutines on a ``grpc.aio`` server (:class:`GrpcServer`) with its own event-loop
thread, so waiting requests hold no threads; the model runs in the batching thread. Every RPC goes
through :func:`rpc_method`, the one place where failures become gRPC statuses and where every RPC is
counted and timed (:class:`csmf_tf.serving.monitoring.ServingMetrics`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent import futures
from typing import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import struct_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, model_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc, regression_pb2)

from csmf_tf.serving.core import PredictionCore
from csmf_tf.serving.errors import ServingError, invalid
from csmf_tf.serving.grpc_codec import decode_inputs, fill_tensor_proto
from csmf_tf.serving.monitoring import ServingMetrics
from csmf_tf.serving.signatures import SignatureInfo

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes did not parse (see :func:`_add_service`)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


RpcMethod = Callable[[object, object, grpc.aio.ServicerContext], Awaitable[object]]


def _answered_by(request: object, response: object) -> tuple[str, int | None, str]:
    """``(model, version, signature)`` of an RPC for the metrics: the model asked for, and the version
    and signature that answered (from the response's ``model_spec``; none when it failed)."""
    spec = getattr(request, "model_spec", None)
    model = spec.name if spec is not None else ""
    answered = getattr(response, "model_spec", None)
    if answered is None:
        return model, None, ""
    version = answered.version.value if answered.HasField("version") else None
    return model, version, answered.signature_name


def rpc_method(method: RpcMethod) -> RpcMethod:
    """Map what a servicer method raises to the RPC's status, as TF Serving answers, and count the RPC.

    :class:`ServingError` -> its own code; a request that did not parse (:class:`_Undecodable`) ->
    INVALID_ARGUMENT; anything else -> INTERNAL, logged, the server unharmed. The servicer's
    ``metrics`` record every RPC with its method name, status code and latency.
    """
    name = method.__name__

    @functools.wraps(method)
    async def guarded(self: "_Servicer", request: object, context: grpc.aio.ServicerContext) -> object:
        started = time.perf_counter()
        code, response = grpc.StatusCode.OK, None
        try:
            try:
                if isinstance(request, _Undecodable):
                    raise invalid(request.message)
                response = await method(self, request, context)
                return response
            except ServingError as e:
                code = e.code
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:   # the client went away or the server is stopping
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # noqa: BLE001 - never crash the server on one request
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")
        finally:
            model, version, signature = _answered_by(request, response)
            self.metrics.observe_request("grpc", name, model, version, signature, code.name,
                                         time.perf_counter() - started)
    return guarded


class _Servicer:
    """What :func:`rpc_method` needs of a servicer: the core and the metrics."""

    def __init__(self, core: PredictionCore, metrics: ServingMetrics) -> None:
        self.core = core
        self.metrics = metrics


def _unimplemented(name: str, message: str) -> RpcMethod:
    """An RPC answering UNIMPLEMENTED, counted under its own method name."""
    async def unimplemented(self: _Servicer, request: object, context: grpc.aio.ServicerContext) -> None:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, message)
    unimplemented.__name__ = unimplemented.__qualname__ = name
    return rpc_method(unimplemented)


def _version_of(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return int(spec.version.value), None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


class PredictionServicer(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata; the rest UNIMPLEMENTED.

    The methods are coroutines for a ``grpc.aio`` server: decoding and encoding run on the event
    loop, the model in the batching thread (or ``executor`` for unbatched signatures), so no request
    holds a thread while it waits for its batch.
    """

    def __init__(self, core: PredictionCore, metrics: ServingMetrics,
                 executor: futures.Executor | None = None) -> None:
        super().__init__(core, metrics)
        self.executor = executor

    @rpc_method
    async def Predict(self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
                      ) -> predict_pb2.PredictResponse:
        version, label = _version_of(request.model_spec)

        def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
            # Each element takes at least one byte on the wire unless TF's fill-with-last-value rule is
            # used, so a tensor of more elements than the message limit is an inflation.
            return decode_inputs(request.inputs, sig, self.core.limits.max_message_bytes)

        result = await self.core.predict_async(
            request.model_spec.name, decode, version=version, version_label=label,
            signature_name=request.model_spec.signature_name,
            output_filter=list(request.output_filter),
            deadline=self.core.deadline(context.time_remaining()), executor=self.executor)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = result.version
        response.model_spec.signature_name = result.signature_name
        outputs = response.outputs
        for name, value in result.outputs.items():
            fill_tensor_proto(outputs[name], value)
        return response

    @rpc_method
    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext
                               ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        unsupported = [f for f in fields if f not in ("signature_def", "model_info")]
        if unsupported:
            raise invalid(f"Metadata field {unsupported[0]} is not supported")
        version, label = _version_of(request.model_spec)
        served, sig_map, info = self.core.metadata(request.model_spec.name, version, label)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = served
        if "signature_def" in fields:
            response.metadata["signature_def"].Pack(sig_map)
        if "model_info" in fields and info is not None:   # a google.protobuf.Struct
            model_info = struct_pb2.Struct()
            model_info.update(info)
            response.metadata["model_info"].Pack(model_info)
        return response

    _ONLY_PREDICT = "only Predict and GetModelMetadata are served (the model has predict signatures)"
    Classify = _unimplemented("Classify", _ONLY_PREDICT)
    Regress = _unimplemented("Regress", _ONLY_PREDICT)
    MultiInference = _unimplemented("MultiInference", _ONLY_PREDICT)


class ModelServicer(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus; config reloads are UNIMPLEMENTED."""

    @rpc_method
    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        version = request.model_spec.version.value if request.model_spec.HasField("version") else None
        return self.core.status(request.model_spec.name, version)

    HandleReloadConfigRequest = _unimplemented(
        "HandleReloadConfigRequest", "config reloads over RPC are not supported: edit the --model_config_file "
        "(re-read every --model_config_file_poll_wait_seconds); new versions are picked up from disk")


def _lenient_deserializer(message_cls: type) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return message_cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(f"cannot parse the request as {message_cls.DESCRIPTOR.full_name}: {e}")
    return deserialize


def _add_service(server: grpc.aio.Server, service: str, servicer: object,
                 methods: dict[str, tuple[type, type]]) -> None:
    """Register ``servicer``'s unary methods like the generated ``add_*_to_server`` does, except that
    a request whose bytes do not parse (garbage, invalid UTF-8 in a proto3 string field such as the
    model name) reaches the method as :class:`_Undecodable` and gets INVALID_ARGUMENT
    (:func:`rpc_method`): grpcio would answer INTERNAL ("Exception deserializing request!"), which
    reads as a server fault although the client sent it.
    """
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_lenient_deserializer(request_cls),
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
                 max_concurrent_rpcs: int | None = 256, metrics: ServingMetrics | None = None) -> None:
        self._core = core
        self._metrics = metrics if metrics is not None else ServingMetrics()
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
                     PredictionServicer(self._core, self._metrics, self._executor), _PREDICTION_METHODS)
        _add_service(server, "tensorflow.serving.ModelService", ModelServicer(self._core, self._metrics),
                     _MODEL_METHODS)
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


__all__ = ["GrpcServer", "ModelServicer", "PredictionServicer", "rpc_method"]
