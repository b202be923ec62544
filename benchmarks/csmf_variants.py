"""Validation-only pilot of CSMF variants: which [ours] setting is worth a full report?

Trains CSMF at one grid point (a report's chosen learning rate and temperature) with the experiments'
data, protocol and stage-1 pretraining (:class:`csmf_tf.experiments.methods.Context`, shared by every
variant of a seed), once per variant and seed, and prints the **validation** Recall@50 of every
objective, without and with the popularity prior tuned on validation (as the reports score it). The
test split is never read. A variant is a name and a JSON object of ``TrainingConfig`` overrides::

    python benchmarks/csmf_variants.py --dataset movielens --learning-rate 0.003 --temperature 0.05 \\
        --seeds 0,1 --variant base '{}' --variant in_batch '{"hard_negative_correction": "in_batch"}'

``--variant copies`` (no overrides) trains the fine-tuned-copies baseline instead, for reference.
Writes one JSON line per run to ``--out`` (appending).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from csmf_tf.data.prepared import prepare  # noqa: E402
from csmf_tf.experiments.methods import Context, HyperParams, run_csmf, train_finetuned_copies  # noqa: E402
from csmf_tf.metrics.prior import log_popularity, tune_prior  # noqa: E402
from csmf_tf.metrics.vectors import evaluate_vectors  # noqa: E402
from pipelines.experiments import MODES, configure, load, parse_args  # noqa: E402

COPIES = "copies"


def validation_recall(vectors, data, objectives) -> dict[str, float]:
    results = evaluate_vectors(vectors, data.validation, ks=(50,))["stage"]
    return {o: round(results[f"{o}/recall@50"], 4) for o in objectives}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "beibei", "movielens"])
    p.add_argument("--learning-rate", type=float, required=True)
    p.add_argument("--temperature", type=float, required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
                   help=f"a name and a JSON object of TrainingConfig overrides ('{COPIES}': the fine-tuned copies)")
    p.add_argument("--out", type=Path, default=Path("csmf_variants.jsonl"))
    args = p.parse_args(argv)
    variants = [(name, json.loads(overrides)) for name, overrides in args.variant]
    for name, overrides in variants:
        if not isinstance(overrides, dict):
            raise SystemExit(f"--variant {name}: the overrides must be a JSON object, got {overrides!r}")
        overrides.update({k: tuple(v) for k, v in overrides.items() if isinstance(v, list)})
    experiment_args = parse_args(["--dataset", args.dataset, "--mode", "full"])
    table = load(experiment_args, MODES["full"])
    _, config, _ = configure(experiment_args, table)
    data = prepare(table, seed=experiment_args.data_seed, exclusion=experiment_args.exclusion)
    context = Context(data, config, num_experts=MODES["full"].num_experts)
    hp = HyperParams(args.learning_rate, args.temperature)
    log_pop = log_popularity(data.train, context.objectives, data.items.ids)
    rows = []
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, overrides in variants:
                start = time.time()
                if name == COPIES:
                    trained = train_finetuned_copies(context, hp, seed)
                else:
                    trained = run_csmf(context, hp, seed, f"variant_{name}", **overrides)
                with_prior, _ = tune_prior(trained.vectors, log_pop, data.validation)
                row = {"dataset": args.dataset, "variant": name, "overrides": overrides, "seed": seed,
                       "hp": hp.key, "seconds": round(time.time() - start),
                       "val_recall@50": validation_recall(trained.vectors, data, context.objectives),
                       "val_recall@50_with_prior": validation_recall(with_prior, data, context.objectives)}
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    finally:
        context.cleanup()
    return rows


if __name__ == "__main__":
    main()
