"""The main job: data -> popularity, single-objective two-tower and CSMF -> results table -> serving.

    python -m pipelines.main                      # embedded synthetic default dataset (or: csmf main)
    python -m pipelines.main --dataset beibei     # ../shared/data/beibei_cascade_ai607
    tensorboard --logdir runs/main/tensorboard    # every stage's loss, validation Recall@50, ownership

CSMF's stage 1 *is* the single-objective exposure two-tower (same towers, data and optimizer), so it is
trained once: the two-tower row is scored from it, and CSMF continues from its weights at CPP.
Writes runs/main/: results.json, results.md, results.png, per-stage checkpoints, ownership PNGs and
tensorboard/stage_<t>/.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from pipelines.common import (add_data_arguments, add_output_arguments, check_objectives, check_prepared,
                              configure_output, load_table, native_stderr_to)
from pipelines.train_cascade import add_training_arguments, config_from_args

from csmf_tf.data.prepared import prepare
from csmf_tf.data.tfdata import make_objective_dataset
from csmf_tf.metrics.retrieval import format_results_table
from csmf_tf.metrics.vectors import evaluate_vectors, popularity_scoring
from csmf_tf.plots import plot_results
from csmf_tf.training.run import train_csmf


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--out", default="runs/main")
    parser.add_argument("--no-serve", action="store_true", help="skip export + serving demo")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs under <out>/tensorboard")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    started, cpu_started = time.time(), cpu_seconds()
    config = config_from_args(args)
    verbose = configure_output(args.verbose)
    out = Path(args.out)
    board = None if args.no_tensorboard else out / "tensorboard"
    table = load_table(args)
    check_objectives(table, config.objectives, args)
    data = prepare(table, seed=args.data_seed, split=args.split)
    check_prepared(data, args)
    ks = tuple(k for k in (20, 50, 100, 200) if k <= len(data.items))
    first = config.objectives[0]
    rows = {"popularity (per objective)": evaluate_vectors(
        popularity_scoring(data.train, data.testing, config.objectives), data.testing, ks=ks)["stage"],
            f"popularity ({first})": evaluate_vectors(
        popularity_scoring(data.train, data.testing, config.objectives, source=first),
        data.testing, ks=ks)["stage"]}

    print(f"\n### single-objective two-tower ({first} only) = CSMF stage 1", flush=True)
    baseline = train_csmf(data, config.single_objective(first), out / f"two_tower_{first}", verbose=verbose,
                          tensorboard_dir=board)
    rows[f"two-tower ({first} only)"] = baseline.results["stage"]

    print("\n### CSMF (stage 1 from the two-tower above)", flush=True)
    run = train_csmf(data, config, out / "csmf", verbose=verbose, tensorboard_dir=board, pretrained=baseline)
    model, csmf = run.model, run.results
    prior = " + popularity prior" if config.popularity_prior else ""
    if config.popularity_prior:
        rows["CSMF s_t, no prior"] = csmf["without_prior"]["stage"]
    rows[f"CSMF s_t{prior}"] = csmf["stage"]
    weights = ",".join(f"{k:g}" for k in config.fusion_weights)
    rows[f"CSMF fused (k={weights}){prior}"] = csmf["fused"]

    last = config.objectives[-1]
    tfrs_metrics = model.evaluate(make_objective_dataset(data.test, last, 1024, shuffle=False, item_catalog=data.items),
                                  return_dict=True, verbose=0)
    tfrs_top50 = tfrs_metrics.get(f"{last}_factorized_top_k/top_50_categorical_accuracy")
    table_text = format_results_table(rows, metrics=("recall@50", "ndcg@50"), objectives=config.objectives)
    print(f"\n## Test results ({args.dataset}), Recall@50 / NDCG@50 over the full item corpus\n")
    print(table_text)
    if tfrs_top50 is not None:
        print(f"\nTFRS FactorizedTopK cross-check on test {last} pairs (per-pair hit rate, training items not "
              f"excluded): top-50 = {tfrs_top50:.4f}; exact per-user Recall@50 above: "
              f"{csmf['stage'][f'{last}/recall@50']:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    picture = plot_results(rows, config.objectives, out / "results.png",
                           title=f"Test Recall@50 per objective ({args.dataset})")
    summary = {"dataset": args.dataset, "config": config.to_json(), "results": rows,
               "tfrs_factorized_top_k": {k: float(v) for k, v in tfrs_metrics.items()},
               "seconds": time.time() - started}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table_text + "\n")
    print(f"\nresults: {out / 'results.md'}, {picture}; TensorBoard: tensorboard --logdir {board}"
          if board is not None else f"\nresults: {out / 'results.md'}, {picture}")
    if not args.no_serve:
        from pipelines.serve_demo import export_and_query
        # ScaNN's index builder logs through absl to stderr; without --verbose those lines go to a file.
        with native_stderr_to(out / "export.log", enabled=not args.verbose):
            export_and_query(model, data, config, out, run.prior)
    wall, cpu = time.time() - started, cpu_seconds() - cpu_started
    summary.update(seconds=wall, cpu_seconds=cpu)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nmain job finished in {wall:.0f} s ({cpu:.0f} s CPU); outputs in {out}/")
    return summary


if __name__ == "__main__":
    main()
