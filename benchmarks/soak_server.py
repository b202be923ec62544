"""Soak test of the model server: fixed request rate for minutes, memory sampled, hot swaps under load.

    python benchmarks/soak_server.py                          # 10 minutes at 200 req/s, 2 hot swaps
    python benchmarks/soak_server.py --duration 20 --rate 50  # the short version the tests run
    python benchmarks/soak_server.py --model_base_path DIR    # serve a copy of model directory DIR's versions

What it does:

1. exports a demo model (``python -m pipelines.export --demo``, ScaNN index) unless ``--model_base_path``
   (a model directory, as the server takes it) is given: its versions are copied, so the soak's own
   exports never touch it;
2. starts the server as its own process (``python -m pipelines.serve``), as in production;
3. sends requests at a fixed rate (open loop: request ``i`` is due at ``t0 + i / rate`` whatever
   the server's latency), ``--rest_fraction`` of them over REST and the rest over gRPC, each with a
   random user, random objective weights and a random ``k``; every answer is checked (shape
   ``[1, k]``, scores sorted, finite);
4. every ``--rss_interval_s`` reads the server's ``VmRSS`` and thread count from ``/proc/<pid>/status``
   and its open file descriptors from ``/proc/<pid>/fd``;
5. at each ``--swap_at`` fraction of the run, exports a new version (a real export, in a subprocess)
   while the load continues, and waits until gRPC answers come from it;
6. stops the load, sends SIGTERM and expects exit code 0.

It prints requests, errors, achieved rate, latency p50/p99, RSS at start / end / max and the RSS slope
(MB per minute, least squares over the samples after ``--warmup_s``) and writes JSON (``--out``).
Exit status 1 when any request failed, the server died or exited non-zero, a swap was not observed,
RSS grew more than ``--max_growth_mb`` after warm-up, or (runs with at least 2 minutes after warm-up)
the slope exceeds ``--max_slope_mb_per_min``. Latencies are measured from a request's *due* time, so a
load generator that falls behind shows up in the latencies instead of hiding (coordinated omission).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_io import write_results  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
import csmf_tf  # noqa: E402,F401  (tf-keras before TensorFlow)
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from csmf_tf.testing.demo import DEMO_CITIES as CITIES  # noqa: E402
from csmf_tf.testing.processes import ServerProcess, export_demo, proc_status  # noqa: E402


# -- requests ---------------------------------------------------------------------------------------------
def make_requests(model_name: str, num_users: int, count: int, seed: int, k_max: int = 20
                  ) -> list[tuple[predict_pb2.PredictRequest, bytes, int]]:
    """``count`` (gRPC request, REST body, k) triples for random users, weights and k."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        user = f"u{int(rng.integers(num_users))}"
        age = float(np.float32(rng.uniform(18, 70)))
        city = CITIES[int(rng.integers(len(CITIES)))]
        weights = rng.uniform(0.1, 2.0, 3).astype(np.float32)
        k = int(rng.integers(1, k_max + 1))
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model_name
        req.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([user], dtype=object)))
        req.inputs["age"].CopyFrom(tf.make_tensor_proto(np.array([age], np.float32)))
        req.inputs["city"].CopyFrom(tf.make_tensor_proto(np.array([city], dtype=object)))
        req.inputs["objective_weights"].CopyFrom(tf.make_tensor_proto(weights))
        req.inputs["k"].CopyFrom(tf.make_tensor_proto(np.int32(k)))
        body = json.dumps({"inputs": {"user_id": [user], "age": [age], "city": [city],
                                      "objective_weights": weights.tolist(), "k": k}}).encode()
        out.append((req, body, k))
    return out


def check_answer(item_ids: np.ndarray, scores: np.ndarray, k: int) -> str | None:
    """None when a retrieval answer is well formed for one query row and ``k``, else what is wrong."""
    if item_ids.shape != (1, k) or scores.shape != (1, k):
        return f"shapes {item_ids.shape} {scores.shape}, expected (1, {k})"
    if not np.all(np.isfinite(scores)):
        return "non-finite scores"
    if np.any(np.diff(scores[0]) > 1e-5):
        return "scores not sorted"
    return None


class Recorder:
    """Thread-safe tallies of one load run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {"grpc": [], "rest": []}
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_examples: list[str] = []
        self.versions: collections.Counter[int] = collections.Counter()
        self.version_first_seen: dict[int, float] = {}
        self.completed = 0

    def ok(self, transport: str, latency_s: float, version: int | None = None) -> None:
        with self.lock:
            self.completed += 1
            self.latencies[transport].append(latency_s)
            if version is not None:
                self.versions[version] += 1
                self.version_first_seen.setdefault(version, time.monotonic())

    def error(self, transport: str, code: str, detail: str) -> None:
        with self.lock:
            self.completed += 1
            self.errors[f"{transport}:{code}"] += 1
            if len(self.error_examples) < 20:
                self.error_examples.append(f"{transport} {code}: {detail[:300]}")


class RestWorkers:
    """A few threads with keep-alive HTTP connections (one per thread), fed through a queue."""

    def __init__(self, host: str, port: int, threads: int, timeout_s: float) -> None:
        self._local = threading.local()
        self._host, self._port, self._timeout = host, port, timeout_s
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """One POST on this thread's connection (reconnects once if the server closed it)."""
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


# -- the soak ---------------------------------------------------------------------------------------------
def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def memory_summary(samples: list[dict], warmup_s: float, swap_times: list[float] | None = None,
                   settle_s: float = 30.0) -> dict[str, Any]:
    """RSS figures of a run: start / after warm-up / end / max, trend and what each hot swap kept.

    ``slope_mb_per_min`` is the least-squares slope over every sample after warm-up. A hot swap loads
    a whole new version, and TensorFlow keeps part of every SavedModel it ever loaded (see the
    report), so that slope mixes a per-swap step with the per-request trend. The per-request trend is
    ``steady_slope_mb_per_min``: slopes fitted separately in each window between swaps (after
    warm-up, skipping ``settle_s`` after a swap), averaged weighted by window length. ``swap_steps``
    gives, per swap, median RSS of the settled window after it minus median RSS of the window before.
    """
    swap_times = sorted(swap_times or [])
    t = np.array([s["t"] for s in samples])
    rss = np.array([s["rss_mb"] for s in samples])
    after = t >= warmup_s
    out: dict[str, Any] = {"samples": len(samples), "rss_start_mb": float(rss[0]), "rss_end_mb": float(rss[-1]),
                           "rss_max_mb": float(rss.max()), "warmup_s": warmup_s}
    if after.sum() >= 3:
        ta, ra = t[after], rss[after]
        slope = float(np.polyfit(ta / 60.0, ra, 1)[0])
        head = ra[: max(1, len(ra) // 10)]
        tail = ra[-max(1, len(ra) // 10):]
        out.update({"rss_after_warmup_mb": float(np.median(head)), "rss_end_median_mb": float(np.median(tail)),
                    "growth_after_warmup_mb": float(np.median(tail) - np.median(head)),
                    "slope_mb_per_min": slope, "window_after_warmup_s": float(ta[-1] - ta[0])})
    else:
        out.update({"rss_after_warmup_mb": None, "rss_end_median_mb": None, "growth_after_warmup_mb": None,
                    "slope_mb_per_min": None, "window_after_warmup_s": 0.0})
    # Windows between swaps: [max(warm-up, previous swap + settle), next swap).
    bounds = [warmup_s] + [x + settle_s for x in swap_times]
    ends = swap_times + [float(t[-1]) + 1e-9]
    windows = []
    for lo, hi in zip(bounds, ends):
        lo = max(lo, warmup_s)
        mask = (t >= lo) & (t < hi)
        if mask.sum() >= 3 and t[mask][-1] - t[mask][0] > 0:
            windows.append({"from_s": float(t[mask][0]), "to_s": float(t[mask][-1]),
                            "slope_mb_per_min": float(np.polyfit(t[mask] / 60.0, rss[mask], 1)[0]),
                            "median_mb": float(np.median(rss[mask]))})
    span = sum(w["to_s"] - w["from_s"] for w in windows)
    out["steady_windows"] = windows
    out["steady_window_s"] = span
    out["steady_slope_mb_per_min"] = (sum(w["slope_mb_per_min"] * (w["to_s"] - w["from_s"]) for w in windows) / span
                                      if span > 0 else None)
    steps = []
    for i, x in enumerate(swap_times):
        before = rss[(t < x) & (t >= (swap_times[i - 1] + settle_s if i else 0.0))]
        later = rss[(t >= x + settle_s) & (t < (swap_times[i + 1] if i + 1 < len(swap_times) else np.inf))]
        if len(before) and len(later):
            steps.append(float(np.median(later[-max(1, len(later) // 3):]) - np.median(before[-max(1, len(before) // 3):])))
    out["swap_steps_mb"] = steps
    for key in ("threads", "fds"):
        vals = [s[key] for s in samples if key in s]
        if vals:
            out[f"{key}_start"], out[f"{key}_end"], out[f"{key}_max"] = vals[0], vals[-1], max(vals)
    return out


def run_soak(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole soak (see module docstring); returns the JSON-able results (``passed`` included)."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="soak_server_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "models"
    export_log = workdir / "export.log"
    initial_export_s = None
    if args.model_base_path:
        shutil.copytree(Path(args.model_base_path), base / args.model_name,
                        ignore=shutil.ignore_patterns(".tmp-*"))
    else:
        _, _, initial_export_s = export_demo(base, args.model_name, args.num_items, args.num_users, args.dim,
                                             0, export_log)
        log(f"exported version 1 ({args.num_items:,} items, D={args.dim}) in {initial_export_s:.1f}s")
    server = ServerProcess(base / args.model_name, args.model_name, workdir,
                           ["--file_system_poll_wait_seconds", str(args.poll_s)])
    log(f"server pid {server.pid}: gRPC {server.grpc_target}, REST {server.rest_host}:{server.rest_port}")
    initial_versions = sorted(int(p.name) for p in (base / args.model_name).iterdir() if p.name.isdigit())
    requests = make_requests(args.model_name, args.num_users, 512, args.seed)
    rec = Recorder()
    samples: list[dict] = []
    swaps: list[dict] = []
    stop_sampling = threading.Event()
    t_start = time.monotonic()

    def sampler() -> None:
        while True:
            try:
                samples.append({"t": time.monotonic() - t_start, **proc_status(server.pid)})
            except OSError:
                return                          # the process is gone; the main loop notices
            if stop_sampling.wait(args.rss_interval_s):
                return

    sampler_thread = threading.Thread(target=sampler, name="rss", daemon=True)
    sampler_thread.start()

    def swapper() -> None:
        for i, frac in enumerate(args.swap_at):
            at = t_start + frac * args.duration
            while time.monotonic() < at:
                if stop_load.wait(min(1.0, max(0.0, at - time.monotonic()))):
                    return
            started = time.monotonic()
            info: dict[str, Any] = {"started_s": started - t_start}
            try:
                path, visible_after, took = export_demo(base, args.model_name, args.num_items, args.num_users,
                                                        args.dim, i + 1, export_log)
            except Exception as e:  # noqa: BLE001 - reported as a failed swap
                info["error"] = str(e)
                swaps.append(info)
                return
            info.update({"version": int(path.name), "export_s": took,
                         "published_s": started + visible_after - t_start})
            log(f"[{info['published_s']:6.1f}s] version {path.name} exported under load (visible after "
                f"{visible_after:.1f}s, exporter exited after {took:.1f}s)")
            deadline = time.monotonic() + args.swap_timeout_s
            while int(path.name) not in rec.version_first_seen and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = rec.version_first_seen.get(int(path.name))
            info["first_answer_s"] = None if seen is None else seen - t_start
            info["observed"] = seen is not None
            if seen is not None:
                log(f"[{seen - t_start:6.1f}s] first answer from version {path.name} "
                    f"({seen - t_start - info['published_s']:.1f}s after the export was published)")
            swaps.append(info)

    stop_load = threading.Event()
    swap_thread = threading.Thread(target=swapper, name="swapper", daemon=True)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    rest = RestWorkers(server.rest_host, server.rest_port, args.rest_threads, args.timeout_s)
    rest_path = f"/v1/models/{args.model_name}:predict"
    in_flight = threading.Semaphore(args.max_in_flight)
    sent = {"grpc": 0, "rest": 0}
    skipped = 0          # requests not sent because --max_in_flight answers were outstanding
    max_lag = 0.0

    def on_grpc_done(future: grpc.Future, due: float, k: int) -> None:
        try:
            resp = future.result()
            problem = check_answer(tf.make_ndarray(resp.outputs["item_ids"]),
                                   tf.make_ndarray(resp.outputs["scores"]), k)
            if problem:
                rec.error("grpc", "BAD_ANSWER", problem)
            else:
                rec.ok("grpc", time.monotonic() - due, int(resp.model_spec.version.value))
        except grpc.RpcError as e:
            rec.error("grpc", e.code().name, e.details() or "")
        except Exception as e:  # noqa: BLE001
            rec.error("grpc", type(e).__name__, str(e))
        finally:
            in_flight.release()

    def rest_call(body: bytes, due: float, k: int) -> None:
        try:
            status, payload = rest.post(rest_path, body)
            if status != 200:
                rec.error("rest", f"HTTP_{status}", payload[:300].decode(errors="replace"))
                return
            out = json.loads(payload)["outputs"]
            problem = check_answer(np.asarray(out["item_ids"], dtype=object), np.asarray(out["scores"]), k)
            if problem:
                rec.error("rest", "BAD_ANSWER", problem)
            else:
                rec.ok("rest", time.monotonic() - due)
        except Exception as e:  # noqa: BLE001
            rec.error("rest", type(e).__name__, str(e))
        finally:
            in_flight.release()

    time.sleep(min(2.0, args.rss_interval_s))   # a pre-load RSS sample or two
    t_load = time.monotonic()
    swap_thread.start()
    rest_every = int(round(1 / args.rest_fraction)) if args.rest_fraction > 0 else 0
    i = 0
    # The run lasts --duration, extended (up to --swap_timeout_s) until every swap has been observed.
    hard_stop = t_load + args.duration + args.swap_timeout_s
    while True:
        now = time.monotonic()
        swaps_pending = len(swaps) < len(args.swap_at) and swap_thread.is_alive()
        if (now - t_load >= args.duration and not swaps_pending) or now >= hard_stop or not server.alive():
            break
        due = t_load + i / args.rate
        if due > now:
            time.sleep(min(due - now, 0.05))
            continue
        max_lag = max(max_lag, now - due)
        if not in_flight.acquire(timeout=args.timeout_s):
            skipped += 1     # nothing came back within a deadline: counted as a failure below
            i += 1
            continue
        req, body, k = requests[i % len(requests)]
        if rest_every and i % rest_every == rest_every - 1:
            sent["rest"] += 1
            rest.pool.submit(rest_call, body, due, k)
        else:
            sent["grpc"] += 1
            fut = stub.Predict.future(req, timeout=args.timeout_s)
            fut.add_done_callback(lambda f, due=due, k=k: on_grpc_done(f, due, k))
        i += 1
    t_end_load = time.monotonic()
    stop_load.set()
    # Let in-flight requests finish (bounded), then stop.
    drain_deadline = time.monotonic() + args.timeout_s + 5
    while rec.completed < sent["grpc"] + sent["rest"] and time.monotonic() < drain_deadline:
        time.sleep(0.05)
    rest.pool.shutdown(wait=True, cancel_futures=True)
    channel.close()
    swap_thread.join(timeout=args.swap_timeout_s)
    alive_at_end = server.alive()
    stop_sampling.set()
    sampler_thread.join(timeout=10)
    exit_code = server.terminate()
    server.kill()
    load_s = t_end_load - t_load
    total_sent = sent["grpc"] + sent["rest"]
    unanswered = total_sent - rec.completed
    errors = sum(rec.errors.values()) + unanswered + skipped
    mem = memory_summary(samples, (t_load - t_start) + args.warmup_s,
                         [x["published_s"] for x in swaps if "published_s" in x])
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_end": list(os.getloadavg())},
        "config": {k: v for k, v in vars(args).items()},
        "model": {"num_items": args.num_items, "dim": args.dim, "initial_versions": initial_versions,
                  "initial_export_s": initial_export_s},
        "duration_s": load_s, "target_rate": args.rate, "requests_sent": total_sent, "sent_by_transport": sent,
        "completed": rec.completed, "unanswered": unanswered, "skipped_in_flight_limit": skipped,
        "errors": errors,
        "errors_by_code": dict(rec.errors), "error_examples": rec.error_examples,
        "achieved_rate": rec.completed / load_s if load_s > 0 else 0.0, "max_schedule_lag_ms": max_lag * 1e3,
        "latency_all": _percentiles(rec.latencies["grpc"] + rec.latencies["rest"]),
        "latency_grpc": _percentiles(rec.latencies["grpc"]), "latency_rest": _percentiles(rec.latencies["rest"]),
        "answers_by_version": {str(k): v for k, v in sorted(rec.versions.items())},
        "swaps": swaps, "memory": mem, "rss_samples": samples,
        "server_alive_at_end": alive_at_end, "server_exit_code": exit_code,
        "workdir": str(workdir),
    }
    failures = []
    if errors:
        failures.append(f"{errors} failed requests")
    if not alive_at_end:
        failures.append("the server died")
    if exit_code != 0:
        failures.append(f"server exit code {exit_code} after SIGTERM")
    if len(swaps) != len(args.swap_at) or not all(s.get("observed") for s in swaps):
        failures.append(f"hot swaps not all observed: {swaps}")
    growth = mem.get("growth_after_warmup_mb")
    if growth is not None and growth > args.max_growth_mb:
        failures.append(f"RSS grew {growth:.1f} MB after warm-up (limit {args.max_growth_mb})")
    slope = mem.get("steady_slope_mb_per_min")
    if slope is not None and mem["steady_window_s"] >= 120 and slope > args.max_slope_mb_per_min:
        failures.append(f"steady RSS slope {slope:.2f} MB/min between swaps (limit {args.max_slope_mb_per_min})")
    big = [x for x in mem["swap_steps_mb"] if x > args.max_swap_step_mb]
    if big:
        failures.append(f"hot swaps kept {big} MB (limit {args.max_swap_step_mb} each)")
    results["failures"] = failures
    results["passed"] = not failures
    if not alive_at_end or exit_code != 0:
        results["server_log_tail"] = server.log_tail()
    return results


def report(r: dict[str, Any]) -> str:
    """Human-readable summary of :func:`run_soak`'s results."""
    m, lat = r["memory"], r["latency_all"]

    def f(v: float | None, fmt: str = ".1f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"requests sent      {r['requests_sent']:,} ({r['sent_by_transport']['grpc']:,} gRPC, "
        f"{r['sent_by_transport']['rest']:,} REST) in {r['duration_s']:.1f}s",
        f"errors             {r['errors']} {r['errors_by_code'] or ''}",
        f"achieved rate      {r['achieved_rate']:.1f} req/s (target {r['target_rate']:g}); max schedule lag "
        f"{r['max_schedule_lag_ms']:.1f} ms",
        f"latency            p50 {f(lat['p50_ms'], '.2f')} ms, p99 {f(lat['p99_ms'], '.2f')} ms, max "
        f"{f(lat['max_ms'], '.1f')} ms (gRPC p99 {f(r['latency_grpc']['p99_ms'], '.2f')}, REST p99 "
        f"{f(r['latency_rest']['p99_ms'], '.2f')})",
        f"answers by version {r['answers_by_version']}",
        "hot swaps          " + "; ".join(
            f"v{s.get('version')} export {f(s.get('export_s'))}s, first answer "
            f"{f((s['first_answer_s'] or 0) - s['published_s']) if s.get('first_answer_s') else 'never'}s after publish"
            for s in r["swaps"]),
        f"RSS (MB)           start {m['rss_start_mb']:.1f}, after warm-up {f(m['rss_after_warmup_mb'])}, end "
        f"{m['rss_end_mb']:.1f}, max {m['rss_max_mb']:.1f}; growth after warm-up "
        f"{f(m['growth_after_warmup_mb'])} MB; slope {f(m['slope_mb_per_min'], '.2f')} MB/min over "
        f"{m['window_after_warmup_s']:.0f}s ({m['samples']} samples)",
        f"RSS between swaps  steady slope {f(m['steady_slope_mb_per_min'], '.2f')} MB/min over "
        f"{m['steady_window_s']:.0f}s; kept per hot swap {[round(x, 1) for x in m['swap_steps_mb']]} MB",
        f"threads / fds      {m.get('threads_start')} -> {m.get('threads_end')} (max {m.get('threads_max')}) / "
        f"{m.get('fds_start')} -> {m.get('fds_end')} (max {m.get('fds_max')})",
        f"server             alive at end: {r['server_alive_at_end']}, exit code after SIGTERM: "
        f"{r['server_exit_code']}",
        "PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"]),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 10 minutes)")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    p.add_argument("--rest_fraction", type=float, default=0.1, help="share of requests sent over REST")
    p.add_argument("--swap_at", type=float, nargs="*", default=[1 / 3, 2 / 3],
                   help="fractions of --duration at which a new version is exported under load")
    p.add_argument("--swap_timeout_s", type=float, default=300.0,
                   help="how long a swap may take (export + load) before the run gives up on it")
    p.add_argument("--model_base_path", help="serve a copy of this model directory (its version directories) "
                                             "instead of a new demo export")
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--num_items", type=int, default=10_000)
    p.add_argument("--num_users", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--poll_s", type=float, default=1.0, help="server --file_system_poll_wait_seconds")
    p.add_argument("--rss_interval_s", type=float, default=5.0)
    p.add_argument("--warmup_s", type=float, default=60.0,
                   help="seconds of load before memory counts (allocator pools, TF caches fill up first)")
    p.add_argument("--max_growth_mb", type=float, default=150.0,
                   help="fail when RSS grows more than this after warm-up (two extra versions loaded and "
                        "unloaded included)")
    p.add_argument("--max_slope_mb_per_min", type=float, default=2.0,
                   help="fail when the RSS trend between swaps exceeds this (with >= 2 min of such windows)")
    p.add_argument("--max_swap_step_mb", type=float, default=64.0,
                   help="fail when one hot swap leaves RSS higher than this (TensorFlow keeps a few MB of "
                        "every SavedModel it loaded; the first swap also grows allocator pools)")
    p.add_argument("--timeout_s", type=float, default=10.0, help="per-request deadline")
    p.add_argument("--max_in_flight", type=int, default=256)
    p.add_argument("--rest_threads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep exports and logs here (default: a new temporary directory)")
    p.add_argument("--out", default="results/soak_server.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the summary, write JSON; exit status 0 only if it passed."""
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or not 0 <= args.rest_fraction <= 1:
        raise SystemExit("--rate and --duration must be > 0, --rest_fraction in [0, 1]")
    if any(not 0 <= f < 1 for f in args.swap_at):
        raise SystemExit("--swap_at fractions must be in [0, 1)")
    args.warmup_s = min(args.warmup_s, args.duration / 4)
    results = run_soak(args, log=lambda s: print(s, flush=True))
    print(report(results), flush=True)
    write_results(results, args.out)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
