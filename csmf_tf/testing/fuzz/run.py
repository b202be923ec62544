"""One fuzz run: export or copy a model, start the server process, send the cases, judge, summarise."""
from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from csmf_tf.testing.fuzz.cases import OK, SERVER_FAULTS, Case, Ctx, predict_request
from csmf_tf.testing.fuzz.grpc_cases import grpc_case
from csmf_tf.testing.fuzz.reference import Reference
from csmf_tf.testing.fuzz.rest_cases import rest_case
from csmf_tf.testing.fuzz.transports import Clients
from csmf_tf.testing.processes import ServerProcess, export_demo, proc_status


def make_case(seed: int, i: int, ctx: Ctx, reference: Reference, rest_share: float) -> Case:
    """Case ``i`` of the run with ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, i])
    return rest_case(rng, ctx, reference) if rng.random() < rest_share else grpc_case(rng, ctx, reference)


def _mean_where(values: list[float], flags: list[bool], flag: bool) -> float | None:
    picked = [v for v, f in zip(values, flags) if f == flag]
    return float(np.mean(picked)) if picked else None


def run_fuzz(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole fuzz (see module docstring); returns JSON-able results with ``passed``."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fuzz_server_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "models"
    if args.model_base_path:
        shutil.copytree(Path(args.model_base_path), base / args.model_name,
                        ignore=shutil.ignore_patterns(".tmp-*"))
    else:
        export_demo(base, args.model_name, args.num_items, args.num_users, args.dim, 0, workdir / "export.log")
    versions = sorted(int(p.name) for p in (base / args.model_name).iterdir() if p.name.isdigit())
    version_dir = base / args.model_name / str(versions[-1])
    reference = Reference(version_dir)
    ctx = Ctx(args.model_name, versions[-1], reference.k_max, reference.num_objectives, args.num_users, args.max_message_bytes,
              args.max_request_batch_size)
    server = ServerProcess(base / args.model_name, args.model_name, workdir, [
        "--file_system_poll_wait_seconds", "0", "--max_message_bytes", str(args.max_message_bytes),
        "--max_request_batch_size", str(args.max_request_batch_size), "--request_timeout_s", "30"])
    log(f"server pid {server.pid}: gRPC {server.grpc_target}, REST {server.rest_host}:{server.rest_port}")
    rss_before = proc_status(server.pid)

    # A reference request answered before the fuzz; the same request must get the same answer after.
    probe_inputs = {"user_id": np.array([b"u1", b"u2"], dtype=object), "age": np.array([30.0, 41.5], np.float32),
                    "city": np.array([b"paris", b"nice"], dtype=object),
                    "objective_weights": np.array([1.0, 0.5, 2.0], np.float32)[: ctx.S], "k": np.int32(min(7, ctx.k_max))}
    probe = Clients(server.grpc_target, server.rest_host, server.rest_port, args.deadline_s)
    status, before = probe.grpc_call(probe.predict.Predict, predict_request(ctx, probe_inputs))
    if status != OK:
        raise RuntimeError(f"the server did not answer the reference request: {status} {before}")

    indices = [args.only] if args.only is not None else list(range(args.requests))
    records: list[dict[str, Any] | None] = [None] * len(indices)
    next_index = iter(range(len(indices)))
    index_lock = threading.Lock()
    t0 = time.monotonic()

    def worker() -> None:
        clients = Clients(server.grpc_target, server.rest_host, server.rest_port, args.deadline_s)
        try:
            while True:
                with index_lock:
                    j = next(next_index, None)
                if j is None or not server.alive():
                    return
                i = indices[j]
                try:
                    case = make_case(args.seed, i, ctx, reference, args.rest_share)
                except Exception as e:  # noqa: BLE001 - a bug in a generator must not end the run silently
                    records[j] = {"i": i, "transport": "?", "kind": "generator", "status": "GENERATOR_ERROR",
                                  "expected": [], "seconds": 0.0, "problem": None, "detail": repr(e)[:300]}
                    continue
                start = time.monotonic()
                try:
                    status, payload = case.send(clients)
                except Exception as e:  # noqa: BLE001 - a client-side failure to send is recorded as such
                    status, payload = f"CLIENT_ERROR({type(e).__name__})", str(e)
                took = time.monotonic() - start
                problem = None
                if status in (OK, "HTTP_200") and case.check is not None and status in case.expect:
                    try:
                        problem = case.check(payload)
                    except Exception as e:  # noqa: BLE001
                        problem = f"answer check raised {type(e).__name__}: {e}"
                records[j] = {"i": i, "transport": case.transport, "kind": case.kind, "status": status,
                              "expected": sorted(case.expect), "seconds": took, "problem": problem,
                              "detail": (payload if isinstance(payload, str) else
                                         payload.decode(errors="replace") if isinstance(payload, bytes) else "")[:300]
                              if status not in (OK, "HTTP_200") else ""}
        finally:
            clients.close()

    threads = [threading.Thread(target=worker, name=f"fuzz-{n}") for n in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0

    alive = server.alive()
    after_status, after = (probe.grpc_call(probe.predict.Predict, predict_request(ctx, probe_inputs))
                           if alive else ("NO_ANSWER(dead)", None))
    same_answer = (after_status == OK and np.array_equal(after["item_ids"], before["item_ids"])
                   and np.allclose(after["scores"], before["scores"], atol=1e-6))
    probe.close()
    rss_after = proc_status(server.pid) if alive else {}
    exit_code = server.terminate()
    server.kill()

    done = [r for r in records if r is not None]
    by_status = collections.Counter(f"{r['transport']}:{r['status']}" for r in done)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in done:
        by_kind[f"{r['transport']}:{r['kind'].split(':')[0]}"][r["status"]] += 1
    failures = []
    for r in done:
        reason = None
        if r["status"].startswith("NO_ANSWER") or r["status"].startswith("CLIENT_ERROR"):
            reason = "no status within the deadline"
        elif r["status"] in SERVER_FAULTS:
            reason = "server fault status"
        elif r["status"] not in r["expected"]:
            reason = "unexpected status"
        elif r["problem"]:
            reason = "wrong answer"
        if reason:
            failures.append(dict(r, reason=reason))
    slowest = sorted(done, key=lambda r: -r["seconds"])[:5]
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: v for k, v in vars(args).items()},
        "requests": len(done), "requests_planned": len(indices), "seconds": elapsed,
        "status_distribution": dict(sorted(by_status.items())),
        "status_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failures": len(failures), "failures_by_reason": dict(collections.Counter(f["reason"] for f in failures)),
        "failure_examples": failures[:30],
        "server_fault_statuses": sum(1 for r in done if r["status"] in SERVER_FAULTS),
        "no_answer": sum(1 for r in done if r["status"].startswith(("NO_ANSWER", "CLIENT_ERROR"))),
        "slowest": [{k: r[k] for k in ("i", "transport", "kind", "status", "seconds")} for r in slowest],
        "max_seconds": max((r["seconds"] for r in done), default=0.0),
        "answer_rows_checked": len(reference.recalls),
        "mean_recall_vs_exact": float(np.mean(reference.recalls)) if reference.recalls else None,
        "min_recall_vs_exact": float(np.min(reference.recalls)) if reference.recalls else None,
        "rows_recall_below_half": int(np.sum(np.asarray(reference.recalls) < 0.5)),
        "mean_recall_rows_with_negative_weights": _mean_where(reference.recalls, reference.recall_negative_weights, True),
        "mean_recall_rows_without_negative_weights": _mean_where(reference.recalls, reference.recall_negative_weights,
                                                                 False),
        "server_alive_at_end": alive, "reference_answer_after": after_status,
        "reference_answer_unchanged": bool(same_answer), "server_exit_code": exit_code,
        "rss_before_mb": rss_before.get("rss_mb"), "rss_after_mb": rss_after.get("rss_mb"),
        "threads_before": rss_before.get("threads"), "threads_after": rss_after.get("threads"),
        "workdir": str(workdir),
    }
    results["crashes"] = 0 if alive and exit_code == 0 else 1
    recall_ok = results["mean_recall_vs_exact"] is None or results["mean_recall_vs_exact"] >= args.min_mean_recall
    results["passed"] = (not failures and alive and bool(same_answer) and exit_code == 0
                         and len(done) == len(indices) and recall_ok)
    if not alive or exit_code != 0:
        results["server_log_tail"] = server.log_tail()
    return results


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def report(r: dict[str, Any]) -> str:
    """Human-readable summary."""
    lines = [f"requests           {r['requests']:,} in {r['seconds']:.1f}s (slowest {r['max_seconds']:.2f}s)",
             "status distribution:"]
    for k, v in r["status_distribution"].items():
        lines.append(f"  {k:<40} {v:>6}")
    lines += [f"server faults      {r['server_fault_statuses']} (INTERNAL/UNKNOWN/5xx)",
              f"no status in time  {r['no_answer']}",
              f"failures           {r['failures']} {r['failures_by_reason'] or ''}"]
    for f in r["failure_examples"][:10]:
        lines.append(f"  #{f['i']} {f['transport']} {f['kind']}: {f['status']} (expected {f['expected']}) "
                     f"{f['reason']} {f['problem'] or ''} {f['detail'][:150]!r}")
    lines += [f"server             alive at end: {r['server_alive_at_end']}, reference answer after the fuzz: "
              f"{r['reference_answer_after']} (unchanged: {r['reference_answer_unchanged']}), exit code after "
              f"SIGTERM: {r['server_exit_code']}, crashes: {r['crashes']}",
              f"answers checked    {r['answer_rows_checked']} rows of valid retrievals: scores exact for the "
              f"request; share of items in the exact top-k: mean {_fmt(r['mean_recall_vs_exact'])} (rows with a "
              f"negative weight {_fmt(r['mean_recall_rows_with_negative_weights'])}, others "
              f"{_fmt(r['mean_recall_rows_without_negative_weights'])}), {r['rows_recall_below_half']} rows below 0.5",
              f"server RSS         {r['rss_before_mb']} MB -> {r['rss_after_mb']} MB, threads "
              f"{r['threads_before']} -> {r['threads_after']}",
              "PASSED" if r["passed"] else "FAILED"]
    return "\n".join(lines)
