"""ScaNN vs exact search on trained item vectors: recall@100 against latency, and the default per size.

    python benchmarks/bench_scann.py --no_served            # 10^5 and 10^6, trained + generated: the sweep
    python benchmarks/bench_scann.py --served_only          # then, with the rule updated: the served check
    python benchmarks/bench_scann.py --sizes 100000 --corpora generated --queries 300   # quick look

Corpora (:mod:`csmf_tf.testing.embedding_corpus`):

* ``trained``: the synthetic cascade at ``n`` items, CSMF's stage 1 (the exposure tower) trained through
  the streaming path with lazy Adam and sparse embeddings, cached as ``.npz`` under ``--cache`` (first
  run, measured on the shared 2-core machine at load 6-10: 4 min at 10^5; 31 min at 10^6, of which 4 min
  generating and 4 epochs of about 2,900 steps until early stopping; peak RSS 4.4 GB). The vectors are
  what an export indexes: the 64-d tower output plus the popularity-prior column; queries are the users'
  ``[u, alpha]`` (one objective, so the fused query ``u * w`` is ``u`` up to a scale no ranking sees).
* ``generated``: :func:`~csmf_tf.testing.embedding_corpus.embedding_corpus` at ``n`` items, fitted to the
  trained vectors at 10^6; the profiles of all corpora are written side by side (``profile``).

For every corpus: exact top-100 (``tf.matmul`` + ``top_k``) is the ground truth; TFRS
``factorized_top_k.BruteForce`` and ScaNN are timed the same way in the same run (one ``tf.function``
each; single queries: p50/p99 over ``--single_repeats`` calls; batched: ms per query at ``--batch``).
ScaNN indexes are the exporter's layer (``ScaNNIndex``), one per ``--indexes`` entry ``m:plain`` or
``m:spherical`` (``m * sqrt(n)`` leaves, plain or spherical k-means centres); on each, the query-time
knobs (fraction of leaves searched, candidates re-ranked) are swept through the searcher's own op. The
cheapest configuration with recall@100 >= ``--target_recall`` (fewest vectors scored, see
:func:`cheapest`) on the trained corpora is what ``ScannOptions.for_catalogue`` encodes; the run checks
that rule end to end: the *served graph* (``build_serving_module`` with no index options, i.e. the
export's default) on the trained vectors, recall and latency against the exact served graph
(``--served_only`` runs just that check on an earlier ``--out``, after the rule was updated from it).
Writes JSON (``--out``) and the recall-vs-cost/latency curves as PNG (``--png``).
"""
from __future__ import annotations

import argparse
import json
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
import tensorflow_recommenders as tfrs  # noqa: E402
from scann import scann_ops  # noqa: E402

from csmf_tf.data.table import Catalog  # noqa: E402
from csmf_tf.metrics.prior import PopularityPrior  # noqa: E402
from csmf_tf.serving.export import build_serving_module  # noqa: E402
from csmf_tf.serving.index import ScaNNIndex, ScannOptions  # noqa: E402
from csmf_tf.testing.demo import identity_towers  # noqa: E402
from csmf_tf.testing.embedding_corpus import (TRAINED_PROFILE, corpus_profile, default_recipe,  # noqa: E402
                                              embedding_corpus, load_trained, train_item_vectors)

K = 100


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


def load_corpus(kind: str, n: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(items, queries, description)`` of corpus ``kind`` at ``n`` items."""
    rng = np.random.default_rng(args.seed)
    if kind == "trained":
        recipe = default_recipe(n)
        items, users = load_trained(train_item_vectors(recipe, args.cache))
        queries = users[rng.choice(len(users), min(args.queries, len(users)), replace=False)]
        return items, queries, {"recipe": recipe.__dict__, "num_users": int(len(users))}
    items, queries = embedding_corpus(n, args.queries, TRAINED_PROFILE, seed=args.seed)
    return items, queries, {"profile": TRAINED_PROFILE.__dict__}


def parse_index(text: str) -> tuple[float, bool]:
    """``"2:plain"`` -> ``(2.0, False)``: leaves = multiplier * sqrt(n), spherical or plain k-means centres."""
    multiplier, _, kind = text.partition(":")
    if kind not in ("plain", "spherical"):
        raise argparse.ArgumentTypeError(f"an index is MULTIPLIER:plain or MULTIPLIER:spherical, got {text!r}")
    return float(multiplier), kind == "spherical"


def sweep_index(items: np.ndarray, q: np.ndarray, truth: np.ndarray, multiplier: float, spherical: bool,
                args: argparse.Namespace) -> tuple[list[dict], float]:
    """One index with ``multiplier * sqrt(n)`` leaves; every (leaf fraction, reorder) pair on its searcher."""
    n = len(items)
    leaves = max(1, int(round(multiplier * math.sqrt(n))))
    t0 = time.perf_counter()
    index = ScaNNIndex(k=K, num_leaves=leaves, num_leaves_to_search=leaves, dimensions_per_block=2,
                       num_reordering_candidates=max(args.reorder), training_iterations=12,
                       training_sample_size=min(n, 250_000), spherical=spherical,
                       anisotropic_quantization_threshold=0.2)
    index.index(tf.constant(items))
    build_s = time.perf_counter() - t0
    kind = "spherical" if spherical else "plain"
    print(f"  ScaNN index, {leaves} {kind} leaves ({multiplier} sqrt(n)): built in {build_s:.1f}s", flush=True)
    searcher = scann_ops.searcher_from_module(index._serialized_searcher)
    rows = []
    for frac in args.leaf_fractions:
        ls = min(leaves, max(1, int(math.ceil(leaves * frac))))
        for reorder in args.reorder:
            @tf.function(input_signature=[tf.TensorSpec([None, q.shape[1]], tf.float32)])
            def search(x, ls=ls, reorder=reorder):
                return searcher.search_batched(x, final_num_neighbors=K, pre_reorder_num_neighbors=reorder,
                                               leaves_to_search=ls).indices

            ids = np.concatenate([search(q[i:i + 256]).numpy() for i in range(0, len(q), 256)])
            row = {"num_leaves": leaves, "leaf_multiplier": multiplier, "spherical": spherical, "leaves_to_search": ls,
                   "leaf_fraction": frac, "reorder": reorder, "recall@100": recall(ids, truth),
                   "single": time_single(lambda r, f=search: f(q[r]), len(q), args.single_repeats),
                   "batched_ms_per_query": time_batched(lambda r, f=search: f(q[r]), len(q), args.batch)}
            row["vectors_scored"] = vectors_scored(row, n)
            rows.append(row)
            print(f"    {kind:>9} leaves {ls:>5}/{leaves} ({frac:>4.0%}) reorder {reorder:>5}: recall@100 "
                  f"{row['recall@100']:.4f}  single p50 {row['single']['p50_ms']:.3f} ms "
                  f"p99 {row['single']['p99_ms']:.3f}  batched {row['batched_ms_per_query']:.3f} ms/q", flush=True)
    return rows, build_s


def served_check(items: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict:
    """The export's serving graph with its *default* index options (``ScannOptions.for_catalogue``) on the
    trained vectors ([v, log_pop] rows, [u, alpha] queries) against the exact served graph."""
    dim = items.shape[1] - 1
    user_model, item_model = identity_towers(dim)
    catalog = Catalog(np.array([str(i) for i in range(len(items))], dtype=object), {})
    # The export appends log_pop to the rows and alpha * k to the queries: [v, log_pop] . [u, alpha].
    prior = PopularityPrior(items[:, dim:].copy(), queries[:1, dim].astype(np.float32))
    users = queries[:, :dim]
    weights = np.ones((len(queries), 1), np.float32)
    out = {}
    for name, use_scann in (("scann_default", True), ("brute_force", False)):
        t0 = time.perf_counter()
        module, config = build_serving_module(user_model, item_model, catalog, np.ones(dim, np.int32),
                                              ("exposure",), k_max=K, default_k=K, use_scann=use_scann,
                                              item_vectors=items[:, :dim], popularity_prior=prior)
        built = time.perf_counter() - t0

        def call(rows, module=module):
            return module.retrieve(user_vector=tf.constant(users[rows]),
                                   objective_weights=tf.constant(weights[rows]), k=tf.constant(K))

        ids = np.concatenate([call(slice(i, i + 256))["item_ids"].numpy() for i in range(0, len(users), 256)])
        out[name] = {"recall@100": recall(ids.astype(np.int64), truth),
                     "single": time_single(call, len(users), args.single_repeats),
                     "batched_ms_per_query": time_batched(call, len(users), args.batch),
                     "module_build_s": built, "index": config["index"]}
        print(f"  served graph [{name}]: recall@100 {out[name]['recall@100']:.4f}, single p50 "
              f"{out[name]['single']['p50_ms']:.3f} ms, batched {out[name]['batched_ms_per_query']:.3f} ms/q "
              f"(build {built:.1f}s)", flush=True)
    out["single_speedup"] = out["brute_force"]["single"]["p50_ms"] / out["scann_default"]["single"]["p50_ms"]
    return out


def vectors_scored(row: dict, n: int) -> int:
    """Centroids + AH-scored points + exactly re-ranked candidates of one configuration on ``n`` items."""
    return int(round(row["num_leaves"] + n * row["leaves_to_search"] / row["num_leaves"] + row["reorder"]))


def cheapest(sweep: list[dict], target: float) -> dict | None:
    """The configuration with recall@100 >= ``target`` that scores the fewest vectors: centroids
    (``num_leaves``), AH-scored points (the searched leaves' share of the corpus) and exactly re-ranked
    candidates; measured latency breaks ties. Vectors scored, not latency, decide: at 10^5 items a single
    query costs 0.5-1 ms whatever the setting (call overhead), and on a loaded 2-core machine single
    timings move by more than the differences between settings."""
    ok = [r for r in sweep if r["recall@100"] >= target]
    return min(ok, key=lambda r: (r["vectors_scored"], r["single"]["p50_ms"])) if ok else None


def bench_corpus(kind: str, n: int, args: argparse.Namespace) -> dict:
    """BruteForce and the ScaNN sweep on one corpus."""
    t0 = time.perf_counter()
    items, q, description = load_corpus(kind, n, args)
    load_before = os.getloadavg()
    items_t = tf.constant(items)
    truth = exact_top_k(q, items_t)
    print(f"\n== {kind} n={len(items):,} D={items.shape[1]}, {len(q)} queries: data + exact top-{K} in "
          f"{time.perf_counter() - t0:.1f}s (load {load_before[0]:.1f})", flush=True)
    brute = tfrs.layers.factorized_top_k.BruteForce(k=K)
    brute.index(items_t)
    search = tf.function(lambda x: brute(x, k=K)[1], input_signature=[tf.TensorSpec([None, q.shape[1]], tf.float32)])
    ids = np.concatenate([search(q[i:i + 256]).numpy() for i in range(0, len(q), 256)])
    bf = {"recall@100": recall(ids, truth), "vectors_scored": int(len(items)),
          "single": time_single(lambda r: search(q[r]), len(q), args.single_repeats),
          "batched_ms_per_query": time_batched(lambda r: search(q[r]), len(q), args.batch)}
    print(f"  TFRS BruteForce: recall@100 {bf['recall@100']:.4f}, single p50 {bf['single']['p50_ms']:.3f} ms "
          f"p99 {bf['single']['p99_ms']:.3f}, batched {bf['batched_ms_per_query']:.3f} ms/q", flush=True)
    sweep, builds = [], {}
    for m, spherical in args.indexes:
        rows, builds[f"{m}:{'spherical' if spherical else 'plain'}"] = sweep_index(items, q, truth, m, spherical, args)
        sweep += rows
    chosen = cheapest(sweep, args.target_recall)
    print(f"  cheapest with recall@100 >= {args.target_recall}: " + (
        f"{chosen['leaves_to_search']}/{chosen['num_leaves']} {'spherical' if chosen['spherical'] else 'plain'} "
        f"leaves, reorder {chosen['reorder']}, "
        f"{chosen['single']['p50_ms']:.3f} ms" if chosen else "NONE"), flush=True)
    result = {"corpus": kind, "nominal_items": n, "num_items": int(len(items)), "dim": int(items.shape[1]),
              "num_queries": int(len(q)), **description, "profile": corpus_profile(items, q),
              "brute_force": bf, "index_build_s": builds, "sweep": sweep, "chosen": chosen,
              "for_catalogue": ScannOptions.for_catalogue(len(items)).resolve(len(items), K)}
    if kind == "trained" and args.served:
        result["served"] = served_check(items, q, truth, args)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return result


def pareto(rows: list[dict], latency: Callable[[dict], float]) -> list[dict]:
    """The configurations no other one beats on both recall and ``latency``, fastest first."""
    best, out = -1.0, []
    for r in sorted(rows, key=lambda r: (latency(r), -r["recall@100"])):
        if r["recall@100"] > best:
            out.append(r)
            best = r["recall@100"]
    return out


def plot(results: dict, path: str | Path) -> Path:
    """Recall@100 against vectors scored, single-query p50 and batched ms/query, one column per size; the
    Pareto front of every corpus and index, TFRS BruteForce (which scores every vector) as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["nominal_items"] for r in results["runs"]})
    fig, axes = plt.subplots(3, len(sizes), figsize=(6.2 * len(sizes), 12.5), squeeze=False)
    colours = {"trained": "#4c72b0", "generated": "#dd8452"}
    styles = ["-", "--", ":"]
    for col, n in enumerate(sizes):
        for row, (label, latency) in enumerate((("vectors scored per query", lambda r: r["vectors_scored"]),
                                                ("single query, p50 ms", lambda r: r["single"]["p50_ms"]),
                                                ("batched, ms per query", lambda r: r["batched_ms_per_query"]))):
            ax = axes[row, col]
            for run in (r for r in results["runs"] if r["nominal_items"] == n):
                c = colours.get(run["corpus"], "k")
                kinds = sorted({(x["leaf_multiplier"], x["spherical"]) for x in run["sweep"]})
                for s, (m, spherical) in enumerate(kinds):
                    rows = [x for x in run["sweep"] if (x["leaf_multiplier"], x["spherical"]) == (m, spherical)]
                    front = pareto(rows, latency)
                    ax.plot([latency(x) for x in front], [x["recall@100"] for x in front], styles[s % 3], color=c,
                            marker="o", ms=3, label=f"{run['corpus']} ({run['num_items']:,}): ScaNN "
                            f"{front[0]['num_leaves']} {'spherical' if spherical else 'plain'} leaves")
                bf = run["brute_force"]
                ax.plot([latency(bf)], [bf["recall@100"]], "x", color=c, ms=9,
                        label=f"{run['corpus']}: TFRS BruteForce")
            ax.axhline(results["target_recall"], color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("recall@100 vs exact")
            ax.set_ylim(0.0, 1.02)
            ax.set_title(f"{n:,} items, {label.split(',')[0]}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(f"ScaNN recall@{K} vs latency (Pareto fronts of the sweep), {results['machine']['cpus']} CPUs, "
                 f"load {results['load_average_at_end'][0]:.1f}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    """Run every corpus at every size; returns the JSON-able results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--corpora", nargs="+", choices=("trained", "generated"), default=["trained", "generated"])
    p.add_argument("--cache", default="/tmp/csmf_ann_cache", help="trained-vector cache (.npz per size)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--single_repeats", type=int, default=100)
    p.add_argument("--indexes", type=parse_index, nargs="+", default=[(1.0, False), (2.0, False), (1.0, True)],
                   help="MULTIPLIER:plain|spherical: an index with MULTIPLIER * sqrt(n) leaves")
    p.add_argument("--leaf_fractions", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--reorder", type=int, nargs="+", default=[200, 500, 1000, 2000])
    p.add_argument("--target_recall", type=float, default=0.99)
    p.add_argument("--no_served", dest="served", action="store_false",
                   help="skip the served-graph check of the default options")
    p.add_argument("--served_only", action="store_true",
                   help="re-read --out, re-choose, and run only the served-graph check of the current defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/serving/bench_scann.json")
    p.add_argument("--png", default="docs/results/serving/bench_scann.png")
    args = p.parse_args(argv)
    if args.served_only:
        return add_served(args)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "tensorflow": tf.__version__,
                           "load_average_at_start": os.getloadavg()},
               "k": K, "target_recall": args.target_recall, "args": vars(args), "runs": []}
    for n in args.sizes:
        for kind in args.corpora:
            results["runs"].append(bench_corpus(kind, n, args))
            write_results(results, args.out)   # partial results survive an interrupted run
    results["load_average_at_end"] = os.getloadavg()
    report(results, args)
    return results


def add_served(args: argparse.Namespace) -> dict:
    """``--served_only``: re-read ``--out``, re-measure each corpus's profile, re-choose each sweep's
    cheapest configuration, record what
    ``ScannOptions.for_catalogue`` now gives, run the served-graph check on the trained corpora (the same
    queries: same seed and count), and rewrite the JSON and the PNG."""
    results = json.loads(Path(args.out).read_text())
    for run in results["runs"]:
        args.queries = run["num_queries"]
        items, q, _ = load_corpus(run["corpus"], run["nominal_items"], args)
        run["profile"] = corpus_profile(items, q)
        run["brute_force"]["vectors_scored"] = run["num_items"]
        for row in run["sweep"]:
            row["vectors_scored"] = vectors_scored(row, run["num_items"])
        run["chosen"] = cheapest(run["sweep"], results["target_recall"])
        run["for_catalogue"] = ScannOptions.for_catalogue(run["num_items"]).resolve(run["num_items"], K)
        if run["corpus"] == "trained":
            print(f"\n== served graph, trained n={len(items):,}", flush=True)
            before = os.getloadavg()
            run["served"] = served_check(items, q, exact_top_k(q, tf.constant(items)), args)
            run["served"]["load_average"] = {"before": before, "after": os.getloadavg()}
    results["load_average_at_end"] = os.getloadavg()
    report(results, args)
    return results


def report(results: dict, args: argparse.Namespace) -> None:
    """The summary table, the JSON and the PNG."""
    print("\n| corpus | items | BruteForce single p50 ms | batched ms/q | cheapest ScaNN >= target | recall@100 "
          "| single p50 ms | p99 ms | batched ms/q | speed-up (single) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        b, c = r["brute_force"], r["chosen"]
        if c is None:
            print(f"| {r['corpus']} | {r['num_items']:,} | {b['single']['p50_ms']:.3f} | "
                  f"{b['batched_ms_per_query']:.3f} | none | | | | | |")
            continue
        print(f"| {r['corpus']} | {r['num_items']:,} | {b['single']['p50_ms']:.3f} | {b['batched_ms_per_query']:.3f} | "
              f"{c['leaves_to_search']}/{c['num_leaves']} {'spherical' if c['spherical'] else 'plain'} leaves, "
              f"reorder {c['reorder']} | {c['recall@100']:.4f} | "
              f"{c['single']['p50_ms']:.3f} | {c['single']['p99_ms']:.3f} | {c['batched_ms_per_query']:.3f} | "
              f"{b['single']['p50_ms'] / c['single']['p50_ms']:.1f}x |")
    for r in (r for r in results["runs"] if "served" in r):
        s = r["served"]
        d, b = s["scann_default"], s["brute_force"]
        print(f"served graph, {r['corpus']} {r['num_items']:,}: default index {d['index']} -> recall@100 "
              f"{d['recall@100']:.4f}, single p50 {d['single']['p50_ms']:.3f} ms vs exact {b['single']['p50_ms']:.3f} "
              f"ms ({s['single_speedup']:.1f}x)")
    write_results(results, args.out)
    plot(results, args.png)


if __name__ == "__main__":
    main()
