"""Serving cost: CSMF's single fused query vs a multi-vector layout (not a test).

    python benchmarks/bench_multivector.py                         # 1M items, S=3, D=64
    python benchmarks/bench_multivector.py --num_items 200000 --out results/bench_multivector.json

Multi-vector layout (separate models per objective, or MMoE heads): every item has ``S`` vectors of
``D`` dims, every query ``S`` vectors. Serving a fused score ``F = sum_t k_t <u_t, v_t>`` then takes
``S`` index searches (one per objective, ``k'`` candidates each), a merge of the candidate union
(de-duplicated), exact ``F`` for each candidate from all ``S`` item tables, and a top-k.

CSMF: one ``D``-dim item vector, one index, one search with the fused query ``u * w``, exact re-scoring
of its ``k_max`` candidates. Both run as TF graphs with the exporter's ScaNN layer and the same
index parameters; latencies are measured in the same process, one after the other, and reported with
their ratio and with recall@k against each layout's own exact fused ranking.
"""
from __future__ import annotations

import argparse
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

from csmf_tf.scoring import stage_query_masks  # noqa: E402
from csmf_tf.testing.demo import benchmark_corpus  # noqa: E402
from csmf_tf.serving.index import ScaNNIndex, ScannOptions, build_index  # noqa: E402


def make_index(vectors: np.ndarray, candidates: int, options: ScannOptions) -> tuple[ScaNNIndex, float]:
    """The exporter's ScaNN layer over ``vectors``; returns ``(index, build seconds)``."""
    index, config = build_index(vectors, candidates, True, options)
    return index, config["build_seconds"]


def recall(approx: np.ndarray, truth: np.ndarray) -> float:
    """Mean |approx ∩ truth| / |truth| over queries."""
    return float(np.mean([len(set(a.tolist()) & set(t.tolist())) / len(t) for a, t in zip(approx, truth)]))


def timed(fn: Callable, args_of: Callable[[slice], tuple], n: int, repeats: int, batch: int) -> dict:
    """Single-query p50/mean and batched ms/query of ``fn(*args_of(slice))``."""
    fn(*args_of(slice(0, 1)))
    times = []
    for r in range(repeats):
        i = r % n
        t0 = time.perf_counter()
        fn(*args_of(slice(i, i + 1)))
        times.append(time.perf_counter() - t0)
    fn(*args_of(slice(0, batch)))
    t0 = time.perf_counter()
    m = 0
    for i in range(0, n - batch + 1, batch):
        fn(*args_of(slice(i, i + batch)))
        m += batch
    ms = np.array(times) * 1e3
    return {"single_p50_ms": float(np.median(ms)), "single_mean_ms": float(ms.mean()),
            "batched_ms_per_query": (time.perf_counter() - t0) / max(m, 1) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; returns the JSON-able results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64, help="D of CSMF's vector and of each per-objective vector")
    p.add_argument("--num_objectives", type=int, default=3)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--k", type=int, default=100, help="items returned")
    p.add_argument("--candidates", type=int, default=100, help="k' retrieved per index")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_multivector.json")
    args = p.parse_args(argv)
    n, d, s, k, kc = args.num_items, args.dim, args.num_objectives, args.k, args.candidates
    options = ScannOptions()

    t0 = time.perf_counter()
    base = benchmark_corpus(n, d, args.queries, s, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    # Per-objective embeddings of the same items / users: correlated (same categories), not identical.
    items_t = []
    users_t = []
    for _ in range(s):
        v = base.items + rng.standard_normal(base.items.shape).astype(np.float32) * 0.3 / np.sqrt(d)
        items_t.append(v.astype(np.float32))
        u = base.users + rng.standard_normal(base.users.shape).astype(np.float32) * 0.3 / np.sqrt(d)
        users_t.append(u.astype(np.float32))
    masks = stage_query_masks(base.owner_stage, s)
    print(f"data for N={n:,}, S={s}, D={d} in {time.perf_counter() - t0:.1f}s", flush=True)

    # -- CSMF: one index over D dims ------------------------------------------------------------------
    csmf_index, csmf_build = make_index(base.items, k, options)
    csmf_items = tf.constant(base.items)
    masks_t = tf.constant(masks)

    @tf.function(input_signature=[tf.TensorSpec([None, d], tf.float32), tf.TensorSpec([None, s], tf.float32)])
    def csmf(u, w):
        q = u * tf.matmul(w, masks_t)
        _, cand = csmf_index(q, k=k)
        cand = tf.cast(cand, tf.int32)
        scores = tf.einsum("bd,bcd->bc", q, tf.gather(csmf_items, cand))
        top, pos = tf.math.top_k(scores, k)
        return top, tf.gather(cand, pos, batch_dims=1)

    # -- multi-vector: S indexes, S searches, merge ------------------------------------------------------
    mv = [make_index(v, kc, options) for v in items_t]
    mv_indexes = [i for i, _ in mv]
    mv_build = sum(b for _, b in mv)
    mv_items = tf.constant(np.stack(items_t, axis=1))        # [N, S, D]

    @tf.function(input_signature=[tf.TensorSpec([None, s, d], tf.float32), tf.TensorSpec([None, s], tf.float32)])
    def multi(u, w):
        cands = [tf.cast(idx(u[:, t] * w[:, t:t + 1], k=kc)[1], tf.int32) for t, idx in enumerate(mv_indexes)]
        cand = tf.sort(tf.concat(cands, axis=1), axis=1)                          # [B, S*k']
        dup = tf.concat([tf.zeros_like(cand[:, :1], tf.bool), cand[:, 1:] == cand[:, :-1]], axis=1)
        vecs = tf.gather(mv_items, cand)                                          # [B, S*k', S, D]
        scores = tf.einsum("bcsd,bsd,bs->bc", vecs, u, w)
        scores = tf.where(dup, tf.constant(-np.inf, tf.float32), scores)          # each item once
        top, pos = tf.math.top_k(scores, k)
        return top, tf.gather(cand, pos, batch_dims=1)

    # exact rankings for recall (each layout against its own exact fused score)
    users = base.users
    w = base.weights
    q_csmf = users * (w @ masks)
    truth_csmf = np.concatenate([tf.math.top_k(tf.matmul(q_csmf[i:i + 64], csmf_items, transpose_b=True), k)
                                 .indices.numpy() for i in range(0, len(users), 64)])
    u_mv = np.stack(users_t, axis=1)                                               # [Q, S, D]
    truth_mv = []
    for i in range(0, len(users), 16):
        sc = sum(w[i:i + 16, t:t + 1] * (u_mv[i:i + 16, t] @ items_t[t].T) for t in range(s))
        truth_mv.append(tf.math.top_k(sc, k).indices.numpy())
    truth_mv = np.concatenate(truth_mv)

    ids_c = np.concatenate([csmf(users[i:i + 64], w[i:i + 64])[1].numpy() for i in range(0, len(users), 64)])
    ids_m = np.concatenate([multi(u_mv[i:i + 64], w[i:i + 64])[1].numpy() for i in range(0, len(users), 64)])
    res_c = timed(csmf, lambda r: (users[r], w[r]), len(users), args.repeats, args.batch)
    res_m = timed(multi, lambda r: (u_mv[r], w[r]), len(users), args.repeats, args.batch)
    res_c.update({"recall@k": recall(ids_c, truth_csmf), "index_build_s": csmf_build,
                  "index_bytes_float": int(base.items.nbytes), "searches_per_query": 1})
    res_m.update({"recall@k": recall(ids_m, truth_mv), "index_build_s": mv_build,
                  "index_bytes_float": int(sum(v.nbytes for v in items_t)), "searches_per_query": s})
    ratio_single = res_m["single_p50_ms"] / res_c["single_p50_ms"]
    ratio_batched = res_m["batched_ms_per_query"] / res_c["batched_ms_per_query"]
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "num_items": n, "dim": d, "num_objectives": s, "k": k, "candidates_per_index": kc,
               "scann": options.resolve(n, k), "csmf": res_c, "multi_vector": res_m,
               "ratio_single": ratio_single, "ratio_batched": ratio_batched}
    print("\n| layout | searches/query | single p50 ms | batched ms/q | recall@k | index build s | float table MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("CSMF fused (1 x D)", res_c), (f"multi-vector ({s} x D)", res_m)):
        print(f"| {name} | {r['searches_per_query']} | {r['single_p50_ms']:.3f} | {r['batched_ms_per_query']:.3f} | "
              f"{r['recall@k']:.4f} | {r['index_build_s']:.1f} | {r['index_bytes_float'] / 2**20:.0f} |")
    print(f"\nmulti-vector / CSMF cost: {ratio_single:.2f}x single-query, {ratio_batched:.2f}x batched")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
