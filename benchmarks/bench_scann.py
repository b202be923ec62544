"""ScaNN vs exact fused retrieval: recall@100, latency, index build time (not a test).

    python benchmarks/bench_scann.py                       # 100k and 1M items, D=64
    python benchmarks/bench_scann.py --sizes 100000 --queries 200 --out results/bench_scann.json

For every corpus size: clustered item vectors (``csmf_tf.testing.demo.benchmark_corpus``), fused
queries ``u * w`` with random objective weights, exact top-100 as ground truth. The ScaNN index is
built with the exporter's own layer (``ScaNNIndex``, a ``tfrs`` ScaNN layer) and its TF ops; the
query-time knobs (leaves searched, candidates re-ranked) are swept on that one index, the cheapest
configuration with recall@100 >= target is chosen, and then the *served graph* (the exported
``serving_default`` function: fused query, ScaNN, exact re-scoring, per-objective scores) is built
with it and timed against the exact (brute-force) served graph.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_results  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
import csmf_tf  # noqa: E402,F401  (tf-keras before TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scann import scann_ops  # noqa: E402

from csmf_tf.data.table import Catalog  # noqa: E402
from csmf_tf.scoring import fusion_scales, stage_query_masks  # noqa: E402
from csmf_tf.testing.demo import benchmark_corpus, identity_towers  # noqa: E402
from csmf_tf.serving.export import build_serving_module  # noqa: E402
from csmf_tf.serving.index import ScaNNIndex, ScannOptions  # noqa: E402

K = 100


def fused_queries(users: np.ndarray, weights: np.ndarray, owner_stage: np.ndarray) -> np.ndarray:
    """``u * w`` with ``w = k @ M`` (csmf_tf.scoring), one weight vector per query."""
    return (users * fusion_scales(weights, stage_query_masks(owner_stage, weights.shape[1]))).astype(np.float32)


def exact_top_k(queries: np.ndarray, items: tf.Tensor, k: int = K, chunk: int = 64) -> np.ndarray:
    """Ground-truth top-k row indices by exact inner product."""
    out = []
    for i in range(0, len(queries), chunk):
        out.append(tf.math.top_k(tf.matmul(queries[i:i + chunk], items, transpose_b=True), k).indices.numpy())
    return np.concatenate(out)


def recall(approx: np.ndarray, truth: np.ndarray) -> float:
    """Mean |approx ∩ truth| / |truth| over queries (the TFRS tutorial's recall@k)."""
    return float(np.mean([len(set(a.tolist()) & set(t.tolist())) / len(t) for a, t in zip(approx, truth)]))


def time_single(fn: Callable[[slice], object], num_queries: int, repeats: int) -> dict:
    """Per-query latency of ``fn(slice(i, i + 1))`` over ``repeats`` queries (after a warm-up call)."""
    fn(slice(0, 1))
    times = []
    for r in range(repeats):
        i = r % num_queries
        t0 = time.perf_counter()
        fn(slice(i, i + 1))
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.median(ms)), "mean_ms": float(ms.mean()), "p99_ms": float(np.percentile(ms, 99))}


def time_batched(fn: Callable[[slice], object], num_queries: int, batch: int) -> float:
    """Milliseconds per query when ``fn`` gets ``batch`` queries at a time."""
    fn(slice(0, batch))
    t0 = time.perf_counter()
    n = 0
    for i in range(0, num_queries - batch + 1, batch):
        fn(slice(i, i + batch))
        n += batch
    return (time.perf_counter() - t0) / max(n, 1) * 1e3


def bench_size(n: int, args: argparse.Namespace) -> dict:
    """Exact vs ScaNN (sweep, chosen configuration, served graphs) for ``n`` items."""
    dim = args.dim
    t0 = time.perf_counter()
    corpus = benchmark_corpus(n, dim, args.queries, seed=args.seed)
    q = fused_queries(corpus.users, corpus.weights, corpus.owner_stage)
    items = tf.constant(corpus.items)
    truth = exact_top_k(q, items)
    print(f"\n== N={n:,} D={dim}: data + exact ground truth in {time.perf_counter() - t0:.1f}s", flush=True)

    # Exact search, as the brute-force export runs it (matmul + top_k in one TF function).
    @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32)])
    def brute(x):
        return tf.math.top_k(tf.matmul(x, items, transpose_b=True), K)

    bf_single = time_single(lambda r: brute(q[r]), len(q), args.single_repeats)
    bf_batched = time_batched(lambda r: brute(q[r]), len(q), args.batch)
    print(f"brute force: single p50 {bf_single['p50_ms']:.3f} ms, batched({args.batch}) "
          f"{bf_batched:.3f} ms/query", flush=True)

    # One index with the exporter's layer; sweep the query-time knobs on its searcher.
    leaves = max(1, int(round(math.sqrt(n))))
    max_reorder = max(args.reorder)
    t0 = time.perf_counter()
    index = ScaNNIndex(k=K, num_leaves=leaves, num_leaves_to_search=max(1, leaves // 10),
                       dimensions_per_block=args.dims_per_block, num_reordering_candidates=max_reorder,
                       training_iterations=12, training_sample_size=min(n, 250_000), spherical=True,
                       anisotropic_quantization_threshold=0.2)
    index.index(items)
    build_s = time.perf_counter() - t0
    print(f"ScaNN index ({leaves} leaves, spherical, AH {args.dims_per_block} dims/block, "
          f"reorder <= {max_reorder}) built in {build_s:.1f}s", flush=True)
    searcher = scann_ops.searcher_from_module(index._serialized_searcher)

    sweep = []
    for frac in args.leaf_fractions:
        ls = max(1, int(math.ceil(leaves * frac)))
        for reorder in args.reorder:
            def search(x, ls=ls, reorder=reorder):
                return searcher.search_batched(x, final_num_neighbors=K, pre_reorder_num_neighbors=reorder,
                                               leaves_to_search=ls)
            ids = np.concatenate([search(q[i:i + 256]).indices.numpy() for i in range(0, len(q), 256)])
            row = {"leaves_to_search": ls, "leaf_fraction": frac, "reorder": reorder,
                   "recall@100": recall(ids, truth),
                   "single": time_single(lambda r, f=search: f(q[r]), len(q), max(50, args.single_repeats // 2)),
                   "batched_ms_per_query": time_batched(lambda r, f=search: f(q[r]), len(q), args.batch)}
            sweep.append(row)
            print(f"  leaves {ls:>5} ({frac:>4.0%}) reorder {reorder:>5}: recall@100 {row['recall@100']:.4f}  "
                  f"single p50 {row['single']['p50_ms']:.3f} ms  batched {row['batched_ms_per_query']:.3f} ms/q",
                  flush=True)
    ok = [r for r in sweep if r["recall@100"] >= args.target_recall]
    chosen = min(ok, key=lambda r: r["single"]["p50_ms"]) if ok else max(sweep, key=lambda r: r["recall@100"])
    print(f"chosen: leaves {chosen['leaves_to_search']} reorder {chosen['reorder']} "
          f"(recall {chosen['recall@100']:.4f}{'' if ok else ', TARGET NOT MET'})", flush=True)

    # The served graph (export's serving_default) with the chosen configuration vs the exact one.
    user_model, item_model = identity_towers(dim)
    catalog = Catalog(np.array([str(i) for i in range(n)], dtype=object), {})
    served = {}
    for name, use_scann in (("scann", True), ("brute_force", False)):
        t0 = time.perf_counter()
        module, config = build_serving_module(
            user_model, item_model, catalog, corpus.owner_stage, ("exposure", "click", "conversion"),
            k_max=K, default_k=K, use_scann=use_scann, item_vectors=corpus.items,
            scann_options=ScannOptions(num_leaves=leaves, num_leaves_to_search=chosen["leaves_to_search"],
                                       num_reordering_candidates=chosen["reorder"],
                                       dimensions_per_block=args.dims_per_block))
        built = time.perf_counter() - t0

        def call(rows, module=module):
            return module.retrieve(user_vector=tf.constant(corpus.users[rows]),
                                   objective_weights=tf.constant(corpus.weights[rows]), k=tf.constant(K))

        ids = np.concatenate([call(slice(i, i + 256))["item_ids"].numpy() for i in range(0, len(q), 256)])
        ids = ids.astype(np.int64)
        single = time_single(call, len(q), args.single_repeats)
        batched = time_batched(call, len(q), args.batch)
        served[name] = {"recall@100": recall(ids, truth), "single": single, "batched_ms_per_query": batched,
                        "module_build_s": built, "index": config["index"]}
        print(f"served graph [{name}]: recall@100 {served[name]['recall@100']:.4f}, single p50 "
              f"{single['p50_ms']:.3f} ms, batched {batched:.3f} ms/q (build {built:.1f}s)", flush=True)
    speedup = served["brute_force"]["single"]["p50_ms"] / served["scann"]["single"]["p50_ms"]
    print(f"served single-query speed-up ScaNN vs exact: {speedup:.1f}x", flush=True)
    return {"num_items": n, "dim": dim, "num_queries": len(q), "num_leaves": leaves,
            "index_build_s": build_s, "brute_force": {"single": bf_single, "batched_ms_per_query": bf_batched},
            "sweep": sweep, "chosen": chosen, "served": served,
            "served_single_speedup": speedup, "target_recall": args.target_recall,
            "target_met": bool(ok) and served["scann"]["recall@100"] >= args.target_recall and speedup >= 10}


def main(argv: list[str] | None = None) -> dict:
    """Run every corpus size; returns the JSON-able results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--single_repeats", type=int, default=200)
    p.add_argument("--leaf_fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4])
    p.add_argument("--reorder", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--dims_per_block", type=int, default=2)
    p.add_argument("--target_recall", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_scann.json")
    args = p.parse_args(argv)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "tensorflow": tf.__version__}, "k": K, "runs": [bench_size(n, args) for n in args.sizes]}
    print("\n| items | index build s | exact single ms | ScaNN single ms | speed-up | exact batched ms/q "
          "| ScaNN batched ms/q | recall@100 | leaves searched | reorder |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        s, b, c = r["served"]["scann"], r["served"]["brute_force"], r["chosen"]
        print(f"| {r['num_items']:,} | {r['index_build_s']:.1f} | {b['single']['p50_ms']:.3f} | "
              f"{s['single']['p50_ms']:.3f} | {r['served_single_speedup']:.1f}x | {b['batched_ms_per_query']:.3f} | "
              f"{s['batched_ms_per_query']:.3f} | {s['recall@100']:.4f} | {c['leaves_to_search']}/{r['num_leaves']} "
              f"| {c['reorder']} |")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
