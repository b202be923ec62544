"""Clients for a served CSMF model: stock TF Serving gRPC stub and the REST API.

    with GrpcRetrievalClient("127.0.0.1:8500", "csmf") as c:
        r = c.retrieve({"user_id": ["u1"]}, weights=[1, 0.5, 2], k=10)
        print(r.format())

Both talk to any TF Serving-compatible server (ours, or tensorflow_model_server for the brute-force
export); neither starts one (:func:`csmf_tf.testing.smoke.serve_and_query_once` does, for a check).
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, predict_pb2,
                                     model_service_pb2_grpc, prediction_service_pb2_grpc)

from csmf_tf.serving.constants import (K_INPUT, MODEL_INFO_SIGNATURE, OUTPUT_ITEM_IDS,
                                       OUTPUT_OBJECTIVE_SCORES, OUTPUT_SCORES, RETRIEVAL_SIGNATURE,
                                       USER_EMBEDDING_SIGNATURE, WEIGHTS_INPUT)


class ServingClientError(RuntimeError):
    """A request the server answered with an error; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclasses.dataclass
class RetrievalResult:
    """Top-k for each query row: ``item_ids`` [B][k], ``scores`` [B, k], ``objective_scores`` [B, k, S]."""

    item_ids: list[list[str]]
    scores: np.ndarray
    objective_scores: np.ndarray
    objectives: tuple[str, ...] = ()
    version: int | None = None

    def format(self, row: int = 0) -> str:
        """A printable table of one query row's results with per-objective scores."""
        names = self.objectives or tuple(f"s{t + 1}" for t in range(self.objective_scores.shape[-1]))
        head = f"{'rank':>4}  {'item_id':<20} {'fused':>10} " + " ".join(f"{n:>12}" for n in names)
        lines = [head, "-" * len(head)]
        for r, (item, score) in enumerate(zip(self.item_ids[row], self.scores[row]), start=1):
            per = " ".join(f"{v:>12.5f}" for v in self.objective_scores[row, r - 1])
            lines.append(f"{r:>4}  {item:<20} {score:>10.5f} {per}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"version": self.version, "objectives": list(self.objectives), "item_ids": self.item_ids,
                "scores": self.scores.tolist(), "objective_scores": self.objective_scores.tolist()}


def _as_batch(user_inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Scalars become batches of one; strings stay strings, numbers become float32 unless integer-typed."""
    out = {}
    for name, value in user_inputs.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.dtype.kind in "US" or arr.dtype == object:
            arr = np.asarray([v.encode() if isinstance(v, str) else v for v in arr.ravel()],
                             dtype=object).reshape(arr.shape)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        out[name] = arr
    return out


def _cast_to(inputs: dict[str, np.ndarray], dtypes: Mapping[str, tf.DType]) -> dict[str, np.ndarray]:
    """Numeric user inputs in the signature's dtype (so ``age=31`` works for a float32 input)."""
    out = {}
    for name, arr in inputs.items():
        dtype = dtypes.get(name)
        if dtype is not None and dtype != tf.string and arr.dtype != object and arr.dtype.kind in "biuf":
            arr = arr.astype(dtype.as_numpy_dtype)
        out[name] = arr
    return out


def _with_fusion(inputs: dict[str, np.ndarray], weights: Sequence[float] | np.ndarray | None,
                 k: int | None) -> dict[str, np.ndarray]:
    """``inputs`` plus the optional ``objective_weights`` and ``k`` (the model's defaults when omitted)."""
    if weights is not None:
        inputs[WEIGHTS_INPUT] = np.asarray(weights, np.float32)
    if k is not None:
        inputs[K_INPUT] = np.asarray(k, np.int32)
    return inputs


def _decode_ids(arr: np.ndarray) -> list[list[str]]:
    return [[x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in row] for row in arr]


class GrpcRetrievalClient:
    """CSMF retrieval over gRPC with the stock ``PredictionServiceStub``."""

    def __init__(self, target: str, model_name: str = "csmf", timeout_s: float = 10.0,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._objectives: tuple[str, ...] | None = None
        self._dtypes: dict[str, tf.DType] | None = None

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise ServingClientError(e.code().name, e.details() or "") from None

    def predict(self, inputs: Mapping[str, np.ndarray], signature_name: str = RETRIEVAL_SIGNATURE,
                version: int | None = None, output_filter: Sequence[str] = ()) -> tuple[int, dict]:
        """Raw Predict: ``(served version, {output: ndarray})``."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature_name
        if version is not None:
            request.model_spec.version.value = version
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter)
        response = self._call(self.stub.Predict, request)
        return response.model_spec.version.value, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def objectives(self) -> tuple[str, ...]:
        """Objective names from the ``model_info`` signature (cached)."""
        if self._objectives is None:
            _, out = self.predict({}, signature_name=MODEL_INFO_SIGNATURE)
            self._objectives = tuple(x.decode() for x in out["objectives"])
        return self._objectives

    def input_dtypes(self) -> dict[str, tf.DType]:
        """``serving_default`` input dtypes from GetModelMetadata (cached)."""
        if self._dtypes is None:
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            self.metadata().metadata["signature_def"].Unpack(sig_map)
            sig = sig_map.signature_def[RETRIEVAL_SIGNATURE]
            self._dtypes = {k: tf.as_dtype(v.dtype) for k, v in sig.inputs.items()}
        return self._dtypes

    def retrieve(self, user_inputs: Mapping[str, Any], weights: Sequence[float] | np.ndarray | None = None,
                 k: int | None = None, version: int | None = None) -> RetrievalResult:
        """Top-k items for the given user rows, fused with ``weights`` (one per objective)."""
        inputs = _with_fusion(_cast_to(_as_batch(user_inputs), self.input_dtypes()), weights, k)
        served, out = self.predict(inputs, version=version)
        return RetrievalResult(_decode_ids(out[OUTPUT_ITEM_IDS]), out[OUTPUT_SCORES],
                               out[OUTPUT_OBJECTIVE_SCORES], self.objectives(), served)

    def user_embedding(self, user_inputs: Mapping[str, Any]) -> np.ndarray:
        """``[B, D]`` user vectors."""
        _, out = self.predict(_as_batch(user_inputs), signature_name=USER_EMBEDDING_SIGNATURE)
        return out["user_embedding"]

    def metadata(self) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """GetModelMetadata (signature_def)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model_name
        request.metadata_field.append("signature_def")
        return self._call(self.stub.GetModelMetadata, request)

    def status(self) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus for every version."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        return self._call(self.model_stub.GetModelStatus, request)

    def close(self) -> None:
        """Close the gRPC channel."""
        self.channel.close()

    def __enter__(self) -> "GrpcRetrievalClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable_inputs(inputs: Mapping[str, np.ndarray]) -> dict:
    out = {}
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        if arr.dtype == object:
            out[name] = np.vectorize(lambda x: x.decode() if isinstance(x, bytes) else x,
                                     otypes=[object])(arr).tolist() if arr.size else []
        else:
            out[name] = arr.tolist()
    return out


class RestRetrievalClient:
    """CSMF retrieval over TF Serving's REST API (columnar ``inputs`` format, so ``k`` can be set)."""

    def __init__(self, base_url: str, model_name: str = "csmf", timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._objectives: tuple[str, ...] | None = None

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw).get("error", raw.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")
            raise ServingClientError(f"HTTP_{e.code}", message, e.code) from None
        except (urllib.error.URLError, OSError) as e:   # refused, reset, timed out: nothing answered
            raise ServingClientError("UNAVAILABLE", f"{self.base_url}: {getattr(e, 'reason', e)}") from None

    def _model_path(self, version: int | None) -> str:
        return f"/v1/models/{self.model_name}" + (f"/versions/{version}" if version is not None else "")

    def predict(self, inputs: Mapping[str, np.ndarray], signature_name: str = RETRIEVAL_SIGNATURE,
                version: int | None = None) -> dict:
        """Raw columnar predict; returns the ``outputs`` object."""
        body = {"signature_name": signature_name, "inputs": _jsonable_inputs(inputs)}
        return self._request(self._model_path(version) + ":predict", body)["outputs"]

    def objectives(self) -> tuple[str, ...]:
        """Objective names from the ``model_info`` signature (cached)."""
        if self._objectives is None:
            out = self.predict({}, signature_name=MODEL_INFO_SIGNATURE)
            self._objectives = tuple(out["objectives"])
        return self._objectives

    def retrieve(self, user_inputs: Mapping[str, Any], weights: Sequence[float] | np.ndarray | None = None,
                 k: int | None = None, version: int | None = None) -> RetrievalResult:
        """Top-k items for the given user rows, fused with ``weights`` (one per objective)."""
        out = self.predict(_with_fusion(_as_batch(user_inputs), weights, k), version=version)
        return RetrievalResult([[str(x) for x in row] for row in out[OUTPUT_ITEM_IDS]],
                               np.asarray(out[OUTPUT_SCORES], np.float32),
                               np.asarray(out[OUTPUT_OBJECTIVE_SCORES], np.float32), self.objectives(),
                               version)

    def status(self) -> dict:
        """``GET /v1/models/<name>``."""
        return self._request(self._model_path(None))

    def metadata(self) -> dict:
        """``GET /v1/models/<name>/metadata``."""
        return self._request(self._model_path(None) + "/metadata")
