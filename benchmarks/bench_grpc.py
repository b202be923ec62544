"""End-to-end gRPC serving benchmark: p50/p99 latency, QPS and errors at several concurrencies (not a test).

    python benchmarks/bench_grpc.py                               # exports a 100k-item demo model first
    python benchmarks/bench_grpc.py --duration 5                  # quick run
    python benchmarks/bench_grpc.py --model_base_path saved_models/csmf --model_name csmf --duration 60

The server runs as its own process (``python -m pipelines.serve``), as in production, so the load
generator here does not share its interpreter; every request goes through the stock
``PredictionServiceStub`` with a random user, random objective weights and ``k``.

The same load generator then drives a fixed-response ``grpc.aio`` server (no decoding, no model) at
the same concurrencies: the transport's own ceiling on this machine, measured in the same run, so
the model server's QPS can be read as a share of what any Python gRPC front end could reach here.
Client and servers share the machine's cores, as they would on a 2-core benchmark box. A third
server is the model server itself with its retrieval graph replaced by a cached answer
(:func:`serve_canned_graph`): the front end alone, every per-request step of the model server but
the graph, so the gap to the bound splits into what the graph costs and what the requests cost.
Every level also records the CPU the server and the load generator spent per answered request
(``/proc`` and ``getrusage``): on shared cores QPS cannot exceed ``cores / (their sum)``
(``cpu_bound_qps``), and ``cores_busy`` says how close to that the level ran.

Each model run is read against the **harmonic bound** of the two ceilings at its concurrency ``c``:
the served graph in-process at the batch the micro-batcher can form (``min(c, max_batch_size)``;
batch 1 without batching) costs ``1/G`` seconds per query, the transport alone ``1/T``; on shared
cores a request costs at least both, so ``QPS <= 1 / (1/G + 1/T)``. ``share_of_bound`` is the
measured QPS over that bound (target: >= 0.9 at concurrency 32 with no errors). The model server
runs with Prometheus metrics on (as a monitored production server would); its batch-size histogram
gives the rows per graph run it really formed (``served_batch_mean``, warm-up included), and
``share_of_bound_at_served_batch`` reads the QPS against the bound with the graph ceiling at that
batch (interpolated between the measured batch sizes): how much of the gap is batches that are
smaller than ``min(c, max_batch_size)``, and how much is per-request work. The same
Prometheus page splits each model request's mean latency: ``server_ms`` (the RPC handler, from the
request histogram), of which ``queue_wait_ms`` (waiting in the batching queue) and ``graph_run_ms``
(the graph run of its batch), and ``outside_server_ms`` (the client's mean latency minus
``server_ms``: both gRPC stacks and event loops, and the wire). With ``--profile`` the model server is
sampled by ``py-spy`` during the highest concurrency level of the last round and the functions that
took the server's time are written to the JSON (``profile``).

Both servers run side by side and the levels alternate between them, ``--rounds`` times (default 3):
on a shared machine the QPS of one command moves by 20-30 % between runs, so every number is the
median over the rounds and ``share_of_bound`` is the median of each round's own share (``runs``; every
round's rows are in ``round_runs``).

    python benchmarks/bench_grpc.py --num_items 1000000 --export_dir /tmp/bench_1m   # keeps the export
    python benchmarks/bench_grpc.py --profile                     # + py-spy profile of the server at c=32
    python benchmarks/bench_grpc.py --trained_items 100000 --cache /tmp/annbench/cache   # trained vectors
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_io import write_results  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
import csmf_tf  # noqa: E402,F401  (tf-keras before TensorFlow)
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from csmf_tf.scoring import fusion_scales_tf  # noqa: E402
from csmf_tf.serving.monitoring import DEFAULT_PROMETHEUS_PATH as METRICS_PATH  # noqa: E402


def export_demo(base: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """Export untrained demo towers (clustered items) with the ScaNN index; returns the version and users.

    The users are saved next to the model (``base/demo_users.npz``, with the export's settings), so
    that ``--export_dir`` can reuse a large export instead of rebuilding it on every run.
    """
    from csmf_tf.testing.demo import build_demo_towers
    from csmf_tf.serving.export import ScannOptions, export_retrieval_model

    settings = {"num_items": args.num_items, "num_users": args.num_users, "dim": args.dim,
                "brute_force": args.brute_force, "scann_num_leaves": args.scann_num_leaves,
                "scann_leaves_fraction": args.scann_leaves_fraction, "scann_reorder": args.scann_reorder}
    saved = base / "demo_users.npz"
    if saved.exists():
        with np.load(saved) as f:
            kept = json.loads(str(f["settings"]))
            if kept != settings:
                raise SystemExit(f"{base} holds a demo export made with {kept}, not {settings}; "
                                 "pick another --export_dir")
            versions = sorted((p for p in (base / args.model_name).iterdir() if p.name.isdigit()),
                              key=lambda p: int(p.name))
            print(f"reusing {versions[-1]}", flush=True)
            return versions[-1], {k: f[k] for k in ("user_id", "age", "city")}
    t0 = time.perf_counter()
    d = build_demo_towers(num_users=args.num_users, num_items=args.num_items, dim=args.dim,
                          num_clusters=max(20, args.num_items // 200), seed=0)
    path = export_retrieval_model(d.user_model, d.item_model, d.item_catalog, d.owner_stage, d.objectives,
                                  base, args.model_name, default_weights=[1.0, 0.5, 2.0], k_max=100,
                                  use_scann=not args.brute_force,
                                  scann_options=ScannOptions(num_leaves=args.scann_num_leaves,
                                                             leaves_to_search_fraction=args.scann_leaves_fraction,
                                                             num_reordering_candidates=args.scann_reorder))
    print(f"exported {path} ({args.num_items:,} items, D={args.dim}) in {time.perf_counter() - t0:.1f}s",
          flush=True)
    c = d.user_catalog
    users = {"user_id": c.ids.astype(str), "age": c.features["age"], "city": c.features["city"].astype(str)}
    np.savez(saved, settings=json.dumps(settings), **users)
    return path, users


def num_objectives(version_dir: Path) -> int:
    """How many objective weights the export's ``serving_default`` takes."""
    return int(json.loads((Path(version_dir) / "assets" / "config.json").read_text())["num_objectives"])


def export_trained(base: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """Export a model trained on the synthetic cascade at ``--trained_items`` items through the streaming
    path (``csmf_tf.testing.embedding_corpus``: trained once, cached under ``--cache``; the vectors
    ``benchmarks/bench_scann.py`` measures) with the export's default index (``ScannOptions.for_catalogue``);
    returns the version and every user's tower inputs from the training shards, for the requests."""
    from csmf_tf.data.streaming import TFRecordSource
    from csmf_tf.testing.embedding_corpus import default_recipe, train_item_vectors
    from pipelines import export

    recipe = default_recipe(args.trained_items)
    train_item_vectors(recipe, args.cache)
    work = Path(args.cache) / f"cascade_{recipe.num_items}_seed{recipe.seed}"
    versions = sorted((p for p in (base / args.model_name).iterdir() if p.name.isdigit()),
                      key=lambda p: int(p.name)) if (base / args.model_name).exists() else []
    if versions:
        print(f"reusing {versions[-1]}", flush=True)
        path = versions[-1]
    else:
        path = export.main(["--bundle", str(work / "run" / "bundle"), "--base_path", str(base),
                            "--model_name", args.model_name])
    catalog = TFRecordSource(sorted(str(p) for p in (work / "data").glob("cascade-*.tfrecord"))).user_catalog()
    return path, {"user_id": np.asarray(catalog.ids).astype(str),
                  **{name: np.asarray(values) for name, values in catalog.features.items()}}


def start_server(model_dir: Path, args: argparse.Namespace, workdir: Path, batching: bool,
                 canned_graph: bool = False) -> tuple[subprocess.Popen, dict]:
    """``python -m pipelines.serve`` on free ports for the model in ``model_dir`` (its version
    directories), with Prometheus metrics on its REST port (as a monitored production server runs);
    returns the process and its ports. ``canned_graph``: the same server with its retrieval graph
    replaced by a cached answer (:func:`serve_canned_graph`)."""
    monitoring = workdir / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true, path: "{METRICS_PATH}" }}\n')
    cmd = ["-m", "pipelines.serve", "--model_base_path", str(model_dir), "--model_name",
           args.model_name, "--port", "0", "--rest_api_port", "0", "--monitoring_config_file", str(monitoring),
           "--file_system_poll_wait_seconds", "0", "--log_level", "WARNING",
           "--max_batch_size", str(args.max_batch_size), "--batch_timeout_micros", str(args.batch_timeout_micros),
           "--grpc_max_workers", str(max(32, 2 * max(args.concurrency)))]
    if not batching:
        cmd.append("--no-enable_batching")
    if canned_graph:
        cmd[:2] = [str(Path(__file__).resolve()), CANNED_GRAPH_FLAG]
    return _spawn(cmd, workdir / f"ports-{batching}-{canned_graph}.json")


def start_fixed_response_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, dict]:
    """The transport baseline (see :func:`serve_fixed_response`) as its own process."""
    port_file = workdir / "ports-fixed.json"
    return _spawn([str(Path(__file__).resolve()), "--k", str(args.k), "--fixed_response_server"], port_file)


def _spawn(argv: list[str], port_file: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, *argv, "--port_file", str(port_file)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 600
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {argv}")
        time.sleep(0.2)
    return proc, json.loads(port_file.read_text())


#: The model server's histograms read around every load level: ``(metric, label filter)``.
SERVER_HISTOGRAMS = {"rows": ("csmf_serving_batch_size", {}),
                     "graph_run": ("csmf_serving_batch_run_seconds", {}),
                     "queue_wait": ("csmf_serving_batch_queue_wait_seconds", {}),
                     "request": ("csmf_serving_request_latency_seconds", {"api": "grpc", "method": "Predict"})}


def histogram_totals(rest_port: int | None) -> dict[str, tuple[float, float]] | None:
    """``{key: (sum, count)}`` so far of the model server's :data:`SERVER_HISTOGRAMS` (its Prometheus page)."""
    if not rest_port:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{METRICS_PATH}", timeout=10) as response:
        text = response.read().decode()
    totals = {key: [0.0, 0.0] for key in SERVER_HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        for key, (name, labels) in SERVER_HISTOGRAMS.items():
            if family.name != name:
                continue
            for sample in family.samples:
                if any(sample.labels.get(k) != v for k, v in labels.items()):
                    continue
                if sample.name.endswith("_sum"):
                    totals[key][0] += sample.value
                elif sample.name.endswith("_count"):
                    totals[key][1] += sample.value
    return {key: (total, count) for key, (total, count) in totals.items()}


def server_breakdown(before: dict | None, after: dict | None) -> dict:
    """Where a request's time went in the server between two :func:`histogram_totals` readings (warm-up
    included): rows per graph run, and the mean milliseconds of a request in the server
    (``server_ms``: from the RPC handler's start to its answer), of its wait in the batching queue, and
    of a graph run."""
    def mean(key: str, scale: float) -> float | None:
        if before is None or after is None or after[key][1] <= before[key][1]:
            return None
        return scale * (after[key][0] - before[key][0]) / (after[key][1] - before[key][1])
    return {"served_batch_mean": mean("rows", 1.0), "server_ms": mean("request", 1e3),
            "queue_wait_ms": mean("queue_wait", 1e3), "graph_run_ms": mean("graph_run", 1e3)}


def serve_fixed_response(port_file: Path, k: int) -> None:
    """A ``grpc.aio`` PredictionService that answers every Predict with one fixed retrieval response.

    Same server options and response size (``k`` item ids, fused and per-objective scores) as the
    model server, no decoding and no model: what the same load generator gets from the transport
    alone on this machine, i.e. the ceiling any Python gRPC front end could reach here.
    """
    import asyncio

    from csmf_tf.serving.constants import OUTPUT_ITEM_IDS, OUTPUT_OBJECTIVE_SCORES, OUTPUT_SCORES
    from csmf_tf.serving.grpc_codec import fill_tensor_proto

    response = predict_pb2.PredictResponse()
    response.model_spec.name = "csmf"
    response.model_spec.version.value = 1
    response.model_spec.signature_name = "serving_default"
    outputs = {OUTPUT_ITEM_IDS: np.array([[f"{i:07d}".encode() for i in range(k)]], dtype=object),
               OUTPUT_SCORES: np.linspace(1, 0, k, dtype=np.float32)[None],
               OUTPUT_OBJECTIVE_SCORES: np.ones((1, k, 3), np.float32)}
    for name, value in outputs.items():
        fill_tensor_proto(response.outputs[name], value)

    class Fixed(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):  # noqa: ANN001, ANN202, N802 - the proto's name
            return response

    async def serve() -> None:
        server = grpc.aio.server(maximum_concurrent_rpcs=256)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Fixed(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(json.dumps({"grpc_port": port}))
        await server.wait_for_termination()

    asyncio.run(serve())


CANNED_GRAPH_FLAG = "--canned_graph_server"


def use_cached_graph() -> None:
    """From now on, every loaded model's ``serving_default`` answers with the first answer it gave for
    that ``k`` (its first row, repeated for every row of the batch) instead of running its graph;
    every other signature runs as usual. For :func:`serve_canned_graph` and ``bench_handler.py``."""
    from csmf_tf.serving.constants import K_INPUT, RETRIEVAL_SIGNATURE
    from csmf_tf.serving.model_registry import LoadedModel

    graph_run = LoadedModel.run
    answers: dict[tuple[int, int | None], dict[str, np.ndarray]] = {}

    def cached_run(model: LoadedModel, signature_name: str, inputs: dict) -> dict[str, np.ndarray]:
        if signature_name != RETRIEVAL_SIGNATURE:
            return graph_run(model, signature_name, inputs)
        key = (id(model), int(inputs[K_INPUT]) if K_INPUT in inputs else None)
        if key not in answers:
            answers[key] = graph_run(model, signature_name, inputs)
        rows = len(next(v for name, v in inputs.items() if name != K_INPUT and np.ndim(v) >= 1))
        return {name: np.repeat(value[:1], rows, axis=0) if np.ndim(value) else value
                for name, value in answers[key].items()}

    LoadedModel.run = cached_run


def serve_canned_graph(serve_argv: list[str]) -> int:
    """``pipelines.serve`` with the retrieval graph replaced by a cached answer: the front end alone.

    Every other step is the model server's own (gRPC handler, decoding, validation, the batching
    queue and thread, slicing, encoding, metrics); only ``serving_default``'s graph run is replaced
    (:func:`use_cached_graph`). What this server reaches is the ceiling of the Python front end on this
    machine: the gap between it and the harmonic bound is per-request work, which no change to the
    graph or the batching can close.
    """
    from pipelines import serve

    use_cached_graph()
    return serve.main(serve_argv)


def user_rows(users: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The user tower's inputs for ``rows`` of ``users`` (``{input name: [N] array}``): strings as
    object arrays, numbers as float32, as the export's signature takes them."""
    return {name: values[rows].astype(object) if values.dtype.kind in "OSU" else values[rows].astype(np.float32)
            for name, values in users.items()}


def num_users(users: dict) -> int:
    return len(next(iter(users.values())))


def make_request(model_name: str, users: dict, rng: np.random.Generator, k: int, objectives: int
                 ) -> predict_pb2.PredictRequest:
    """A retrieval request for a random user with random objective weights."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = "serving_default"
    for name, value in user_rows(users, rng.integers(num_users(users), size=1)).items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    req.inputs["objective_weights"].CopyFrom(tf.make_tensor_proto(rng.uniform(0.1, 2.0, objectives).astype(np.float32)))
    req.inputs["k"].CopyFrom(tf.make_tensor_proto(np.int32(k)))
    return req


def run_load(target: str, model_name: str, users: dict, concurrency: int, duration: float, warmup: float,
             k: int, timeout: float, objectives: int = 3) -> dict:
    """``concurrency`` closed-loop clients for ``warmup + duration`` seconds; stats over ``duration``.

    The clients are coroutines on one ``grpc.aio`` channel per client (the stock stub works on aio
    channels): 32 Python threads would spend the load generator's share of the 2 cores fighting over
    the GIL, and their 5 ms switch interval would show up in the measured tail latency.
    """
    import asyncio

    answered = 0      # every answered request, warm-up included (for CPU per request)

    async def drive() -> tuple[list[float], dict[str, int]]:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from, stop_at = start + warmup, start + warmup + duration

        async def client(slot: int) -> None:
            nonlocal answered
            rng = np.random.default_rng(slot)
            requests = [make_request(model_name, users, rng, k, objectives) for _ in range(64)]
            async with grpc.aio.insecure_channel(target) as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                i = 0
                while (now := loop.time()) < stop_at:
                    t0 = time.perf_counter()
                    try:
                        await stub.Predict(requests[i % len(requests)], timeout=timeout)
                        answered += 1
                        if now >= measure_from:
                            latencies.append(time.perf_counter() - t0)
                    except grpc.aio.AioRpcError as e:
                        if now >= measure_from:
                            errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    i += 1

        await asyncio.gather(*(client(s) for s in range(concurrency)))
        return latencies, errors

    latencies, errors = asyncio.run(drive())
    ms = np.asarray(latencies) * 1e3
    n_err = sum(errors.values())
    return {"concurrency": concurrency, "duration_s": duration, "requests": int(len(ms)),
            "requests_with_warmup": answered, "errors": n_err,
            "errors_by_code": errors, "qps": len(ms) / duration,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p90_ms": float(np.percentile(ms, 90)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "mean_ms": float(ms.mean()) if len(ms) else None}


def graph_ceiling(version_dir: Path, users: dict, batch: int, k: int, seconds: float = 5.0) -> dict:
    """In-process cost of the served ``serving_default`` graph at ``batch`` queries per call.

    This is what every request costs before any transport: the fused query, the index search, the
    exact re-scoring and the per-objective scores. ``1000 / ms_per_query`` is the QPS this machine
    could serve if gRPC, decoding and the load generator cost nothing.
    """
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    objectives = num_objectives(version_dir)
    rng = np.random.default_rng(0)

    def call() -> None:
        features = {n: tf.constant(v) for n, v in user_rows(users, rng.integers(num_users(users), size=batch)).items()}
        fn(**features, objective_weights=tf.constant(rng.uniform(0.1, 2.0, (batch, objectives)), tf.float32),
           k=tf.constant(k))

    for _ in range(3):
        call()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        calls += 1
    ms = (time.perf_counter() - t0) / calls * 1e3
    return {"batch": batch, "ms_per_call": ms, "ms_per_query": ms / batch, "qps_ceiling": 1e3 * batch / ms}


FIXED = "fixed response (transport only)"
FRONT_END = "front end only (graph replaced by a cached answer)"


def served_recall(version_dir: Path, users: dict, k: int = 100, queries: int = 200) -> float:
    """Mean recall@k of the served ``serving_default`` against exact search on the same export.

    The exact side uses the export's own variables (item vectors, stage masks, prior alphas) and its
    ``user_embedding`` signature: fused query ``u * (weights @ M)`` (with a popularity prior
    ``[u * w, weights * alpha]``), inner product with every item, top k. So the QPS below can be read together with the recall the index gave at that setting.
    """
    loaded = tf.saved_model.load(str(version_dir))
    rng = np.random.default_rng(1)
    rows = rng.choice(num_users(users), size=min(queries, num_users(users)), replace=False)
    features = {n: tf.constant(v) for n, v in user_rows(users, rows).items()}
    weights = rng.uniform(0.1, 2.0, (len(rows), num_objectives(version_dir))).astype(np.float32)
    served = loaded.signatures["serving_default"](**features, objective_weights=tf.constant(weights),
                                                  k=tf.constant(k, tf.int32))["item_ids"].numpy()
    u = loaded.signatures["user_embedding"](**features)["user_embedding"]
    query = u * fusion_scales_tf(weights, loaded.stage_masks)
    if getattr(loaded, "prior_alphas", None) is not None:   # [u * w, k * alpha] (serving/module.py)
        query = tf.concat([query, weights * loaded.prior_alphas], axis=1)
    exact = np.concatenate([tf.math.top_k(tf.matmul(query[i:i + 50], loaded.item_vectors, transpose_b=True),
                                          k).indices.numpy() for i in range(0, len(rows), 50)])
    ids = loaded.item_ids.numpy()
    return float(np.mean([len(set(s.tolist()) & set(ids[e].tolist())) / k for s, e in zip(served, exact)]))


def ceiling_batch(concurrency: int, batching: str, max_batch_size: int) -> int:
    """The largest batch the server can form at ``concurrency`` closed-loop clients."""
    return min(concurrency, max_batch_size) if batching == "on" else 1


def add_bound_shares(runs: list[dict], ceilings: list[dict], max_batch_size: int) -> None:
    """Give every model run its harmonic bound ``1 / (1/G + 1/T)`` and ``share_of_bound`` (in place).

    ``G``: the in-process graph ceiling at :func:`ceiling_batch`; ``T``: the fixed-response server's QPS
    at the same concurrency, measured in the same run. Runs without both ceilings get ``None``. The
    front end alone (:data:`FRONT_END`) has no graph to run: its row gets its share of ``T``, and each
    model row the front end's QPS and its share of the model's bound (``front_end_share_of_bound``):
    below 0.9 there, per-request work alone keeps the model server under the target.
    """
    graph = {c["batch"]: c["qps_ceiling"] for c in ceilings}
    transport = {r["concurrency"]: r["qps"] for r in runs if r["server"] == FIXED}
    front_end = {r["concurrency"]: r["qps"] for r in runs if r["server"] == FRONT_END}
    for r in runs:
        t = transport.get(r["concurrency"])
        if r["server"] == FRONT_END:
            r.update(transport_qps=t, share_of_transport=r["qps"] / t if t else None)
        if r["server"] in (FIXED, FRONT_END):
            continue
        g = graph.get(ceiling_batch(r["concurrency"], r["batching"], max_batch_size))
        bound = 1.0 / (1.0 / g + 1.0 / t) if g and t else None
        f = front_end.get(r["concurrency"])
        r.update(graph_ceiling_qps=g, transport_qps=t, bound_qps=bound,
                 share_of_bound=r["qps"] / bound if bound else None,
                 front_end_qps=f, front_end_share_of_bound=f / bound if f and bound else None)
        served = graph_ceiling_at(ceilings, r.get("served_batch_mean"))
        served_bound = 1.0 / (1.0 / served + 1.0 / t) if served and t else None
        r.update(graph_ceiling_at_served_batch_qps=served, bound_at_served_batch_qps=served_bound,
                 share_of_bound_at_served_batch=r["qps"] / served_bound if served_bound else None)


def graph_ceiling_at(ceilings: list[dict], batch: float | None) -> float | None:
    """The graph ceiling (QPS) at a mean batch of ``batch`` rows: ms per call interpolated linearly
    between the measured batch sizes (a call's cost is close to affine in its rows)."""
    points = sorted((c["batch"], c["ms_per_call"]) for c in ceilings)
    if batch is None or not points or batch < points[0][0] or batch > points[-1][0]:
        return None
    ms = float(np.interp(batch, [b for b, _ in points], [m for _, m in points]))
    return 1000.0 * batch / ms


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """``py-spy record`` of process ``pid`` for ``seconds`` (raw collapsed stacks), or None without py-spy."""
    spy = shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                     if Path(sys.executable).with_name("py-spy").exists() else None)
    if spy is None:
        print("py-spy not found (pip install py-spy==0.4.0): no profile", flush=True)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--nonblocking", "--threads"],
                            stdout=subprocess.DEVNULL, stderr=out.with_suffix(".err").open("w"))


def _finish_profile(spy: subprocess.Popen, grace_s: float = 30.0) -> int:
    """py-spy's exit code once it has written its profile; a py-spy that hangs past its duration (seen
    with 0.4.0 on this machine) is killed, so a stuck profiler costs the profile, not the benchmark."""
    try:
        return spy.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        spy.kill()
        return spy.wait()


def summarise_profile(raw: Path, top: int = 20) -> dict:
    """Share of the server's samples per function: ``self`` (the frame on top of the stack) and
    ``inclusive`` (anywhere on it) and per thread, the ``top`` of each. py-spy samples running threads
    only (no ``--idle``), so the shares are of the server's busy time.

    py-spy's raw format is one line per distinct stack: ``thread;frame;...;frame count``.
    """
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] = threads.get(frames[0], 0) + n
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for frame in set(frames[1:]):
            inclusive[frame] = inclusive.get(frame, 0) + n

    def ranked(counts: dict[str, int]) -> list[dict]:
        return [{"function": f, "share": c / total} for f, c in sorted(counts.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "threads": ranked(threads), "self": ranked(self_time),
            "inclusive": ranked(inclusive)} if total else {"samples": 0}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid``, all its threads (``/proc``; None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (the load generator), all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_accounting(server_cpu: float | None, load_cpu: float, requests: int, wall_s: float) -> dict:
    """CPU milliseconds per answered request of the server and of the load generator, and the share of
    the machine's cores they kept busy together: on shared cores the QPS cannot exceed
    ``cores / (server + load generator CPU per request)`` (``cpu_bound_qps``)."""
    if server_cpu is None or not requests:
        return {}
    per_request = (server_cpu + load_cpu) / requests
    return {"server_cpu_ms_per_request": 1e3 * server_cpu / requests,
            "load_generator_cpu_ms_per_request": 1e3 * load_cpu / requests,
            "cores_busy": (server_cpu + load_cpu) / wall_s, "cpu_bound_qps": (os.cpu_count() or 1) / per_request}


def measure_level(args: argparse.Namespace, label: str, mode: str, proc: subprocess.Popen, ports: dict,
                  users: dict, objectives: int, concurrency: int, profiles: dict | None, workdir: Path) -> dict:
    """One load level against one server, with the CPU both sides spent (:func:`cpu_accounting`); for
    the servers with metrics also :func:`server_breakdown`, and with ``--profile`` (when ``profiles``
    is given) a py-spy profile of the model server at the highest concurrency."""
    before = histogram_totals(ports.get("rest_port")) if label != FIXED else None
    spy = None
    if (profiles is not None and args.profile and label not in (FIXED, FRONT_END)
            and concurrency == max(args.concurrency)):
        # Started after the scrape and stopped before the next one: py-spy 0.4.0 can panic when a
        # thread of the target (here: the HTTP server's thread for a scrape) ends while it samples.
        time.sleep(0.5)
        spy = start_profile(proc.pid, args.warmup + args.duration - 1.0, workdir / f"profile-{mode}.txt")
    server_cpu, load_cpu, started = process_cpu_seconds(proc.pid), own_cpu_seconds(), time.perf_counter()
    r = run_load(f"127.0.0.1:{ports['grpc_port']}", args.model_name, users, concurrency, args.duration, args.warmup,
                 args.k, args.timeout, objectives)
    server_after = process_cpu_seconds(proc.pid)
    r.update(cpu_accounting(None if server_cpu is None or server_after is None else server_after - server_cpu,
                            own_cpu_seconds() - load_cpu, r["requests_with_warmup"], time.perf_counter() - started))
    code = _finish_profile(spy) if spy is not None else None
    if label != FIXED:
        r.update(server_breakdown(before, histogram_totals(ports.get("rest_port"))))
        if r["server_ms"] is not None and r["mean_ms"] is not None:
            # The rest of the client's latency: both gRPC stacks, both event loops, the wire.
            r["outside_server_ms"] = r["mean_ms"] - r["server_ms"]
    if spy is not None:
        raw = workdir / f"profile-{mode}.txt"
        profiles[label] = (summarise_profile(raw) if raw.exists() else
                           {"samples": 0, "error": f"py-spy exited with {code} and wrote no profile: "
                                                   + raw.with_suffix(".err").read_text()[:800]})
    r.update(server=label, batching=mode)
    print(f"{label:>30}, concurrency {concurrency:>3}: {r['qps']:8.1f} QPS  p50 {_ms(r['p50_ms'])} ms  "
          f"p99 {_ms(r['p99_ms'])} ms  errors {r['errors']}", flush=True)
    return r


def summarise_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (server, concurrency): the median over rounds of every number (errors: the sum).

    The shares of the bound are medians of each round's own share, read against the transport
    ceiling measured minutes apart in the same round: on a shared machine the QPS of the same
    command moves by 20-30 % between runs, and pairing cancels the drift both servers see.
    """
    rows: dict[tuple[str, int], list[dict]] = {}
    for round_runs in rounds:
        for r in round_runs:
            rows.setdefault((r["server"], r["concurrency"]), []).append(r)
    out = []
    for (server, concurrency), runs in rows.items():
        row = {"server": server, "concurrency": concurrency, "batching": runs[0]["batching"], "rounds": len(runs),
               "errors": sum(r["errors"] for r in runs), "qps_rounds": [r["qps"] for r in runs]}
        numbers = {key for r in runs for key, value in r.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)} - set(row) - {"round"}
        for key in sorted(numbers):
            row[key] = float(np.median([r[key] for r in runs if r.get(key) is not None]))
        if row.get("share_of_bound") is not None:
            row["share_of_bound_rounds"] = [r.get("share_of_bound") for r in runs]
        row["errors_by_code"] = {}
        for r in runs:
            for code, n in r.get("errors_by_code", {}).items():
                row["errors_by_code"][code] = row["errors_by_code"].get(code, 0) + n
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON-able results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_base_path", help="serve this model directory, holding its version directories "
                                             "(default: export a demo model first)")
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--num_items", type=int, default=100_000, help="demo export size")
    p.add_argument("--num_users", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--brute_force", action="store_true", help="demo export without ScaNN")
    p.add_argument("--scann_num_leaves", type=int, help="demo export: ScaNN leaves (default: ScannOptions)")
    p.add_argument("--scann_leaves_fraction", type=float, help="demo export: fraction of leaves searched")
    p.add_argument("--scann_reorder", type=int, help="demo export: candidates re-ranked exactly")
    p.add_argument("--export_dir", help="keep the demo export here and reuse it when run again")
    p.add_argument("--trained_items", type=int,
                   help="serve a model trained on the synthetic cascade at this many items (realistic vectors, "
                        "see export_trained) instead of the demo export")
    p.add_argument("--cache", default="/tmp/csmf-bench-cache", help="--trained_items: training cache")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--ceiling_seconds", type=float, default=5.0, help="in-process graph ceiling: seconds per batch size")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every (server, concurrency) this many times, alternating the servers; report medians")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on"],
                   help="server micro-batching; 'on off' runs both against the same export")
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--batch_timeout_micros", type=int, default=2000)
    p.add_argument("--transport_baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also load a fixed-response gRPC server (no model) at the same concurrencies")
    p.add_argument("--front_end_baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also load the model server with its graph replaced by a cached answer (the front end "
                        "alone, see serve_canned_graph) at the same concurrencies")
    p.add_argument("--profile", action="store_true",
                   help="sample the model server with py-spy during the highest concurrency level")
    p.add_argument("--fixed_response_server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port_file", help=argparse.SUPPRESS)
    p.add_argument("--out", default="results/bench_grpc.json")
    args = p.parse_args(argv)
    if args.fixed_response_server:
        serve_fixed_response(Path(args.port_file), args.k)
        return {}

    with tempfile.TemporaryDirectory(prefix="bench_grpc_") as tmp:
        workdir = Path(tmp)
        if args.model_base_path:
            model_dir = Path(args.model_base_path)
            users = {"user_id": np.array([f"u{i}" for i in range(1000)]), "age": np.full(1000, 30.0, np.float32),
                     "city": np.array(["paris"] * 1000)}
            exported = None
        else:
            base = Path(args.export_dir) if args.export_dir else workdir / "models"
            exported, users = export_trained(base, args) if args.trained_items else export_demo(base, args)
            model_dir = base / args.model_name
        ceilings = []
        recall = None
        index = json.loads((exported / "assets" / "config.json").read_text()).get("index") if exported else None
        objectives = num_objectives(exported) if exported else 3
        exported_items = json.loads((exported / "assets" / "config.json").read_text())["num_items"] if exported else None
        if exported:
            recall = served_recall(exported, users)
            print(f"served index recall@100 against exact search on this export: {recall:.4f}", flush=True)
            batches = {ceiling_batch(c, mode, args.max_batch_size) for c in args.concurrency for mode in args.batching}
            for batch in sorted(batches | {args.max_batch_size}):
                ceilings.append(graph_ceiling(exported, users, batch, args.k, args.ceiling_seconds))
                print(f"served graph in-process, batch {batch:>3}: {ceilings[-1]['ms_per_query']:.3f} ms/query "
                      f"(ceiling {ceilings[-1]['qps_ceiling']:,.0f} QPS)", flush=True)
        rounds: list[list[dict]] = []
        codes = []
        profiles: dict[str, dict] = {}
        servers = [(f"model (batching {mode})", mode, lambda mode=mode: start_server(model_dir, args, workdir, mode == "on"))
                   for mode in args.batching]
        if args.front_end_baseline:
            mode = args.batching[0]
            servers.append((FRONT_END, mode, lambda: start_server(model_dir, args, workdir, mode == "on",
                                                                  canned_graph=True)))
        if args.transport_baseline:
            servers.append((FIXED, "n/a", lambda: start_fixed_response_server(args, workdir)))
        started: list[tuple[str, str, subprocess.Popen, dict]] = []
        try:
            for label, mode, start in servers:     # all up at once; only the one under load is busy
                started.append((label, mode, *start()))
            for round_index in range(args.rounds):
                round_runs: list[dict] = []
                for c in args.concurrency:
                    for label, mode, proc, ports in started:
                        round_runs.append(measure_level(args, label, mode, proc, ports, users, objectives, c,
                                                        profiles if round_index == args.rounds - 1 else None, workdir))
                add_bound_shares(round_runs, ceilings, args.max_batch_size)
                for r in round_runs:
                    r["round"] = round_index
                rounds.append(round_runs)
        finally:
            for label, _, proc, _ in started:
                proc.terminate()                      # SIGTERM: the model server drains and exits 0
                code = proc.wait(timeout=120)
                if label != FIXED:
                    codes.append(code)
        runs = summarise_rounds(rounds)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average_at_end": os.getloadavg()[0]},
               "graph_ceiling": ceilings, "served_recall_at_100": recall,
               "model": str(exported or model_dir),
               "vectors": (f"trained: synthetic cascade, {args.trained_items:,} items (csmf_tf.testing.embedding_corpus)"
                           if args.trained_items else "demo towers (clustered items)") if exported else None,
               "num_items": exported_items,
               "index": index,
               "k": args.k, "max_batch_size": args.max_batch_size,
               "batch_timeout_micros": args.batch_timeout_micros, "server_exit_codes": codes, "rounds": args.rounds,
               "runs": runs, "round_runs": [r for round_runs in rounds for r in round_runs],
               "profile": profiles}
    top = max(args.concurrency)
    at_top = [r for r in runs if r["server"] not in (FIXED, FRONT_END) and r["concurrency"] == top]
    results["target"] = {"concurrency": top, "min_share_of_bound": 0.9,
                         "met": bool(at_top) and all((r.get("share_of_bound") or 0) >= 0.9 and r["errors"] == 0
                                                     for r in at_top)}
    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)
    print(f"\nmedians over {args.rounds} rounds (servers alternating)")
    print("\n| server | concurrency | QPS | graph ceiling QPS | transport QPS | harmonic bound | share of bound "
          "| served batch | share of bound at served batch | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['server']} | {r['concurrency']} | {r['qps']:.1f} | {fmt(r.get('graph_ceiling_qps'))} "
              f"| {fmt(r.get('transport_qps'))} | {fmt(r.get('bound_qps'))} | {fmt(r.get('share_of_bound'), '.2f')} "
              f"| {fmt(r.get('served_batch_mean'))} | {fmt(r.get('share_of_bound_at_served_batch'), '.2f')} "
              f"| {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {r['errors']} |")
    print("\nwhere a model request's mean latency went (ms): in the server (of which: waiting for a batch, "
          "the graph run of its batch) and outside it")
    print("\n| concurrency | client mean | in the server | batch queue wait | graph run | outside the server |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        if r["server"] not in (FIXED, FRONT_END):
            print(f"| {r['concurrency']} | {_ms(r['mean_ms'])} | {_ms(r.get('server_ms'))} | "
                  f"{_ms(r.get('queue_wait_ms'))} | {_ms(r.get('graph_run_ms'))} | {_ms(r.get('outside_server_ms'))} |")
    print("\nCPU per answered request (ms) and the cores kept busy: on shared cores QPS <= cores / (server + load "
          "generator CPU per request)")
    print("\n| server | concurrency | QPS | server CPU | load generator CPU | cores busy | CPU-bound QPS "
          "| front end QPS | front end share of bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['server']} | {r['concurrency']} | {r['qps']:.1f} "
              f"| {fmt(r.get('server_cpu_ms_per_request'), '.3f')} | {fmt(r.get('load_generator_cpu_ms_per_request'), '.3f')} | {fmt(r.get('cores_busy'), '.2f')} "
              f"| {fmt(r.get('cpu_bound_qps'))} | {fmt(r.get('front_end_qps'))} "
              f"| {fmt(r.get('front_end_share_of_bound'), '.2f')} |")
    print(f"target (share of bound >= 0.9 at concurrency {top}, no errors): "
          f"{'met' if results['target']['met'] else 'NOT met'}")
    for label, prof in profiles.items():
        print(f"\nserver profile [{label}] at concurrency {top} ({prof.get('samples', 0)} samples), self time:")
        for row in prof.get("self", [])[:12]:
            print(f"  {row['share']:6.1%}  {row['function']}")
    print(f"server exit codes after SIGTERM: {codes}")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == [CANNED_GRAPH_FLAG]:
        sys.exit(serve_canned_graph(sys.argv[2:]))
    main()
