"""The TF Serving-compatible server, driven by the stock gRPC stubs and by plain HTTP (urllib)."""
import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)

from csmf_tf.serving.batching import BatchingOptions, RetrievalBatcher
from csmf_tf.serving.client import GrpcRetrievalClient, RestRetrievalClient, ServingClientError
from csmf_tf.serving.core import Limits
from csmf_tf.testing.demo import build_demo_towers
from csmf_tf.serving.errors import ServingError
from csmf_tf.serving.export import ScannOptions, export_retrieval_model
from csmf_tf.serving.server import ModelServer
from csmf_tf.serving.signatures import SignatureInfo, TensorSpecInfo
from csmf_tf.testing.smoke import serve_and_query_once

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 256 * 1024
MAX_ROWS = 64


def export(d, base, weights=(1.0, 0.5, 2.0)):
    return export_retrieval_model(
        d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, base, "csmf",
        default_weights=list(weights), k_max=50, default_k=10, use_scann=True,
        scann_options=ScannOptions(num_leaves=20, num_leaves_to_search=20, num_reordering_candidates=200))


@pytest.fixture(scope="module")
def towers():
    return build_demo_towers(num_users=30, num_items=400, dim=16, num_clusters=20, seed=3)


@pytest.fixture(scope="module")
def model_v1(towers, tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    return base, export(towers, base)


@pytest.fixture(scope="module")
def server(model_v1):
    base, _ = model_v1
    srv = ModelServer(base / "csmf", "csmf", port=0, rest_api_port=0, poll_interval_s=0.2,
                      batching=BatchingOptions(max_batch_size=32, batch_timeout_s=0.01),
                      limits=Limits(max_request_batch_size=MAX_ROWS, max_message_bytes=MAX_BYTES,
                                    request_timeout_s=20.0))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc_target)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


@pytest.fixture(scope="module")
def reference(model_v1):
    """The exported SavedModel called directly: what the server must answer."""
    return tf.saved_model.load(str(model_v1[1])).signatures


def users_np(towers, rows=slice(0, 3)):
    c = towers.user_catalog
    return {"user_id": c.ids[rows].astype(str).astype(object),
            "age": c.features["age"][rows].astype(np.float32),
            "city": c.features["city"][rows].astype(str).astype(object)}


def request_of(inputs, name="csmf", signature=None, version=None, label=None, output_filter=()):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if signature is not None:
        req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    req.output_filter.extend(output_filter)
    return req


def expected(reference, users, weights, k):
    out = reference["serving_default"](**{k_: tf.constant(v) for k_, v in users.items()},
                                       objective_weights=tf.constant(np.asarray(weights, np.float32)),
                                       k=tf.constant(k, tf.int32))
    return {k_: v.numpy() for k_, v in out.items()}


def http(method, url, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- happy paths ---------------------------------------------------------------------------------------
def test_grpc_predict_with_stock_stub(server, stubs, towers, reference):
    predict, _ = stubs
    users = users_np(towers)
    inputs = dict(users, objective_weights=np.array([1.0, 0.5, 2.0], np.float32), k=np.int32(7))
    response = predict.Predict(request_of(inputs), timeout=30)
    assert response.model_spec.name == "csmf" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    got = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    want = expected(reference, users, [1.0, 0.5, 2.0], 7)
    assert got["item_ids"].shape == (3, 7) and got["objective_scores"].shape == (3, 7, 3)
    np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)
    np.testing.assert_allclose(got["objective_scores"], want["objective_scores"], atol=1e-6)

    # objective_weights and k omitted: the SignatureDef defaults (1, 0.5, 2) and k=10 apply
    response = predict.Predict(request_of(users), timeout=30)
    got = tf.make_ndarray(response.outputs["item_ids"])
    np.testing.assert_array_equal(got, expected(reference, users, [1.0, 0.5, 2.0], 10)["item_ids"])

    # output_filter and per-row weights
    per_row = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    response = predict.Predict(request_of(dict(users, objective_weights=per_row, k=np.int32(5)),
                                          output_filter=["item_ids"]), timeout=30)
    assert set(response.outputs) == {"item_ids"}
    for i in range(3):
        row = {k: v[i:i + 1] for k, v in users.items()}
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"])[i],
                                      expected(reference, row, per_row[i], 5)["item_ids"][0])


def test_other_signatures_and_metadata_and_status(server, stubs, towers, reference):
    predict, model_service = stubs
    users = users_np(towers)
    response = predict.Predict(request_of(users, signature="user_embedding"), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["user_embedding"]),
                               reference["user_embedding"](**{k: tf.constant(v) for k, v in users.items()})
                               ["user_embedding"].numpy(), atol=1e-6)
    info = predict.Predict(request_of({}, signature="model_info"), timeout=30)
    assert [x.decode() for x in tf.make_ndarray(info.outputs["objectives"])] == list(towers.objectives)

    meta_req = get_model_metadata_pb2.GetModelMetadataRequest()
    meta_req.model_spec.name = "csmf"
    meta_req.metadata_field.append("signature_def")
    meta = predict.GetModelMetadata(meta_req, timeout=30)
    assert meta.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(sig_map)
    sd = sig_map.signature_def["serving_default"]
    assert set(sd.inputs) == {"user_id", "age", "city", "objective_weights", "k"}
    assert sd.inputs["user_id"].dtype == tf.string.as_datatype_enum
    assert set(sd.defaults) == {"objective_weights", "k"}

    status_req = get_model_status_pb2.GetModelStatusRequest()
    status_req.model_spec.name = "csmf"
    status = model_service.GetModelStatus(status_req, timeout=30)
    assert [(s.version, s.state, s.status.error_code) for s in status.model_version_status] == \
        [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)]


def test_rest_predict_both_formats_status_and_metadata(server, stubs, towers, reference):
    users = users_np(towers)
    url = f"{server.rest_url}/v1/models/csmf"
    instances = [{"user_id": str(users["user_id"][i]), "age": float(users["age"][i]),
                  "city": str(users["city"][i]), "objective_weights": [1.0, 0.5, 2.0]} for i in range(3)]
    code, body = http("POST", url + ":predict", {"instances": instances})
    assert code == 200 and len(body["predictions"]) == 3
    want = expected(reference, users, [1.0, 0.5, 2.0], 10)
    for i, row in enumerate(body["predictions"]):
        assert set(row) == {"item_ids", "scores", "objective_scores"}
        assert row["item_ids"] == want["item_ids"][i].astype(str).tolist()
        np.testing.assert_allclose(row["scores"], want["scores"][i], atol=1e-6)

    columnar = {"signature_name": "serving_default",
                "inputs": {"user_id": users["user_id"].astype(str).tolist(), "age": users["age"].tolist(),
                           "city": users["city"].astype(str).tolist(),
                           "objective_weights": [0.0, 1.0, 0.0], "k": 4}}
    code, body = http("POST", url + "/versions/1:predict", columnar)
    assert code == 200 and set(body["outputs"]) == {"item_ids", "scores", "objective_scores"}
    want = expected(reference, users, [0.0, 1.0, 0.0], 4)
    assert body["outputs"]["item_ids"] == want["item_ids"].astype(str).tolist()
    np.testing.assert_allclose(body["outputs"]["objective_scores"], want["objective_scores"], atol=1e-6)

    code, body = http("POST", url + ":predict", {"signature_name": "user_embedding",
                                                 "inputs": {k: columnar["inputs"][k] for k in users}})
    assert code == 200 and np.asarray(body["outputs"]).shape == (3, 16)   # one output: a bare value

    code, body = http("GET", url)
    assert code == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
    code, body = http("GET", url + "/versions/1/metadata")
    assert code == 200 and body["model_spec"] == {"name": "csmf", "signature_name": "", "version": "1"}
    inputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["user_id"]["dtype"] == "DT_STRING" and inputs["k"]["dtype"] == "DT_INT32"


# -- errors ----------------------------------------------------------------------------------------------
def test_grpc_errors_are_clean_statuses(server, stubs, towers):
    predict, model_service = stubs
    users = users_np(towers)
    I, N, R = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED)
    many = {k: np.concatenate([v] * 30) for k, v in users.items()}      # 90 rows > MAX_ROWS
    cases = [
        ("wrong dtype", request_of(dict(users, age=users["city"])), I, "expects dtype float"),
        ("wrong shape", request_of(dict(users, user_id=users["user_id"].reshape(3, 1))), I, "shape"),
        ("missing input", request_of({k: v for k, v in users.items() if k != "city"}), I, "missing input"),
        ("unknown input", request_of(dict(users, color=users["city"])), I, "not in signature"),
        ("batch mismatch", request_of(dict(users, age=users["age"][:2])), I, "batch sizes"),
        ("k too large", request_of(dict(users, k=np.int32(51))), I, "k_max=50"),
        ("k not scalar", request_of(dict(users, k=np.array([5], np.int32))), I, "shape"),
        ("nan weights", request_of(dict(users, objective_weights=np.array([1, np.nan, 1], np.float32))),
         I, "finite"),
        ("weights length", request_of(dict(users, objective_weights=np.ones(2, np.float32))), I, "shape"),
        ("unknown model", request_of(users, name="nope"), N, "nope"),
        ("unknown version", request_of(users, version=99), N, "99"),
        ("unknown label", request_of(users, label="canary"), N, "canary"),
        ("unknown signature", request_of(users, signature="ranking"), N, "ranking"),
        ("unknown output", request_of(users, output_filter=["logits"]), I, "logits"),
        ("too many rows", request_of(many), R, "exceeds"),
        ("oversized message", request_of(dict(users, user_id=np.array(["x" * MAX_BYTES] * 3, dtype=object))),
         R, ""),
    ]
    for label, req, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            predict.Predict(req, timeout=30)
        assert err.value.code() == code, (label, err.value.code(), err.value.details())
        assert needle in (err.value.details() or ""), (label, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        predict.Classify(classification_pb2.ClassificationRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    status_req = get_model_status_pb2.GetModelStatusRequest()
    status_req.model_spec.name = "csmf"
    status_req.model_spec.version.value = 5
    with pytest.raises(grpc.RpcError) as err:
        model_service.GetModelStatus(status_req, timeout=30)
    assert err.value.code() == N
    meta_req = get_model_metadata_pb2.GetModelMetadataRequest()
    meta_req.model_spec.name = "csmf"
    with pytest.raises(grpc.RpcError) as err:     # no metadata_field: TF Serving refuses too
        predict.GetModelMetadata(meta_req, timeout=30)
    assert err.value.code() == I

    # a server-side deadline: with no time budget the request is refused before running
    limits = server.core.limits
    server.core.limits = Limits(MAX_ROWS, MAX_BYTES, request_timeout_s=0.0)
    try:
        with pytest.raises(grpc.RpcError) as err:
            predict.Predict(request_of(users), timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.core.limits = limits
    # and the server still answers normally afterwards
    assert predict.Predict(request_of(users), timeout=30).model_spec.version.value == 1


def test_rest_errors_are_json_with_http_codes(server, towers):
    users = users_np(towers)
    url = f"{server.rest_url}/v1/models/csmf"
    cols = {"user_id": users["user_id"].astype(str).tolist(), "age": users["age"].tolist(),
            "city": users["city"].astype(str).tolist()}
    cases = [
        ("POST", url + ":predict", {"inputs": dict(cols, age=["a", "b", "c"])}, 400, "expects numbers"),
        ("POST", url + ":predict", {"inputs": dict(cols, user_id=[1, 2, 3])}, 400, "expects strings"),
        ("POST", url + ":predict", {"inputs": {"user_id": cols["user_id"]}}, 400, "missing input"),
        ("POST", url + ":predict", {"inputs": dict(cols, age=[[1.0], [2.0, 3.0]])}, 400, "rectangular"),
        ("POST", url + ":predict", {"inputs": dict(cols, k=500)}, 400, "k_max"),
        ("POST", url + ":predict", {"inputs": dict(cols, k=2.5)}, 400, "integers"),
        ("POST", url + ":predict", {"inputs": dict(cols, objective_weights=[1, float("nan"), 1])}, 400, "finite"),
        ("POST", url + ":predict", {"inputs": cols, "instances": []}, 400, "exactly one"),
        ("POST", url + ":predict", {"instances": [{"user_id": "u1"}, {"city": "x"}]}, 400, "instance 1"),
        ("POST", url + ":predict", {"signature_name": "ranking", "inputs": cols}, 404, "ranking"),
        ("POST", url + "/versions/42:predict", {"inputs": cols}, 404, "42"),
        ("POST", url + "/labels/stable:predict", {"inputs": cols}, 404, "stable"),
        ("POST", f"{server.rest_url}/v1/models/other:predict", {"inputs": cols}, 404, "other"),
        ("POST", url + ":classify", {"examples": []}, 501, "classify"),
        ("GET", url + "/versions/42", None, 404, "42"),
        ("GET", f"{server.rest_url}/v2/whatever", None, 404, "Malformed"),
    ]
    for method, u, body, want, needle in cases:
        code, payload = http(method, u, body)
        assert code == want and set(payload) == {"error"}, (u, body, code, payload)
        assert needle in payload["error"], (needle, payload)
    code, payload = http("POST", url + ":predict", raw=b"{not json")
    assert code == 400 and "JSON" in payload["error"]
    code, payload = http("POST", url + ":predict", raw=b" " * (MAX_BYTES + 1))
    assert code == 413 and "exceeds" in payload["error"]
    code, _ = http("POST", url + ":predict", {"inputs": cols})
    assert code == 200


# -- micro-batching --------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, towers, reference):
    model_batcher = None
    with server.models.registry("csmf").acquire() as model:
        model_batcher = model.batcher
    runs_before = model_batcher.batches_run + model_batcher.inline_runs
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(24):
        rows = slice(i % 30, i % 30 + 1 + i % 2)
        jobs.append((users_np(towers, rows), rng.uniform(0, 2, 3).astype(np.float32), int(3 + i % 9)))
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def call(i: int) -> None:
        users, weights, k = jobs[i]
        try:
            with GrpcRetrievalClient(server.grpc_target, "csmf", timeout_s=30) as c:
                start.wait()
                results[i] = c.retrieve(users, weights, k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, (users, weights, k) in enumerate(jobs):
        want = expected(reference, users, weights, k)
        assert results[i].item_ids == [[x.decode() for x in row] for row in want["item_ids"]]
        np.testing.assert_allclose(results[i].scores, want["scores"], atol=1e-6)
        np.testing.assert_allclose(results[i].objective_scores, want["objective_scores"], atol=1e-6)
    # fewer runs than requests: concurrent requests shared executions
    assert model_batcher.batches_run + model_batcher.inline_runs - runs_before < len(jobs)
    assert model_batcher.max_rows_seen > 2


def test_batcher_isolates_a_failing_request():
    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    calls = []
    gate = threading.Event()

    def run(inputs):
        calls.append(len(inputs["x"]))
        if np.any(inputs["x"] == 100):
            gate.wait(10)                     # holds the batching thread while the others queue up
        if np.any(inputs["x"] < 0):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
        return {"y": inputs["x"] * 2}

    batcher = RetrievalBatcher(run, sig, BatchingOptions(max_batch_size=16, batch_timeout_s=0.5))
    out: dict[int, object] = {}

    def go(i: int, x: list[float]) -> None:
        try:
            out[i] = batcher.submit({"x": np.array(x, np.float32)}, len(x), time.monotonic() + 10)
        except ServingError as e:
            out[i] = e

    # A request in progress (held in run) makes the batcher busy, so the next three are queued ...
    blocker = threading.Thread(target=go, args=(9, [100.0]))
    blocker.start()
    assert _wait_for(lambda: calls == [1], timeout=10)
    threads = [threading.Thread(target=go, args=(i, x)) for i, x in enumerate([[1.0], [-1.0], [2.0, 3.0]])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    gate.set()
    blocker.join(10)
    batcher.stop()
    assert calls[1] == 4                      # ... and run as one batch of 4 rows, which fails ...
    assert sorted(calls[2:]) == [1, 1, 2]     # ... so each request runs alone:
    assert np.array_equal(out[0]["y"], [2.0]) and np.array_equal(out[2]["y"], [4.0, 6.0])
    assert isinstance(out[1], ServingError) and out[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert np.array_equal(out[9]["y"], [200.0]) and batcher.inline_runs == 1


def test_async_waiters_that_give_up_do_not_break_the_batching_thread():
    """The gRPC front end awaits batches; a deadline or a cancelled RPC cancels its future."""
    import asyncio

    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    gate = threading.Event()
    calls = []

    def run(inputs):
        calls.append(inputs["x"].tolist())
        if np.any(inputs["x"] == 100):
            gate.wait(10)                     # holds the batching thread while the others queue up
        return {"y": inputs["x"] * 2}

    batcher = RetrievalBatcher(run, sig, BatchingOptions(max_batch_size=16, batch_timeout_s=0.0))

    async def scenario():
        def submit(x, timeout):
            return batcher.submit_async({"x": np.array([x], np.float32)}, 1, time.monotonic() + timeout)

        blocker = asyncio.ensure_future(submit(100.0, 10))
        while not calls:
            await asyncio.sleep(0.01)
        late = asyncio.ensure_future(submit(1.0, 0.2))          # its deadline passes in the queue
        cancelled = asyncio.ensure_future(submit(2.0, 10))      # its RPC is cancelled in the queue
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(ServingError) as late_error:
            await late
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        gate.set()
        first = await blocker
        after = await submit(3.0, 10)                           # the batching thread is still alive
        return late_error.value, first, after

    try:
        late_error, first, after = asyncio.run(scenario())
    finally:
        gate.set()
        batcher.stop()
    assert late_error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert first["y"].tolist() == [200.0] and after["y"].tolist() == [6.0]
    assert calls == [[100.0], [3.0]]                            # neither abandoned request ran


def test_a_batch_of_coroutines_costs_one_wake_up_of_their_loop():
    """Results of a batch reach the event loop in one cross-thread callback, not one per request, and
    every coroutine still gets its own rows, cut to its own k."""
    import asyncio

    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    gate, started = threading.Event(), threading.Event()

    def run(inputs):
        started.set()
        gate.wait(10)                     # the first request holds the thread while 12 more queue up
        return {"y": inputs["x"] * 2}

    batcher = RetrievalBatcher(run, sig, BatchingOptions(max_batch_size=64, batch_timeout_s=0.0))
    wake_ups = []

    async def scenario():
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **kw: (wake_ups.append(a[0]), call_soon_threadsafe(*a, **kw))[1]

        def submit(x):
            return batcher.submit_async({"x": np.array([x, x + 0.5], np.float32)}, 2, time.monotonic() + 20)

        first = asyncio.ensure_future(submit(-1.0))
        while not started.is_set():
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(submit(float(i))) for i in range(12)]
        while batcher.queue_depth < 12:
            await asyncio.sleep(0.01)
        gate.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = asyncio.run(scenario())
    finally:
        gate.set()
        batcher.stop()
    assert first["y"].tolist() == [-2.0, -1.0]
    assert [r["y"].tolist() for r in rest] == [[2.0 * i, 2.0 * i + 1.0] for i in range(12)]
    assert batcher.max_rows_seen == 24
    assert len(wake_ups) == 2                 # the lone first request, then the batch of 12


def test_a_batch_closes_when_its_last_waiting_request_arrives_not_at_the_timeout():
    """With a 5 s batch window, 8 concurrent coroutines are answered at once: the batching thread waits
    for company only until every waiting request is queued (the last one wakes it)."""
    import asyncio

    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    batcher = RetrievalBatcher(lambda inputs: {"y": inputs["x"] + 1}, sig,
                               BatchingOptions(max_batch_size=64, batch_timeout_s=5.0))

    async def scenario():
        return await asyncio.gather(*[batcher.submit_async({"x": np.array([float(i)], np.float32)}, 1,
                                                           time.monotonic() + 30) for i in range(8)])

    try:
        start = time.monotonic()
        results = asyncio.run(scenario())
        elapsed = time.monotonic() - start
    finally:
        batcher.stop()
    assert [r["y"].tolist() for r in results] == [[i + 1.0] for i in range(8)]
    assert elapsed < 2.0, elapsed
    assert batcher.max_rows_seen >= 2


def test_batch_timeout_runs_from_the_first_request_arrival():
    """Requests that queued behind a running batch for longer than the batch timeout go as soon as the
    batching thread is free (TF Serving's rule), even while another request is still in flight: the
    old rule (timeout counted from when the thread took the first one) idled the graph for the whole
    timeout after every busy batch."""
    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    inline_gate, batch_gate = threading.Event(), threading.Event()
    started: list[tuple[float, int]] = []

    def run(inputs):
        started.append((time.monotonic(), len(inputs["x"])))
        if inputs["x"][0] == 100:
            inline_gate.wait(10)              # in flight the whole time, never in the queue
        elif inputs["x"][0] == 200:
            batch_gate.wait(10)               # keeps the batching thread busy while others queue
        return {"y": inputs["x"]}

    timeout_s = 1.0
    batcher = RetrievalBatcher(run, sig, BatchingOptions(max_batch_size=16, batch_timeout_s=timeout_s))

    def go(x: float) -> threading.Thread:
        t = threading.Thread(target=batcher.submit, args=({"x": np.array([x], np.float32)}, 1,
                                                          time.monotonic() + 30))
        t.start()
        return t

    try:
        threads = [go(100.0)]                 # idle batcher: runs inline in its caller and stays there
        assert _wait_for(lambda: len(started) == 1, timeout=10)
        threads.append(go(200.0))             # queued; after its own timeout it runs and holds the thread
        assert _wait_for(lambda: len(started) == 2, timeout=10)
        threads += [go(1.0), go(2.0)]         # queue up behind it ...
        time.sleep(timeout_s + 0.2)           # ... for longer than the batch timeout
        released = time.monotonic()
        batch_gate.set()
        assert _wait_for(lambda: len(started) == 3, timeout=10)
        # Both queued requests in one run, at once: not another second of waiting for company while
        # the in-flight inline request (which never queues) keeps the active count above the batch.
        assert started[2][1] == 2 and started[2][0] - released < 0.5 * timeout_s, (started, released)
    finally:
        inline_gate.set()
        batch_gate.set()
        for t in threads:
            t.join(10)
        batcher.stop()


def test_lone_request_does_not_wait_for_the_batch_timeout():
    sig = SignatureInfo("serving_default", "tensorflow/serving/predict",
                        {"x": TensorSpecInfo("x", tf.float32, (None,))},
                        {"y": TensorSpecInfo("y", tf.float32, (None,))}, {})
    batcher = RetrievalBatcher(lambda inputs: {"y": inputs["x"]}, sig,
                               BatchingOptions(max_batch_size=16, batch_timeout_s=2.0))
    try:
        t0 = time.monotonic()
        for _ in range(3):
            batcher.submit({"x": np.ones(1, np.float32)}, 1, time.monotonic() + 10)
        assert time.monotonic() - t0 < 1.0    # nobody else is waiting, so no 2 s batch timeout
        assert batcher.inline_runs == 3
    finally:
        batcher.stop()


# -- versions ------------------------------------------------------------------------------------------
def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hot_swap_under_load_then_broken_versions_are_refused(towers, tmp_path):
    base = tmp_path
    export(towers, base)
    srv = ModelServer(base / "csmf", "csmf", port=0, rest_api_port=0, poll_interval_s=0.1,
                      batching=BatchingOptions(max_batch_size=16, batch_timeout_s=0.002))
    srv.start()
    registry = srv.models.registry("csmf")
    try:
        users = users_np(towers, slice(0, 2))
        stop = threading.Event()
        versions: list[tuple[int, int]] = []      # (thread, version) in completion order
        errors: list[BaseException] = []

        def grpc_load(thread: int) -> None:
            with GrpcRetrievalClient(srv.grpc_target, "csmf", timeout_s=30) as c:
                while not stop.is_set():
                    try:
                        versions.append((thread, c.retrieve(users, k=5).version))
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

        def rest_load() -> None:
            c = RestRetrievalClient(srv.rest_url, "csmf", timeout_s=30)
            while not stop.is_set():
                try:
                    c.retrieve(users, [1.0, 1.0, 1.0], 5)
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=grpc_load, args=(i,)) for i in range(3)] + \
            [threading.Thread(target=rest_load)]
        for t in threads:
            t.start()
        try:
            assert _wait_for(lambda: len(versions) > 5)
            with registry.acquire() as old:
                pass
            export(towers, base, weights=(0.0, 0.0, 1.0))           # version 2 appears during the burst
            assert _wait_for(lambda: registry.served_versions() == [2])
            n = len(versions)
            assert _wait_for(lambda: len(versions) > n + 5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[:3]
        assert {v for _, v in versions} == {1, 2}
        for thread in range(3):   # each client sees 1 ... 1 2 ... 2: never the old version after the new
            seen = [v for t, v in versions if t == thread]
            assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == 2, seen
        assert _wait_for(lambda: old.closed)                        # v1 unloaded once its requests finished
        with GrpcRetrievalClient(srv.grpc_target, "csmf") as c:
            status = {s.version: s.state for s in c.status().model_version_status}
        assert status == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                          1: get_model_status_pb2.ModelVersionStatus.END}

        # version 3: truncated saved_model.pb -> refused, version 2 keeps serving
        v3 = base / "csmf" / "3"
        shutil.copytree(base / "csmf" / "2", base / "csmf" / ".tmp-3")
        pb = base / "csmf" / ".tmp-3" / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:1000])
        os.rename(base / "csmf" / ".tmp-3", v3)
        # version 4: loads, but its warm-up request asks for k above k_max -> refused as well
        shutil.copytree(base / "csmf" / "2", base / "csmf" / ".tmp-4")
        warm = base / "csmf" / ".tmp-4" / "assets.extra" / "tf_serving_warmup_requests"
        record = prediction_log_pb2.PredictionLog.FromString(next(iter(tf.data.TFRecordDataset(str(warm)))).numpy())
        record.predict_log.request.inputs["k"].CopyFrom(tf.make_tensor_proto(np.int32(1000)))
        with tf.io.TFRecordWriter(str(warm)) as w:
            w.write(record.SerializeToString())
        os.rename(base / "csmf" / ".tmp-4", base / "csmf" / "4")

        def refused() -> dict:
            code, body = http("GET", f"{srv.rest_url}/v1/models/csmf")
            return {int(s["version"]): s for s in body["model_version_status"]}

        assert _wait_for(lambda: {3, 4} <= set(refused()) and refused()[3]["state"] == "END"
                         and refused()[4]["state"] == "END", timeout=60)
        states = refused()
        assert states[3]["status"]["error_code"] == "UNKNOWN" and "failed to load" in states[3]["status"]["error_message"]
        assert "k_max" in states[4]["status"]["error_message"]
        assert states[2]["state"] == "AVAILABLE" and registry.served_versions() == [2]
        with GrpcRetrievalClient(srv.grpc_target, "csmf") as c:
            assert c.retrieve(users, k=3).version == 2
    finally:
        srv.stop()


# -- processes, CLI, one-shot helper -------------------------------------------------------------------------
def test_a_port_in_use_is_a_clear_error_and_releases_everything(model_v1):
    base, _ = model_v1

    def loop_threads():
        return sum(t.name == "grpc-aio" and t.is_alive() for t in threading.enumerate())

    before = loop_threads()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = ModelServer(base / "csmf", "csmf", port=port, rest_api_port=None, poll_interval_s=0, warmup=False)
        with pytest.raises(OSError, match=f"cannot bind gRPC to 127.0.0.1:{port}"):
            srv.start()
    assert srv.wait(timeout=5)                # stopped: registry unloaded, event-loop thread ended
    assert loop_threads() == before


def test_serve_cli_single_model_command_answers_then_drains_on_sigterm(model_v1, tmp_path, towers):
    """The single-model command as tensorflow_model_server takes it: --model_base_path is the model's
    own directory (a relative one resolves in the server's working directory), served under --model_name."""
    base, _ = model_v1
    shutil.copytree(base / "csmf", tmp_path / "saved_models" / "demo")
    port_file = tmp_path / "ports.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "--model_name", "demo", "--model_base_path",
                             "saved_models/demo", "--rest_api_port", "0", "--port", "0",
                             "--port_file", str(port_file), "--file_system_poll_wait_seconds", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(port_file.exists, timeout=120), proc.stdout.read().decode() if proc.poll() else ""
        ports = json.loads(port_file.read_text())
        user = users_np(towers, slice(0, 1))
        with GrpcRetrievalClient(f"127.0.0.1:{ports['grpc_port']}", "demo") as c:
            via_grpc = c.retrieve(user, k=3)
        via_rest = RestRetrievalClient(f"http://127.0.0.1:{ports['rest_port']}", "demo").retrieve(user, None, 3)
        assert via_grpc.version == 1 and via_grpc.item_ids == via_rest.item_ids and len(via_grpc.item_ids[0]) == 3
        code, body = http("GET", f"http://127.0.0.1:{ports['rest_port']}/v1/models/csmf")   # not served here
        assert code == 404 and "Servable not found" in body["error"] and "csmf" in body["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read().decode()
        assert "serving demo versions [1]" in output and "server stopped" in output
        with socket.socket() as s:                     # the port is closed
            assert s.connect_ex(("127.0.0.1", ports["grpc_port"])) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_retrieve_cli_prints_top_k(server, towers, reference, capsys):
    from pipelines import retrieve

    u = users_np(towers, slice(4, 5))
    want = expected(reference, u, [1.0, 0.5, 2.0], 4)["item_ids"][0].astype(str).tolist()
    for target in (["--grpc", server.grpc_target], ["--rest", server.rest_url]):
        code = retrieve.main([*target, "--model_name", "csmf", "--user_id", str(u["user_id"][0]),
                              "--feature", f"age={u['age'][0]}", "--feature", f"city={u['city'][0]}",
                              "--weights", "1,0.5,2", "--k", "4", "--json"])
        assert code == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["item_ids"] == [want]
        assert printed["objectives"] == list(towers.objectives)
    code = retrieve.main(["--grpc", server.grpc_target, "--user_id", "u1", "--feature", "age=3",
                          "--feature", "city=paris", "--k", "500"])
    assert code == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err
    code = retrieve.main(["--rest", server.rest_url, "--user_id", "u1", "--feature", "age=3",
                          "--feature", "city=paris", "--k", "3"])
    table = capsys.readouterr().out
    assert code == 0 and "exposure" in table and "conversion" in table and len(table.splitlines()) == 6


def test_serve_and_query_once_agrees(model_v1, towers, reference, capsys):
    base, _ = model_v1
    u = users_np(towers, slice(7, 8))
    plain = {"user_id": [str(u["user_id"][0])], "age": [int(round(float(u["age"][0])))],   # Python ints
             "city": [str(u["city"][0])]}                                              # for a float input
    result = serve_and_query_once(base / "csmf", "csmf", plain, [0.5, 1.0, 1.5], 6)
    want = expected(reference, dict(u, age=np.asarray(plain["age"], np.float32)), [0.5, 1.0, 1.5], 6)
    assert result["agree"] is True and result["version"] == 1
    assert result["grpc"]["item_ids"] == result["rest"]["item_ids"] == [want["item_ids"][0].astype(str).tolist()]
    np.testing.assert_allclose(result["rest"]["objective_scores"], want["objective_scores"], atol=1e-6)
    assert "same results" in capsys.readouterr().out
    with pytest.raises(ServingClientError):   # the server it started is gone
        RestRetrievalClient(f"http://127.0.0.1:{result['rest_port']}", timeout_s=2).status()
