"""Export CSMF towers as a TF Serving SavedModel (next version under <base_path>/<model_name>/).

    python -m pipelines.export --bundle runs/main/csmf/bundle --base_path saved_models --model_name csmf
    python -m pipelines.export --demo --num_items 20000 --dim 64       # untrained demo towers
    python -m pipelines.export --demo --brute_force                      # no ScaNN op needed to serve
    python -m pipelines.export --demo --min_ann_recall 0.95 --ann_recall_action warn

A bundle is what ``csmf_tf.serving.bundle.save_tower_bundle`` writes (towers as .keras, item catalog,
ownership, objectives). Prints the written version directory and the export's measured ANN recall@k
against exact search; below ``--min_ann_recall`` the export fails (nothing is published) or, with
``--ann_recall_action warn``, warns and exports.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import csmf_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)
from csmf_tf.serving.constants import (ANN_RECALL_ACTIONS, ANN_RECALL_FAIL, DEFAULT_ANN_RECALL_QUERIES,
                                       DEFAULT_MIN_ANN_RECALL)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="directory written by save_tower_bundle")
    src.add_argument("--demo", action="store_true", help="export untrained demo towers (clustered items)")
    p.add_argument("--base_path", default="saved_models")
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--k_max", type=int, default=100)
    p.add_argument("--default_k", type=int, default=10)
    p.add_argument("--weights", help="default objective weights, comma separated (default: bundle's or 1s)")
    p.add_argument("--brute_force", action="store_true", help="exact matmul + top_k instead of ScaNN")
    p.add_argument("--num_leaves", type=int)
    p.add_argument("--num_leaves_to_search", type=int)
    p.add_argument("--num_reordering_candidates", type=int)
    p.add_argument("--dimensions_per_block", type=int, default=2)
    p.add_argument("--min_ann_recall", type=float, default=DEFAULT_MIN_ANN_RECALL,
                   help="least recall@k of the served search against exact search (default %(default)s; "
                        "0: measure and record, enforce nothing)")
    p.add_argument("--ann_recall_action", choices=ANN_RECALL_ACTIONS, default=ANN_RECALL_FAIL,
                   help="below the floor: fail (publish nothing) or warn and export (default %(default)s)")
    p.add_argument("--ann_recall_k", type=int, help="k of the recall (default: --default_k)")
    p.add_argument("--ann_recall_queries", type=int, default=DEFAULT_ANN_RECALL_QUERIES,
                   help="most queries measured (default %(default)s): --demo users, else item vectors")
    p.add_argument("--num_users", type=int, default=1000, help="--demo only")
    p.add_argument("--num_items", type=int, default=10000, help="--demo only")
    p.add_argument("--dim", type=int, default=64, help="--demo only")
    p.add_argument("--seed", type=int, default=0, help="--demo only")
    return p


def main(argv: list[str] | None = None) -> Path:
    """Run the export; returns the version directory."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from csmf_tf.serving.export import ScannOptions, export_retrieval_model
    from csmf_tf.serving.recall import AnnRecallTooLow

    extra: dict = {}
    recall_users = None   # a bundle holds no users: item vectors stand in (csmf_tf.serving.recall)
    if args.demo:
        from csmf_tf.testing.demo import build_demo_towers

        d = build_demo_towers(args.num_users, args.num_items, args.dim,
                              num_clusters=max(2, int(args.num_items ** 0.5) // 2), seed=args.seed)
        user_model, item_model, catalog = d.user_model, d.item_model, d.item_catalog
        owner, objectives, weights = d.owner_stage, d.objectives, None
        prior, granularity = None, "unit"
        recall_users = d.user_catalog.as_inputs("user_id")
        extra["training_config.json"] = {"demo": True, "num_users": args.num_users,
                                         "num_items": args.num_items, "dim": args.dim, "seed": args.seed}
    else:
        from csmf_tf.serving.bundle import load_tower_bundle

        b = load_tower_bundle(args.bundle)
        user_model, item_model, catalog = b.user_model, b.item_model, b.item_catalog
        owner, objectives, weights = b.owner_stage, b.objectives, b.default_weights
        prior, granularity = b.popularity_prior, b.config.get("granularity", "unit")
        extra["training_config.json"] = b.config
    if args.weights:
        weights = [float(w) for w in args.weights.split(",")]
    options = ScannOptions(num_leaves=args.num_leaves, num_leaves_to_search=args.num_leaves_to_search,
                           num_reordering_candidates=args.num_reordering_candidates,
                           dimensions_per_block=args.dimensions_per_block)
    t0 = time.perf_counter()
    try:
        path = export_retrieval_model(user_model, item_model, catalog, owner, objectives, args.base_path,
                                      args.model_name, default_weights=weights, k_max=args.k_max,
                                      default_k=args.default_k, use_scann=not args.brute_force,
                                      scann_options=options, extra_assets=extra, popularity_prior=prior,
                                      granularity=granularity, min_ann_recall=args.min_ann_recall,
                                      ann_recall_action=args.ann_recall_action, ann_recall_k=args.ann_recall_k,
                                      ann_recall_queries=args.ann_recall_queries, ann_recall_users=recall_users)
    except AnnRecallTooLow as e:
        raise SystemExit(f"export refused, nothing published: {e}") from None
    config = json.loads((path / "assets" / "config.json").read_text())
    recall = config["ann_recall"]
    print(f"exported {path} in {time.perf_counter() - t0:.1f}s: {config['num_items']} items, D={config['dim']}, "
          f"index={config['index']}, ANN recall@{recall['k']} {recall['recall_at_k']:.4f} "
          f"({recall['num_queries']} {recall['queries']} queries, floor {recall['min_recall']})")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
