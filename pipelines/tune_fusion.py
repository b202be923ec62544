"""Choose the fusion weights k on the validation split and make them the export's defaults.

    python -m pipelines.tune_fusion --run runs/csmf \\
        --maximise conversion/recall@50 --constraint 'exposure/recall@50>=0.95*stage'
    python -m pipelines.tune_fusion --run runs/csmf \\
        --maximise '1*exposure/ndcg@50 + 1*click/ndcg@50 + 2*conversion/ndcg@50'

Every point of a grid over the simplex (k_t = n_t / --steps) is scored on validation with the run's
stage scores (and its popularity prior); the best point that meets every --constraint wins (ties: the
first in grid order). A constraint's bound is a number or '<fraction>*stage': that fraction of what the
objective's own stage score s_t gives on validation. Writes <run>/fusion_search.json (every point) and
<run>/fusion_tradeoff.png, and sets the weights as the default_weights of <run>/bundle, so that
`csmf export --bundle <run>/bundle` serves them when a request sends no objective_weights (a request's own
weights still override them). The data flags must be the ones the run was trained with.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.common import add_data_arguments, add_output_arguments, configure_output, load_table

from csmf_tf.data.prepared import prepare
from csmf_tf.metrics.fusion_search import (CONSTRAINT_SYNTAX, TARGET_SYNTAX, NoFeasiblePointError, parse_target,
                                           search_fusion_weights)
from csmf_tf.plots import plot_fusion_tradeoff
from csmf_tf.serving.bundle import set_bundle_default_weights
from csmf_tf.training.run import load_run, scoring_vectors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished training run (csmf train --out DIR)")
    parser.add_argument("--maximise", "--maximize", required=True, metavar="TARGET", help=TARGET_SYNTAX)
    parser.add_argument("--constraint", action="append", default=[], metavar="CONSTRAINT",
                        help=f"repeatable; {CONSTRAINT_SYNTAX}")
    parser.add_argument("--steps", type=int, default=10,
                        help="grid resolution: k_t in {0, 1/steps, ..., 1} with sum 1 (66 points for 3 objectives)")
    parser.add_argument("--no-bundle", action="store_true", help="search and report only; leave the bundle's "
                                                                 "default weights as they are")
    add_data_arguments(parser)
    add_output_arguments(parser)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose)
    run_dir = Path(args.run)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    try:
        parse_target(args.maximise, args.constraint)  # the syntax, before any data is read
    except ValueError as error:
        raise SystemExit(str(error)) from None
    data = prepare(load_table(args), seed=args.data_seed, split=args.split)
    try:
        run = load_run(run_dir, data)
        target = parse_target(args.maximise, args.constraint, run.model.objectives)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    if run.model.num_stages < 2:
        raise SystemExit(f"{run_dir} has one objective ({run.model.objectives[0]}): nothing to fuse")
    vectors = scoring_vectors(run, data.validation)
    try:
        search = search_fusion_weights(vectors, data.validation, target, args.steps)
    except NoFeasiblePointError as error:
        (run_dir / "fusion_search.json").write_text(json.dumps(error.search.to_json(), indent=2))
        raise SystemExit(str(error)) from None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    record = search.to_json()
    (run_dir / "fusion_search.json").write_text(json.dumps(record, indent=2))
    picture = plot_fusion_tradeoff(record, run_dir / "fusion_tradeoff.png")
    objectives = search.objectives
    print(f"\n{target.describe()}: {len(search.weights)} points on validation, {int(search.feasible.sum())} feasible")
    if search.thresholds:
        print("constraints: " + "; ".join(f"{c} -> {v:.4f}" for c, v in search.thresholds.items()))
    order = [int(i) for i in sorted(range(len(search.weights)), key=lambda i: -search.values[i])
             if search.feasible[i]][:5]
    print(f"{'k (' + ', '.join(objectives) + ')':<36} {'target':>8}  " + "  ".join(f"{k:>20}" for k in target.keys))
    for i in order:
        mark = "  <- chosen" if i == search.chosen else ""
        print(f"{str(tuple(round(float(k), 3) for k in search.weights[i])):<36} {search.values[i]:8.4f}  "
              + "  ".join(f"{search.fused[i][k]:20.4f}" for k in target.keys) + mark)
    print("own stage score: " + ", ".join(f"{k} {v:.4f}" for k, v in search.stage.items()))
    if not args.no_bundle:
        set_bundle_default_weights(run_dir / "bundle", search.chosen_weights,
                                   {"fusion_search": str(run_dir / "fusion_search.json"), "target": target.describe(),
                                    "split": "validation", "steps": args.steps})
        print(f"default weights of {run_dir / 'bundle'} set to {search.chosen_weights}; "
              f"export: csmf export --bundle {run_dir / 'bundle'}")
    print(f"search: {run_dir / 'fusion_search.json'}, trade-off: {picture}")
    return record


if __name__ == "__main__":
    main()
