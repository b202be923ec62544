"""TF Serving's configuration of the server: several models from a ``--model_config_file`` (version
policies, labels, reloads while serving, refusals naming the file and the field) and Prometheus metrics
from a ``--monitoring_config_file``, scraped during real gRPC and REST traffic.

Real servers on 127.0.0.1 with free ports (in-process ``ModelServer``; one ``pipelines.serve``
subprocess for the start-up refusal), every wait bounded.
"""
import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)

import json
import os
import shutil
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
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from csmf_tf.serving.export import export_retrieval_model
from csmf_tf.serving.model_config import ModelConfigError, read_model_config
from csmf_tf.serving.monitoring import DEFAULT_PROMETHEUS_PATH, MonitoringConfigError, read_monitoring_config
from csmf_tf.serving.server import ModelServer
from csmf_tf.testing.demo import build_demo_towers

REPO = Path(__file__).resolve().parents[1]
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.fixture(scope="module")
def towers():
    return build_demo_towers(num_users=30, num_items=300, dim=16, num_clusters=10, seed=5)


@pytest.fixture(scope="module")
def version_1(towers, tmp_path_factory):
    """One exact-search export; the models below are directories of copies of it."""
    base = tmp_path_factory.mktemp("export")
    return export_retrieval_model(towers.user_model, towers.item_model, towers.item_catalog, towers.owner_stage,
                                  towers.objectives, base, "csmf", default_weights=[1.0, 0.5, 2.0], k_max=20,
                                  default_k=5, use_scann=False)


def model_dir(version_1: Path, root: Path, versions: tuple[int, ...]) -> Path:
    """A model directory holding ``versions``, each a copy of the export."""
    for v in versions:
        shutil.copytree(version_1, root / str(v))
    return root


def users(towers, rows=slice(0, 2)) -> dict:
    c = towers.user_catalog
    return {"user_id": c.ids[rows].astype(str).astype(object), "age": c.features["age"][rows].astype(np.float32),
            "city": c.features["city"][rows].astype(str).astype(object)}


def grpc_request(towers, model: str, version: int | None = None, label: str | None = None, rows=slice(0, 2)):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for k, v in users(towers, rows).items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    req.inputs["k"].CopyFrom(tf.make_tensor_proto(np.int32(4)))
    return req


def rest(method: str, url: str, body=None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if resp.headers["Content-Type"] == "application/json" else raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rest_body(towers, rows=slice(0, 2)) -> dict:
    u = users(towers, rows)
    return {"inputs": {"user_id": u["user_id"].astype(str).tolist(), "age": u["age"].tolist(),
                       "city": u["city"].astype(str).tolist(), "k": 4}}


def write_atomically(path: Path, text: str) -> None:
    """How a config file should be replaced under a polling server: whole, never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(predicate, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


TWO_MODELS = """
model_config_list {
  config {
    name: "alpha"
    base_path: "%(alpha)s"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 3 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 3 }
  }
  config {
    name: "beta"
    base_path: "%(beta)s"
    model_version_policy { latest { num_versions: 2 } }
  }
}
"""


@pytest.fixture(scope="module")
def two_models(version_1, tmp_path_factory):
    """alpha: versions 1, 2, 3 on disk, specific {1, 3}, labels stable -> 1, canary -> 3;
    beta: versions 1, 2, 3 on disk, latest 2. Prometheus on at the default path."""
    root = tmp_path_factory.mktemp("models")
    alpha = model_dir(version_1, root / "alpha", (1, 2, 3))
    beta = model_dir(version_1, root / "beta", (1, 2, 3))
    config = root / "models.config"
    config.write_text(TWO_MODELS % {"alpha": alpha, "beta": beta})
    monitoring = root / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    srv = ModelServer(model_config_file=config, monitoring_config_file=monitoring, port=0, rest_api_port=0,
                      poll_interval_s=0)
    srv.start()
    channel = grpc.insecure_channel(srv.grpc_target)
    yield srv, prediction_service_pb2_grpc.PredictionServiceStub(channel), \
        model_service_pb2_grpc.ModelServiceStub(channel), root
    channel.close()
    srv.stop()


def status(model_stub, name: str) -> dict[int, int]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = name
    return {s.version: s.state for s in model_stub.GetModelStatus(req, timeout=30).model_version_status}


def test_two_models_answer_with_their_version_policies_and_labels(two_models, towers):
    srv, predict, model_service, _ = two_models
    assert srv.models.served_versions() == {"alpha": [1, 3], "beta": [2, 3]}
    assert status(model_service, "alpha") == {1: AVAILABLE, 3: AVAILABLE}       # 2 is on disk, not asked for
    assert status(model_service, "beta") == {2: AVAILABLE, 3: AVAILABLE}        # latest 2 of 1, 2, 3

    def version_of(**kw) -> int:
        return predict.Predict(grpc_request(towers, **kw), timeout=30).model_spec.version.value

    assert version_of(model="alpha") == 3 and version_of(model="beta") == 3    # no version: the highest served
    assert version_of(model="alpha", label="stable") == 1
    assert version_of(model="alpha", label="canary") == 3
    assert version_of(model="beta", version=2) == 2
    for kw, needle in [(dict(model="alpha", version=2), "Specific(alpha, 2)"),    # on disk, not in the policy
                       (dict(model="beta", version=1), "Specific(beta, 1)"),      # below latest 2
                       (dict(model="alpha", label="beta"), "label: beta"),
                       (dict(model="gamma"), "Latest(gamma)")]:                   # not a served model
        with pytest.raises(grpc.RpcError) as err:
            predict.Predict(grpc_request(towers, **kw), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and needle in err.value.details(), err.value.details()

    # The same over REST, and both models give the same items (their versions are copies of one export).
    code, by_label = rest("POST", f"{srv.rest_url}/v1/models/alpha/labels/stable:predict", rest_body(towers))
    assert code == 200
    code, beta_answer = rest("POST", f"{srv.rest_url}/v1/models/beta:predict", rest_body(towers))
    assert code == 200 and beta_answer["outputs"]["item_ids"] == by_label["outputs"]["item_ids"]
    code, body = rest("GET", f"{srv.rest_url}/v1/models/gamma")
    assert code == 404 and "gamma" in body["error"]
    code, body = rest("GET", f"{srv.rest_url}/v1/models/alpha/labels/canary/metadata")
    assert code == 200 and body["model_spec"]["version"] == "3"


def scrape(srv) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of one Prometheus scrape of the server."""
    with urllib.request.urlopen(srv.rest_url + DEFAULT_PROMETHEUS_PATH, timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_prometheus_metrics_move_with_real_grpc_and_rest_traffic(two_models, towers):
    srv, predict, _, root = two_models
    before = scrape(srv)
    rows = 2
    for _ in range(5):                                              # gRPC, alpha through its label -> v1
        predict.Predict(grpc_request(towers, model="alpha", label="stable"), timeout=30)
    for _ in range(3):                                              # REST, beta's latest -> v3
        assert rest("POST", f"{srv.rest_url}/v1/models/beta:predict", rest_body(towers))[0] == 200
    with pytest.raises(grpc.RpcError):                              # a model that is not served
        predict.Predict(grpc_request(towers, model="nope"), timeout=30)
    assert rest("POST", f"{srv.rest_url}/v1/models/alpha/versions/2:predict", rest_body(towers))[0] == 404
    assert rest("GET", f"{srv.rest_url}/v1/models/beta")[0] == 200
    # A burst of concurrent requests: however they are batched, the batches hold exactly their rows.
    burst = [threading.Thread(target=predict.Predict, args=(grpc_request(towers, model="beta", version=2,
                                                                         rows=slice(i, i + 1)),),
                              kwargs={"timeout": 30}) for i in range(8)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(60)
    after = scrape(srv)

    def moved(name: str, **labels) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    req = "csmf_serving_requests_total"
    ok_grpc = dict(model="alpha", version="1", signature="serving_default", api="grpc", method="Predict", code="OK")
    assert moved(req, **ok_grpc) == 5
    assert moved(req, model="beta", version="3", signature="serving_default", api="rest", method="Predict",
                 code="200") == 3
    assert moved(req, model="", version="", signature="", api="grpc", method="Predict", code="NOT_FOUND") == 1
    assert moved(req, model="alpha", version="", signature="", api="rest", method="Predict", code="404") == 1
    assert moved(req, model="beta", version="", signature="", api="rest", method="GetModelStatus", code="200") == 1
    assert moved(req, model="beta", version="2", signature="serving_default", api="grpc", method="Predict",
                 code="OK") == 8
    # Latency histograms count every request (errors too), into cumulative buckets.
    lat = "csmf_serving_request_latency_seconds"
    assert moved(lat + "_count", model="alpha", api="grpc", method="Predict") == 5
    assert moved(lat + "_count", model="beta", api="rest", method="Predict") == 3
    assert moved(lat + "_count", model="", api="grpc", method="Predict") == 1
    assert moved(lat + "_sum", model="alpha", api="grpc", method="Predict") > 0
    assert sample(after, lat + "_bucket", model="alpha", api="grpc", method="Predict", le="+Inf") == \
        sample(after, lat + "_count", model="alpha", api="grpc", method="Predict")
    # Batch sizes: requests one at a time run alone (5 runs of 2 rows, 3 runs of 2 rows); the burst's
    # 8 one-row requests run in at most 8 batches that hold 8 rows in all.
    size = "csmf_serving_batch_size"
    assert moved(size + "_count", model="alpha", version="1") == 5
    assert moved(size + "_sum", model="alpha", version="1") == 5 * rows
    assert moved(size + "_count", model="beta", version="3") == 3
    assert moved(size + "_sum", model="beta", version="3") == 3 * rows
    assert 1 <= moved(size + "_count", model="beta", version="2") <= 8
    assert moved(size + "_sum", model="beta", version="2") == 8
    # Every graph run is timed, and every request a batch took from the queue has its wait counted:
    # gRPC requests always queue, a REST request that finds the batcher idle runs in its own thread.
    run, wait = "csmf_serving_batch_run_seconds", "csmf_serving_batch_queue_wait_seconds"
    for model, version in (("alpha", "1"), ("beta", "3"), ("beta", "2")):
        assert moved(run + "_count", model=model, version=version) == moved(size + "_count", model=model,
                                                                            version=version)
        assert moved(run + "_sum", model=model, version=version) > 0
    assert moved(wait + "_count", model="alpha", version="1") == 5
    assert moved(wait + "_count", model="beta", version="2") == 8
    assert moved(wait + "_count", model="beta", version="3") == 0
    assert sample(after, wait + "_bucket", model="beta", version="2", le="+Inf") == \
        sample(after, wait + "_count", model="beta", version="2")
    # Loaded versions and queue depths are read from what is served at scrape time.
    loaded = {dict(labels)["model"] + "/" + dict(labels)["version"]: value for (name, labels), value in after.items()
              if name == "csmf_serving_model_version_loaded"}
    assert loaded == {"alpha/1": 1, "alpha/3": 1, "beta/2": 1, "beta/3": 1}
    assert sample(after, "csmf_serving_batch_queue_depth", model="beta", version="2") == 0
    # The scrapes themselves are not requests.
    assert not any(name == req and dict(labels)["method"] == "other" for name, labels in after)

    # A broken version is refused and counted; the served versions do not change.
    (root / "beta" / "9").mkdir()
    srv.models.registry("beta").poll_once()
    final = scrape(srv)
    assert sample(final, "csmf_serving_model_load_failures_total", model="beta") == \
        sample(after, "csmf_serving_model_load_failures_total", model="beta") + 1
    assert srv.models.served_versions()["beta"] == [2, 3]


@pytest.mark.parametrize("text, field", [
    ('model_config_list { config { name: "a" base_path: "%(ok)s" ', "not a tensorflow.serving.ModelServerConfig"),
    ('model_config_list { config { name: "a" bse_path: "%(ok)s" } }', 'no field named "bse_path"'),
    ('model_config_list { config { name: "a" } }', "model_config_list.config[0].base_path: missing"),
    ('model_config_list { config { name: "a" base_path: "%(ok)s/absent" } }',
     "model_config_list.config[0].base_path: %(ok)s/absent does not exist"),
    ('model_config_list { config { name: "a" base_path: "%(ok)s" } config { name: "a" base_path: "%(ok)s" } }',
     "model_config_list.config[1].name: model 'a' is already configured by model_config_list.config[0]"),
    ('model_config_list { config { name: "a" base_path: "%(ok)s" version_labels { key: "stable" value: 7 } } }',
     "model_config_list.config[0].version_labels['stable']: label 'stable' points to version 7"),
    ('model_config_list { config { name: "a" base_path: "%(ok)s" '
     'model_version_policy { latest { num_versions: 1 } } version_labels { key: "old" value: 1 } } }',
     "model_config_list.config[0].version_labels['old']"),                        # on disk, below latest 1
    ('model_config_list { config { name: "a" base_path: "%(ok)s" model_version_policy { specific { } } } }',
     "model_config_list.config[0].model_version_policy.specific.versions: empty"),
    ("", "model_config_list: no model is configured"),
])
def test_bad_model_configs_are_refused_naming_the_file_and_the_field(tmp_path, text, field):
    ok = tmp_path / "model"
    (ok / "1").mkdir(parents=True)
    (ok / "2").mkdir()
    path = tmp_path / "models.config"
    path.write_text(text % {"ok": ok})
    with pytest.raises(ModelConfigError) as err:
        read_model_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and field % {"ok": ok} in message, message


def test_server_arguments_and_monitoring_configs_are_checked(tmp_path, version_1):
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "a" base_path: "{version_1.parent}" }} }}')
    with pytest.raises(ModelConfigError, match="mutually exclusive"):
        ModelServer(version_1.parent, "a", model_config_file=config)
    with pytest.raises(ModelConfigError, match="--model_base_path: .*absent does not exist"):
        ModelServer(tmp_path / "absent", "a")
    with pytest.raises(ModelConfigError, match="--version_label.*'x' points to version 5"):
        ModelServer(version_1.parent, "a", version_labels={"x": 5})

    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    assert read_monitoring_config(monitoring) == DEFAULT_PROMETHEUS_PATH
    monitoring.write_text("prometheus_config { enable: false, path: '/m' }")
    assert read_monitoring_config(monitoring) is None
    monitoring.write_text("prometheus_config { enabled: true }")
    with pytest.raises(MonitoringConfigError, match=f'^{monitoring}: .*no field named "enabled"'):
        read_monitoring_config(monitoring)
    monitoring.write_text("prometheus_config { enable: true, path: '/v1/models/metrics' }")
    with pytest.raises(MonitoringConfigError, match=r"prometheus_config\.path"):
        read_monitoring_config(monitoring)
    monitoring.write_text("prometheus_config { enable: true }")
    with pytest.raises(ModelConfigError, match="REST port, which is off"):
        ModelServer(version_1.parent, "a", monitoring_config_file=monitoring, rest_api_port=None)


def test_a_broken_config_stops_the_start_up_with_one_line(tmp_path, version_1):
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{\n  config {{ name: "a" base_path: "{version_1.parent}" }}\n'
                      f'  config {{ name: "b" base_path: "{tmp_path}/missing" }}\n}}\n')
    result = subprocess.run([sys.executable, "-m", "pipelines.serve", "--model_config_file", str(config),
                             "--port", "0", "--rest_api_port", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"serve: error: {config}: model_config_list.config[1].base_path: {tmp_path}/missing "
                    "does not exist"), result.stderr[-2000:]


def test_config_reload_refuses_broken_files_while_serving_then_applies_a_fixed_one(version_1, towers, tmp_path,
                                                                                  caplog):
    alpha = model_dir(version_1, tmp_path / "alpha", (1, 3))
    beta = model_dir(version_1, tmp_path / "beta", (4,))
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "alpha" base_path: "{alpha}" }} }}')
    srv = ModelServer(model_config_file=config, model_config_file_poll_wait_s=0.1, port=0, rest_api_port=0,
                      poll_interval_s=0)
    srv.start()
    channel = grpc.insecure_channel(srv.grpc_target)
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def failures() -> float:
        return srv.metrics.registry.get_sample_value("csmf_serving_config_reload_failures_total")

    def answers(model: str) -> int:
        return predict.Predict(grpc_request(towers, model=model), timeout=30).model_spec.version.value

    try:
        assert srv.models.served_versions() == {"alpha": [3]} and answers("alpha") == 3
        broken = [
            (f'model_config_list {{ config {{ name: "alpha" base_pth: "{alpha}" }} }}', 'no field named "base_pth"'),
            (f'model_config_list {{ config {{ name: "alpha" base_path: "{alpha}" }} '
             f'config {{ name: "beta" base_path: "{beta}" version_labels {{ key: "stable" value: 2 }} }} }}',
             "model_config_list.config[1].version_labels['stable']"),
        ]
        for count, (text, field) in enumerate(broken, start=1):
            with caplog.at_level("ERROR", logger="csmf_tf.serving.server"):
                write_atomically(config, text)
                assert wait_for(lambda: failures() == count, timeout=30)
                assert answers("alpha") == 3                         # still serving, unchanged
            refusal = [r.getMessage() for r in caplog.records if "refusing the new model config" in r.getMessage()]
            assert refusal and str(config) in refusal[-1] and field in refusal[-1], refusal
            assert srv.models.names() == ["alpha"]
        time.sleep(0.3)                                              # unchanged broken file: counted once
        assert failures() == len(broken)

        write_atomically(config, f'model_config_list {{ config {{ name: "alpha" base_path: "{alpha}" '
                                 f'model_version_policy {{ specific {{ versions: 1 }} }} }} config {{ name: "beta" '
                                 f'base_path: "{beta}" version_labels {{ key: "stable" value: 4 }} }} }}')
        assert wait_for(lambda: srv.models.served_versions() == {"alpha": [1], "beta": [4]}, timeout=60)
        assert answers("alpha") == 1 and answers("beta") == 4
        req = grpc_request(towers, model="beta", label="stable")
        assert predict.Predict(req, timeout=30).model_spec.version.value == 4
        assert failures() == len(broken)
    finally:
        channel.close()
        srv.stop()
