"""CPU per request of the model server's own Predict path, without gRPC and without the graph (not a test).

    python benchmarks/bench_handler.py                            # small demo export
    python benchmarks/bench_handler.py --trained_items 100000 --cache /tmp/annbench/cache --export_dir /tmp/annbench/export100k

``PredictionServicer.Predict`` (the gRPC handler: decoding, validation, version pinning, the batching
queue and thread, slicing, encoding, metrics) runs in-process on an event loop over ``bench_grpc``'s
requests, ``--concurrency`` at a time, with the model's graph replaced by a cached answer
(``bench_grpc.use_cached_graph``), so what is left is the per-request work the server itself adds on
top of the transport. Reported per request: the CPU of the event-loop thread (where gRPC's own work
would also run) and of the whole process (the batching thread included), against a baseline measured
in the same run: parsing the request and serialising the response, which any front end pays. With
``--profile`` the functions that took the loop's time (``cProfile``, tottime) are in the JSON too.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench_grpc  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from results_io import write_results  # noqa: E402
import csmf_tf  # noqa: E402,F401  (tf-keras before TensorFlow)
import numpy as np  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402

from csmf_tf.serving.grpc_service import PredictionServicer  # noqa: E402
from csmf_tf.serving.server import ModelServer, ServerOptions  # noqa: E402


class _Context:
    """What the handler asks of a ``grpc.aio.ServicerContext`` on success."""

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code: object, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


async def _drive(servicer: PredictionServicer, requests: list, count: int, concurrency: int) -> list:
    """``count`` Predicts, ``concurrency`` in flight at a time; returns the last responses."""
    context, responses = _Context(), []
    for start in range(0, count, concurrency):
        responses = await asyncio.gather(*(servicer.Predict(requests[i % len(requests)], context)
                                           for i in range(start, min(count, start + concurrency))))
    return responses


def measure(servicer: PredictionServicer, requests: list, count: int, concurrency: int) -> dict:
    """Loop-thread and process CPU microseconds per request over ``count`` requests."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_drive(servicer, requests, min(count, 2000), concurrency))   # warm-up
        thread0, process0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
        responses = loop.run_until_complete(_drive(servicer, requests, count, concurrency))
        thread1, process1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
    finally:
        loop.close()
    return {"requests": count, "loop_cpu_us_per_request": 1e6 * (thread1 - thread0) / count,
            "process_cpu_us_per_request": 1e6 * (process1 - process0) / count,
            "wall_us_per_request": 1e6 * (wall1 - wall0) / count, "last_response": responses[-1]}


def baseline_us(requests: list, response: predict_pb2.PredictResponse, count: int) -> float:
    """CPU microseconds per request of parsing it and serialising its response (what any front end pays)."""
    raw = [r.SerializeToString() for r in requests]
    started = time.thread_time()
    for i in range(count):
        predict_pb2.PredictRequest.FromString(raw[i % len(raw)])
        response.SerializeToString()
    return 1e6 * (time.thread_time() - started) / count


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--num_items", type=int, default=20_000, help="demo export size")
    p.add_argument("--num_users", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--export_dir", help="keep the export here and reuse it (see bench_grpc.py)")
    p.add_argument("--trained_items", type=int, help="a model trained at this many items (see bench_grpc.py)")
    p.add_argument("--cache", default="/tmp/csmf-bench-cache")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="cProfile the loop's functions (tottime) into the JSON")
    p.add_argument("--out", default="results/bench_handler.json")
    # bench_grpc's export settings that this script does not vary: the export's default index.
    p.set_defaults(brute_force=False, scann_num_leaves=None, scann_leaves_fraction=None, scann_reorder=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_handler_") as tmp:
        base = Path(args.export_dir) if args.export_dir else Path(tmp) / "models"
        exported, users = (bench_grpc.export_trained(base, args) if args.trained_items
                           else bench_grpc.export_demo(base, args))
        bench_grpc.use_cached_graph()
        server = ModelServer(str(base / args.model_name), args.model_name,
                             ServerOptions(port=0, rest_api_port=None, poll_interval_s=0))
        server.start()        # loads the model; its own gRPC port stays idle, the handler is called directly
        try:
            rng = np.random.default_rng(0)
            objectives = bench_grpc.num_objectives(exported)
            requests = [bench_grpc.make_request(args.model_name, users, rng, args.k, objectives) for _ in range(256)]
            servicer = PredictionServicer(server.core, server.metrics)
            handler = measure(servicer, requests, args.requests, args.concurrency)
            profile = None
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                measure(servicer, requests, args.requests // 4, args.concurrency)
                profiler.disable()
                stats = pstats.Stats(profiler).stats
                total = sum(v[2] for v in stats.values())
                profile = [{"function": f"{fn} ({Path(file).name}:{line})", "share_of_tottime": tt / total}
                           for (file, line, fn), (_, _, tt, _, _) in
                           sorted(stats.items(), key=lambda kv: -kv[1][2])[:20]]
        finally:
            server.stop()
    base_us = baseline_us(requests, handler.pop("last_response"), args.requests)
    results = {"model": str(exported), "concurrency": args.concurrency, "k": args.k, **handler,
               "baseline_parse_and_serialise_us_per_request": base_us,
               "loop_cpu_vs_baseline": handler["loop_cpu_us_per_request"] / base_us, "profile": profile}
    print(f"Predict handler (graph cached, no gRPC): {handler['loop_cpu_us_per_request']:.1f} us loop CPU, "
          f"{handler['process_cpu_us_per_request']:.1f} us process CPU per request; baseline (parse the request, "
          f"serialise the response): {base_us:.1f} us; ratio {results['loop_cpu_vs_baseline']:.1f}x", flush=True)
    for row in profile or []:
        print(f"  {row['share_of_tottime']:6.1%}  {row['function']}")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
