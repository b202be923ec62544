"""Transport-independent request handling: what both the gRPC and the REST front ends call.

Predict (resolve model, version and signature; validate; batch or run; filter outputs), model
metadata and model status. Metadata and status are TF Serving's own messages (``SignatureDefMap``,
``GetModelStatusResponse``): the gRPC API returns them as they are, the REST API as their JSON.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import time
from typing import Callable, Iterator, Mapping, Sequence, Union

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, status_pb2

from csmf_tf.serving.constants import MODEL_INFO_SIGNATURE, RETRIEVAL_SIGNATURE
from csmf_tf.serving.errors import ServingError, invalid, not_found
from csmf_tf.serving.model_registry import LoadedModel, ServedModels, run_or_raise
from csmf_tf.serving.signatures import SignatureInfo
from csmf_tf.serving.validation import validate_request

_STATES = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits; a request beyond them gets an error status, never a crash or a hang."""

    max_request_batch_size: int = 1024          # rows in one request
    max_message_bytes: int = 16 * 1024 * 1024   # gRPC message / REST body size
    request_timeout_s: float = 30.0             # deadline when the client sets none (or a longer one)


@dataclasses.dataclass
class PredictResult:
    """Outputs of one Predict call and the version that produced them."""

    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


Inputs = Union[Mapping[str, np.ndarray], Callable[[SignatureInfo], Mapping[str, np.ndarray]]]


@dataclasses.dataclass
class _Call:
    """A validated request, its pinned model version and whether it goes through the batcher."""

    model: LoadedModel
    signature: SignatureInfo
    signature_name: str
    inputs: dict[str, np.ndarray]
    rows: int | None
    batchable: bool


class PredictionCore:
    """Resolve model/version/signature, validate, batch or run, filter outputs."""

    def __init__(self, models: ServedModels, limits: Limits | None = None) -> None:
        self.models = models
        self.limits = limits or Limits()

    def deadline(self, client_remaining_s: float | None) -> float:
        """Absolute (monotonic) deadline: the client's, capped by the server's request timeout."""
        budget = self.limits.request_timeout_s
        if client_remaining_s is not None:
            budget = min(budget, client_remaining_s)
        return time.monotonic() + budget

    def predict(self, model_name: str, inputs: Inputs, *, version: int | None = None,
                version_label: str | None = None, signature_name: str = "",
                output_filter: Sequence[str] = (), deadline: float | None = None) -> PredictResult:
        """One Predict request. Raises :class:`ServingError` with TF Serving's status codes.

        ``inputs`` is either the request's tensors or a function that decodes them given the resolved
        signature (the transports convert JSON / TensorProtos with the signature's dtypes).
        """
        with self._prepared(model_name, inputs, version, version_label, signature_name, output_filter,
                            deadline) as call:
            if call.batchable:
                outputs = call.model.batcher.submit(call.inputs, call.rows, deadline)
            else:
                outputs = run_or_raise(call.model, call.signature_name, call.inputs)
            return self._finish(call, outputs, output_filter, deadline)

    async def predict_async(self, model_name: str, inputs: Inputs, *, version: int | None = None,
                            version_label: str | None = None, signature_name: str = "",
                            output_filter: Sequence[str] = (), deadline: float | None = None,
                            executor: concurrent.futures.Executor | None = None) -> PredictResult:
        """:meth:`predict` for an event loop: the model runs in the batching thread or ``executor``."""
        with self._prepared(model_name, inputs, version, version_label, signature_name, output_filter,
                            deadline) as call:
            if call.batchable:
                outputs = await call.model.batcher.submit_async(call.inputs, call.rows, deadline)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    executor, run_or_raise, call.model, call.signature_name, call.inputs)
            return self._finish(call, outputs, output_filter, deadline)

    @contextlib.contextmanager
    def _prepared(self, model_name: str, inputs: Inputs, version: int | None, version_label: str | None,
                  signature_name: str, output_filter: Sequence[str], deadline: float | None) -> Iterator[_Call]:
        """Resolve and validate a request; the model version stays pinned until the block exits."""
        registry = self.models.registry(model_name)
        signature_name = signature_name or RETRIEVAL_SIGNATURE
        if deadline is not None and time.monotonic() >= deadline:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the request ran")
        with registry.acquire(version, version_label) as model:
            sig = model.signatures.get(signature_name)
            if sig is None:
                raise not_found(f"signature {signature_name!r} not found in {model_name} version "
                                f"{model.version}; available: {sorted(model.signatures)}")
            unknown = sorted(set(output_filter) - set(sig.outputs))
            if unknown:
                raise invalid(f"output tensor alias(es) {unknown} not found in signature "
                              f"{signature_name!r}; outputs: {sorted(sig.outputs)}")
            given = inputs(sig) if callable(inputs) else inputs
            full, rows = validate_request(sig, given, self.limits.max_request_batch_size, model.info)
            batchable = signature_name == RETRIEVAL_SIGNATURE and model.batcher is not None and rows is not None
            yield _Call(model, sig, signature_name, full, rows, batchable)

    @staticmethod
    def _finish(call: _Call, outputs: dict[str, np.ndarray], output_filter: Sequence[str],
                deadline: float | None) -> PredictResult:
        if deadline is not None and time.monotonic() > deadline:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if output_filter:
            outputs = {k: outputs[k] for k in output_filter}
        return PredictResult(call.model.version, call.signature_name, outputs)

    def metadata(self, model_name: str, version: int | None = None, version_label: str | None = None
                 ) -> tuple[int, get_model_metadata_pb2.SignatureDefMap, dict | None]:
        """``(version, SignatureDefs, model_info)`` for GetModelMetadata; the SignatureDefs as saved,
        ``model_info`` the ``model_info`` signature's outputs as JSON values (objectives, default
        weights, the export's measured ``ann_recall``, ...; ``None`` for a SavedModel without one)."""
        with self.models.registry(model_name).acquire(version, version_label) as model:
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in model.signature_defs.items():
                sig_map.signature_def[name].CopyFrom(sig)
            info = None
            if model.info is not None:
                info = {name: _json_value(value.tolist())
                        for name, value in sorted(run_or_raise(model, MODEL_INFO_SIGNATURE, {}).items())}
            return model.version, sig_map, info

    def status(self, model_name: str, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus: the state of every version seen, or of ``version``."""
        response = get_model_status_pb2.GetModelStatusResponse()
        for state in self.models.registry(model_name).version_states(version):
            entry = response.model_version_status.add()
            entry.version = state.version
            entry.state = _STATES.Value(state.state)
            entry.status.CopyFrom(status_pb2.StatusProto(error_code=state.error_code.value[0],
                                                         error_message=state.error_message))
        return response


def _json_value(value: object) -> object:
    """A ``tolist()`` value with its byte strings decoded (JSON has no bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value
