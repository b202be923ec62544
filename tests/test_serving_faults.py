"""The server under faults: corrupt and oddly named version directories, an exporter killed mid-write,
plus short runs of the soak (benchmarks/soak_server.py) and fuzz (benchmarks/fuzz_server.py) benchmarks.

test_serving_server.py already covers a truncated ``saved_model.pb`` and a version whose warm-up fails;
this file covers the other ways a version directory can be broken, and crashes of the exporter.
Everything runs against real servers on 127.0.0.1 (in-process ``ModelServer`` or ``pipelines.serve``
subprocesses) with free ports, and every wait is bounded.
"""
import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from csmf_tf.serving.batching import BatchingOptions
from csmf_tf.testing.demo import build_demo_towers
from csmf_tf.serving.export import ScannOptions, export_retrieval_model
from csmf_tf.serving.layout import parse_version, remove_stale_scratch_dirs, scratch_dir, version_dirs
from csmf_tf.serving.server import ModelServer

REPO = Path(__file__).resolve().parents[1]
END = get_model_status_pb2.ModelVersionStatus.END
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
EXPORT_ARGS = dict(default_weights=[1.0, 0.5, 2.0], k_max=50, default_k=10, use_scann=True,
                   scann_options=ScannOptions(num_leaves=20, num_leaves_to_search=20, num_reordering_candidates=200))


@pytest.fixture(scope="module")
def towers():
    return build_demo_towers(num_users=30, num_items=400, dim=16, num_clusters=20, seed=3)


@pytest.fixture(scope="module")
def exported(towers, tmp_path_factory):
    """One good export (version 1); tests copy it instead of exporting again."""
    base = tmp_path_factory.mktemp("exported")
    path = export_retrieval_model(towers.user_model, towers.item_model, towers.item_catalog, towers.owner_stage,
                                  towers.objectives, base, "csmf", **EXPORT_ARGS)
    assert path.name == "1"
    return base


def _copy_base(exported: Path, dst: Path) -> Path:
    shutil.copytree(exported / "csmf", dst / "csmf")
    return dst


def _publish_copy(model_dir: Path, name: str, corrupt=None) -> Path:
    """Copy version 1 to ``name`` atomically (scratch dir + rename), corrupted by ``corrupt(path)`` first."""
    tmp = model_dir / f".tmp-copy-{name.encode().hex()}"
    shutil.copytree(model_dir / "1", tmp)
    if corrupt is not None:
        corrupt(tmp)
    os.rename(tmp, model_dir / name)
    return model_dir / name


def _request(towers, k=7, rows=slice(0, 3)):
    c = towers.user_catalog
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "csmf"
    for name, value in {"user_id": c.ids[rows].astype(str).astype(object),
                        "age": c.features["age"][rows].astype(np.float32),
                        "city": c.features["city"][rows].astype(str).astype(object),
                        "objective_weights": np.array([1.0, 0.5, 2.0], np.float32),
                        "k": np.int32(k)}.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return req


def _answer(stub, towers) -> tuple[int, np.ndarray, np.ndarray]:
    """(version, item_ids, scores) of one real gRPC query."""
    resp = stub.Predict(_request(towers), timeout=30)
    return (resp.model_spec.version.value, tf.make_ndarray(resp.outputs["item_ids"]),
            tf.make_ndarray(resp.outputs["scores"]))


def _rest_predict(server, towers) -> dict:
    c = towers.user_catalog
    body = {"inputs": {"user_id": c.ids[:3].astype(str).tolist(), "age": c.features["age"][:3].tolist(),
                       "city": c.features["city"][:3].astype(str).tolist(), "objective_weights": [1.0, 0.5, 2.0],
                       "k": 7}}
    req = urllib.request.Request(f"{server.rest_url}/v1/models/csmf:predict", data=json.dumps(body).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())["outputs"]


def _status(model_stub) -> dict[int, get_model_status_pb2.ModelVersionStatus]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "csmf"
    return {s.version: s for s in model_stub.GetModelStatus(req, timeout=30).model_version_status}


@pytest.fixture
def served(exported, tmp_path):
    """A server on a private copy of version 1 (poll thread on; tests also poll synchronously)."""
    base = _copy_base(exported, tmp_path / "base")
    srv = ModelServer(base / "csmf", "csmf", port=0, rest_api_port=0, poll_interval_s=0.2,
                      batching=BatchingOptions(max_batch_size=16, batch_timeout_s=0.002))
    srv.start()
    channel = grpc.insecure_channel(srv.grpc_target)
    try:
        yield (srv, base / "csmf", prediction_service_pb2_grpc.PredictionServiceStub(channel),
               model_service_pb2_grpc.ModelServiceStub(channel))
    finally:
        channel.close()
        srv.stop()


# -- corrupt version directories ---------------------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _data_file(version: Path) -> Path:
    return next((version / "variables").glob("variables.data-*"))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(64, len(data), 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    # version: (what is broken, how, a word the refusal message must contain)
    2: ("no variables/ directory", lambda p: shutil.rmtree(p / "variables"), "variables"),
    3: ("no variables.index", lambda p: (p / "variables" / "variables.index").unlink(), "variables"),
    4: ("truncated variables.data", lambda p: _truncate(_data_file(p)), ""),
    5: ("variables.data with flipped bytes (same size)", lambda p: _flip_bytes(_data_file(p)), "checksum"),
    6: ("truncated variables.index", lambda p: _truncate(p / "variables" / "variables.index", 0.3), ""),
    7: ("zero-byte saved_model.pb", lambda p: (p / "saved_model.pb").write_bytes(b""), "saved_model.pb"),
    8: ("empty directory", lambda p: [shutil.rmtree(c) if c.is_dir() else c.unlink() for c in list(p.iterdir())],
        "saved_model.pb"),
}


def test_corrupt_versions_are_refused_while_the_previous_version_keeps_serving(served, towers):
    srv, model_dir, stub, model_stub = served
    registry = srv.models.registry("csmf")
    before = _answer(stub, towers)
    rest_before = _rest_predict(srv, towers)
    assert before[0] == 1
    for version, (_, corrupt, _) in CORRUPTIONS.items():
        _publish_copy(model_dir, str(version), corrupt)
    registry.poll_once()                                  # synchronous: every new directory has been tried
    status = _status(model_stub)
    assert sorted(status) == [1, *CORRUPTIONS]
    assert status[1].state == AVAILABLE
    for version, (what, _, needle) in CORRUPTIONS.items():
        s = status[version]
        assert s.state == END and s.status.error_code == grpc.StatusCode.UNKNOWN.value[0], (what, s)
        message = s.status.error_message
        assert message.startswith("failed to load or warm up"), (what, message)
        assert needle.lower() in message.lower(), (what, message)
    assert registry.served_versions() == [1]
    version, ids, scores = _answer(stub, towers)            # the same answer, from version 1
    assert version == 1 and np.array_equal(ids, before[1]) and np.array_equal(scores, before[2])
    assert _rest_predict(srv, towers) == rest_before

    # A refused version is retried once any of its files changes -- here the truncated data file of
    # version 4 is replaced by a good copy (neither saved_model.pb nor the version directory changes).
    registry.poll_once()
    assert registry.served_versions() == [1]              # unchanged files: not retried, still refused
    shutil.copyfile(_data_file(model_dir / "1"), _data_file(model_dir / "4"))
    registry.poll_once()
    assert registry.served_versions() == [4]              # 5..8 stay refused; 4 is now the highest good one
    version, ids, scores = _answer(stub, towers)
    assert version == 4 and np.array_equal(ids, before[1]) and np.allclose(scores, before[2], atol=1e-6)
    status = _status(model_stub)
    assert status[4].state == AVAILABLE and status[1].state == END
    assert all(status[v].state == END and status[v].status.error_message for v in (2, 3, 5, 6, 7, 8))


def test_directory_names_that_are_not_versions_are_ignored(served, towers):
    srv, model_dir, stub, model_stub = served
    registry = srv.models.registry("csmf")
    before = _answer(stub, towers)
    odd = ["notes", "v2", "-3", "1e3", "²", "０９", "１２", str(2 ** 63), "1" * 30, ".7", "7 ", " 8"]
    for name in odd:                                      # each one a complete, loadable copy of version 1
        _publish_copy(model_dir, name)
    (model_dir / "99").write_text("a file, not a directory")
    registry.poll_once()                                  # must not raise on any of these names
    assert registry.served_versions() == [1]
    assert sorted(_status(model_stub)) == [1]
    assert _answer(stub, towers)[0] == 1
    assert sorted(version_dirs(model_dir)) == [1]
    assert [parse_version(n) for n in ["0", "12", "007", str(2 ** 63 - 1), str(2 ** 63), "²", "١", "+1", ""]] == \
        [0, 12, 7, 2 ** 63 - 1, None, None, None, None, None]

    # A real next version still gets the right number (max + 1) and is picked up.
    _publish_copy(model_dir, "2")
    registry.poll_once()
    assert registry.served_versions() == [2]
    version, ids, scores = _answer(stub, towers)
    assert version == 2 and np.array_equal(ids, before[1])


# -- an exporter killed mid-write -------------------------------------------------------------------------------
_EXPORT_SCRIPT = """
import csmf_tf
from csmf_tf.testing.demo import build_demo_towers
from csmf_tf.serving.export import ScannOptions, export_retrieval_model
d = build_demo_towers(num_users=30, num_items=400, dim=16, num_clusters=20, seed=5)
export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives, {base!r}, "csmf",
                       k_max=50, use_scann=True, scann_options=ScannOptions(num_leaves=20, num_leaves_to_search=20,
                                                                            num_reordering_candidates=200))
print("export finished", flush=True)
"""


def _scratch_dirs(model_dir: Path) -> list[Path]:
    return [p for p in model_dir.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]


def test_export_killed_mid_write_leaves_no_version_and_the_next_export_recovers(served, towers):
    srv, model_dir, stub, model_stub = served
    registry = srv.models.registry("csmf")
    before = _answer(stub, towers)
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_SCRIPT.format(base=str(model_dir.parent))], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = None
    try:
        # Kill it while TensorFlow writes the SavedModel into its scratch directory (the checkpoint
        # comes first): the export then still has saved_model.pb, assets, the warm-up file, a
        # verification load, fsync and the rename ahead of it.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            found = [d for d in _scratch_dirs(model_dir) if (d / "variables").exists()]
            if found:
                victim = found[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode(errors="replace")
    assert victim is not None, f"the exporter ended before it was killed (rc {proc.returncode}):\n{output[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert "export finished" not in output

    # What the crash left: the scratch directory and its lock file, no version.
    assert victim.is_dir()
    assert (model_dir / (victim.name + ".lock")).is_file()
    assert sorted(version_dirs(model_dir)) == [1]
    registry.poll_once()
    assert registry.served_versions() == [1] and sorted(_status(model_stub)) == [1]
    version, ids, scores = _answer(stub, towers)
    assert version == 1 and np.array_equal(ids, before[1]) and np.array_equal(scores, before[2])

    # The next export gets version 2 and removes the dead exporter's leftovers -- but neither a scratch
    # directory whose exporter is alive (its lock is held) nor one some other tool made (no lock file).
    foreign = model_dir / ".tmp-foreign"
    foreign.mkdir()
    with scratch_dir(model_dir) as live:
        live.mkdir()
        (live / "partial").write_text("being written")
        path = export_retrieval_model(towers.user_model, towers.item_model, towers.item_catalog, towers.owner_stage,
                                      towers.objectives, model_dir.parent, "csmf", **EXPORT_ARGS)
        assert path == model_dir / "2"
        assert not victim.exists() and not (model_dir / (victim.name + ".lock")).exists()
        assert live.is_dir() and foreign.is_dir()
        assert remove_stale_scratch_dirs(model_dir) == []            # nothing else is stale
    assert not live.exists() and not (model_dir / (live.name + ".lock")).exists()
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-foreign", "1", "2"]
    registry.poll_once()
    assert registry.served_versions() == [2]
    version, ids, _ = _answer(stub, towers)                  # same towers, so the same items
    assert version == 2 and np.array_equal(ids, before[1])


# -- short soak and fuzz runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark_runs(exported, tmp_path_factory):
    """The short soak and the short fuzz, started together (each mostly waits on its own server, so
    running them side by side keeps this file within its CI time budget); ``{name: (rc, log, json path)}``."""
    work = tmp_path_factory.mktemp("benchmarks")
    runs = {
        "soak": ("soak_server.py", [
            "--duration", "20", "--rate", "40", "--model_base_path", str(exported / "csmf"), "--num_users", "30",
            "--num_items", "400", "--dim", "16", "--swap_at", "0.1", "--rss_interval_s", "1", "--warmup_s", "5"]),
        "fuzz": ("fuzz_server.py", [
            "--requests", "500", "--seed", "7", "--model_base_path", str(exported / "csmf"), "--num_users", "30",
            "--max_message_bytes", str(1 << 20), "--deadline_s", "60"]),
    }
    procs = {}
    for name, (script, args) in runs.items():
        log = open(work / f"{name}.log", "wb")
        procs[name] = (subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / script), *args, "--workdir", str(work / name),
             "--out", str(work / f"{name}.json")], cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            stdout=log, stderr=subprocess.STDOUT), log)
    out = {}
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        out[name] = (rc, (work / f"{name}.log").read_text(errors="replace"), work / f"{name}.json")
    return out


def test_short_soak_hot_swaps_under_load_without_errors(benchmark_runs):
    rc, log, out = benchmark_runs["soak"]
    assert rc == 0, log[-4000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["errors"] == 0 and r["unanswered"] == 0 and not r["errors_by_code"], r["failures"]
    assert r["duration_s"] >= 20 and r["requests_sent"] >= 0.9 * 40 * r["duration_s"]
    assert r["sent_by_transport"]["rest"] >= 0.05 * r["requests_sent"]
    assert r["latency_all"]["p50_ms"] > 0 and r["latency_all"]["p99_ms"] >= r["latency_all"]["p50_ms"]
    (swap,) = r["swaps"]
    assert swap["observed"] and swap["version"] == 2 and swap["first_answer_s"] >= swap["published_s"] - 1.0
    assert set(r["answers_by_version"]) == {"1", "2"}         # answers from both versions, none failed
    m = r["memory"]
    assert m["samples"] >= 10 and 0 < m["rss_start_mb"] <= m["rss_max_mb"]
    assert m["slope_mb_per_min"] is not None and m["growth_after_warmup_mb"] < 150
    assert r["server_alive_at_end"] and r["server_exit_code"] == 0
    assert "requests sent" in log and "PASSED" in log


def test_short_fuzz_gets_a_status_for_every_request_and_never_a_server_fault(benchmark_runs):
    rc, log, out = benchmark_runs["fuzz"]
    assert rc == 0, log[-4000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["requests"] == 500 and r["failures"] == 0, r["failure_examples"][:5]
    assert r["server_fault_statuses"] == 0 and r["no_answer"] == 0 and r["crashes"] == 0
    assert r["server_alive_at_end"] and r["reference_answer_unchanged"] and r["server_exit_code"] == 0
    assert r["answer_rows_checked"] > 50 and r["mean_recall_vs_exact"] >= 0.8
    dist = r["status_distribution"]
    assert sum(dist.values()) == 500
    # Both transports, valid and invalid requests: the distribution must show all of them.
    for key in ("grpc:OK", "grpc:INVALID_ARGUMENT", "grpc:NOT_FOUND", "rest:HTTP_200", "rest:HTTP_400"):
        assert dist.get(key, 0) > 0, (key, dist)
    assert not any(k.endswith(("INTERNAL", "UNKNOWN", "HTTP_500", "HTTP_503", "HTTP_504")) for k in dist)
