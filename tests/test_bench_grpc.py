"""A short run of the end-to-end gRPC benchmark (benchmarks/bench_grpc.py): its three servers, the
bound it reads the model server against, and the CPU accounting, on a small brute-force demo export.

The numbers of a one-second run on shared CI cores say nothing about speed; what is checked is the
benchmark's contract: every server answered without errors and exited cleanly after SIGTERM, the
front end alone (the model server with its graph replaced by a cached answer) really skipped the
graph, and every share and CPU figure the committed reports quote is computed from its parts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "model (batching on)"
FRONT_END = "front end only (graph replaced by a cached answer)"
FIXED = "fixed response (transport only)"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench_grpc")
    out = work / "bench_grpc.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_grpc.py"), "--num_items", "2000", "--num_users", "200",
         "--dim", "16", "--brute_force", "--duration", "1.5", "--warmup", "0.5", "--rounds", "1",
         "--concurrency", "4", "--ceiling_seconds", "0.5", "--export_dir", str(work / "export"), "--out", str(out)],
        cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_server_answers_without_errors_and_exits_cleanly(report):
    results, _ = report
    rows = {r["server"]: r for r in results["runs"]}
    assert set(rows) == {MODEL, FRONT_END, FIXED}
    for r in rows.values():
        assert r["errors"] == 0 and r["requests"] > 0, r
    assert results["server_exit_codes"] == [0, 0]      # the model server and the front end drain on SIGTERM


def test_front_end_skips_the_graph(report):
    rows = {r["server"]: r for r in report[0]["runs"]}
    # Both read from the servers' own Prometheus histograms: a cached answer is a copy, not a search.
    assert rows[FRONT_END]["graph_run_ms"] < 0.5 * rows[MODEL]["graph_run_ms"], rows


def test_shares_and_cpu_figures_come_from_their_parts(report):
    results, stdout = report
    rows = {r["server"]: r for r in results["runs"]}
    model, front, fixed = rows[MODEL], rows[FRONT_END], rows[FIXED]
    graph = {c["batch"]: c["qps_ceiling"] for c in results["graph_ceiling"]}[4]
    bound = 1.0 / (1.0 / graph + 1.0 / fixed["qps"])
    assert model["bound_qps"] == pytest.approx(bound)
    assert model["share_of_bound"] == pytest.approx(model["qps"] / bound)
    assert model["front_end_share_of_bound"] == pytest.approx(front["qps"] / bound)
    assert front["share_of_transport"] == pytest.approx(front["qps"] / fixed["qps"])
    cores = results["machine"]["cpus"]
    for r in rows.values():
        per_request = r["server_cpu_ms_per_request"] + r["load_generator_cpu_ms_per_request"]
        assert per_request > 0 and 0 < r["cores_busy"] <= cores + 0.5, r
        assert r["cpu_bound_qps"] == pytest.approx(1e3 * cores / per_request)
    assert "front end share of bound" in stdout and "CPU-bound QPS" in stdout
